"""Per-op sharding rules on one mesh axis: the placements an op can run with (Alpa's strategy space).

A value's placement on one mesh axis is ``R`` (replicated), ``P`` (partial sums: every rank holds a
full-size addend) or an ``int`` d (sharded on dimension d, contiguous blocks). An :class:`Option` is
one way to run an op on one axis: the placement of each tensor input (``R`` or a dim; ops never take
``P`` inputs: the edge reshards first), the output's (``R``, ``P`` or a dim) and whether the op's
work is divided over the axis. ``search.opspace`` takes the product of options over the axes of a
mesh and prices it; the emitted module runs the same placements on DTensor (``passes.placements``).

Rules are shape logic, by op kind: matmuls split batch, row, column or contraction dims (a
contraction gives ``P``), element-wise ops any dim their broadcast inputs share, norms and softmax
any dim but the normalised ones, reductions any dim (a reduced one gives ``P`` for sum and mean),
views the leading dim of each group of merged or split dims, embeddings the ids' dims, the table's
columns or its rows (``P``), attention its batch and heads, cross-entropy its samples (``P``).
An op with no rule runs replicated (:func:`options` returns None; the planner warns).

    >>> from examples.zoo import build
    >>> from planner.capture import capture
    >>> mg = capture(*build("gpt-tiny", batch=2))
    >>> fc = next(n for n in mg.gm.graph.nodes if n.name == "linear_2")       # mlp.fc
    >>> [str(o) for o in options(fc)]     # replicated, batch, tokens, colwise, rowwise (output, then inputs)
    ['R <- (R, R, R)', 'S0 <- (S0, R, R)', 'S1 <- (S1, R, R)', 'S2 <- (R, S0, S0)', 'P <- (S2, S1, R)']
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from search.placement import op_name

R, P = "R", "P"

ELEMENTWISE = {"add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "reciprocal", "exp", "log", "tanh",
               "sigmoid", "relu", "gelu", "silu", "sin", "cos", "abs", "clone", "contiguous", "to", "type_as",
               "_to_copy", "dropout", "detach", "alias", "masked_fill", "where", "zeros_like", "ones_like",
               "full_like", "empty_like", "mul_", "add_", "copy", "lift_fresh_copy", "native_dropout",
               "clamp", "minimum", "maximum", "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "bitwise_not"}
VIEWS = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "unflatten", "expand"}
REDUCTIONS = {"sum": P, "mean": P, "amax": None, "max": None, "min": None, "amin": None}
NORMS = {"layer_norm": 1, "rms_norm": 1}


@dataclass(frozen=True)
class Option:
    """One way to run an op on one mesh axis (see the module docstring)."""

    out: object                      # R, P, or the output dim sharded
    ins: tuple                       # per tensor input slot (:func:`tensor_inputs`): R or a dim
    split: bool                      # the op's work is divided over the axis
    grads: tuple | None = None       # per slot: the input gradient's placement when not the rule's

    def grad(self, j: int):
        """Placement of slot j's gradient: its own placement, or ``P`` where the input is replicated but
        the work is divided (each rank contributes part of the sum), unless the rule says otherwise."""
        if self.grads is not None and self.grads[j] is not None:
            return self.grads[j]
        return P if self.ins[j] == R and self.split else self.ins[j]

    def __str__(self) -> str:
        return f"{name(self.out)} <- ({', '.join(name(p) for p in self.ins)})"


def name(p) -> str:
    return p if isinstance(p, str) else f"S{p}"


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The node's inputs that are values (tensors, or the tuple a ``getitem`` reads), in argument order;
    one slot per occurrence."""
    return [a for a in tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The output shape; for a tuple output (split, chunk) the first piece's."""
    v = node.meta.get("val")
    if isinstance(v, (list, tuple)):
        v = next((x for x in v if isinstance(x, torch.Tensor)), None)
    return tuple(int(d) for d in v.shape) if isinstance(v, torch.Tensor) else None


def options(node: fx.Node) -> list[Option] | None:
    """Every :class:`Option` of ``node`` on one axis, all-replicated first; None when no rule applies."""
    slots = tensor_inputs(node)
    out = shape_of(node)
    if out is None and node.target is not operator.getitem:
        return None
    shapes = [shape_of(a) for a in slots]
    if any(s is None for s in shapes):
        return None
    op = op_name(node)
    rule = _RULES.get(op)
    if rule is None:
        if op in ELEMENTWISE:
            rule = _elementwise
        elif op in VIEWS:
            rule = _view
        elif op in REDUCTIONS:
            rule = _reduction
        else:
            return None
    got = rule(node, slots, shapes, out)
    if got is None:
        return None
    replicated = Option(R, (R,) * len(slots), False)
    seen, result = {replicated}, [replicated]
    for o in got:
        if o not in seen:
            seen.add(o)
            result.append(o)
    return result


def _mapped(n: int, out, mapping: dict[int, int], split: bool = True, **kw) -> Option:
    """An option sharding slots ``mapping`` (slot -> dim), the others replicated."""
    return Option(out, tuple(mapping.get(j, R) for j in range(n)), split, **kw)


def _parallel(shapes, out_shape, dims_of_out) -> list[Option]:
    """Options that shard output dim i and, per slot, the input dim ``dims_of_out(j, i)`` (None: the
    slot stays replicated, e.g. broadcast); an output dim of size 1 is never sharded."""
    got = []
    for i, size in enumerate(out_shape):
        if size < 2:
            continue
        mapping = {j: d for j in range(len(shapes)) if (d := dims_of_out(j, i)) is not None}
        got.append(_mapped(len(shapes), i, mapping))
    return got


def _broadcast_dim(shape, out_shape, i):
    """The dim of an input of ``shape`` aligned (from the right) with output dim i, unless broadcast."""
    d = i - (len(out_shape) - len(shape))
    return d if d >= 0 and shape[d] == out_shape[i] else None


def _elementwise(node, slots, shapes, out):
    return _parallel(shapes, out, lambda j, i: _broadcast_dim(shapes[j], out, i))


def _softmax(node, slots, shapes, out):
    dim = node.args[1] % len(out)
    return [o for o in _elementwise(node, slots, shapes, out) if o.out != dim]


def _norm(node, slots, shapes, out):
    normalized = node.args[1]
    keep = len(out) - len(normalized)
    return [_mapped(len(slots), i, {0: i}) for i in range(keep) if out[i] > 1]


def _reduction(node, slots, shapes, out):
    if len(slots) != 1:
        return None
    x = shapes[0]
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        dims = list(range(len(x)))
    dims = {d % len(x) for d in ([dims] if isinstance(dims, int) else dims)}
    keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    got, k = [], 0
    for d in range(len(x)):
        if d in dims:
            if REDUCTIONS[op_name(node)] == P and x[d] > 1:
                got.append(_mapped(1, P, {0: d}))
            k += keepdim
        else:
            if x[d] > 1:
                got.append(_mapped(1, k, {0: d}))
            k += 1
    return got


def _linear(node, slots, shapes, out):
    x, w = shapes[0], shapes[1]
    n = len(slots)
    got = [_mapped(n, i, {0: i}) for i in range(len(x) - 1) if x[i] > 1]   # batch-like dims
    got.append(_mapped(n, len(out) - 1, {1: 0, **({2: 0} if n == 3 else {})}))   # columns (colwise)
    got.append(_mapped(n, P, {0: len(x) - 1, 1: 1}, grads=(None, None, R) if n == 3 else None))   # rows (rowwise)
    return got


def _matmul(node, slots, shapes, out, bias: bool = False):
    """a[..., M, K] @ b[..., K, N] (``addmm``: bias[N] + a[M, K] @ b[K, N])."""
    off = 1 if bias else 0
    a, b = shapes[off], shapes[off + 1]
    if len(a) < 2 or len(b) < 2:
        return []
    n, r = len(slots), len(out)
    got = []
    for i in range(r - 2):   # batch dims, broadcast from the right
        mapping = {j: d for j in (off, off + 1) if (d := _broadcast_dim(shapes[j][:-2], out[:-2], i)) is not None}
        if out[i] > 1:
            got.append(_mapped(n, i, mapping))
    got.append(_mapped(n, r - 2, {off: len(a) - 2}))                                       # rows of a
    got.append(_mapped(n, r - 1, {off + 1: len(b) - 1, **({0: len(shapes[0]) - 1} if bias else {})}))   # cols of b
    got.append(_mapped(n, P, {off: len(a) - 1, off + 1: len(b) - 2},
                       grads=(R,) + (None,) * (n - 1) if bias else None))                 # contraction
    return got


def _addmm(node, slots, shapes, out):
    if len(shapes[0]) != 1:
        return []
    return _matmul(node, slots, shapes, out, bias=True)


def _embedding(node, slots, shapes, out):
    table, ids = shapes
    got = [_mapped(2, i, {1: i}) for i in range(len(ids)) if ids[i] > 1]
    got.append(_mapped(2, len(out) - 1, {0: 1}))          # the table's columns
    got.append(_mapped(2, P, {0: 0}))                     # the table's rows (a masked lookup, summed)
    return got


def _attention(node, slots, shapes, out):
    q, k, v = shapes[:3]
    if len(q) != 4 or k[1] != q[1] or v[1] != q[1] or len(slots) > 4:
        return []
    mask = shapes[3] if len(slots) == 4 else None
    got = []
    for i in (0, 1):
        mapping = {0: i, 1: i, 2: i}
        if mask is not None:
            d = _broadcast_dim(mask, out[:2] + mask[-2:], i) if len(mask) == 4 else None
            if d is not None:
                mapping[3] = d
        if q[i] > 1:
            got.append(_mapped(len(slots), i, mapping))
    return got


def _cross_entropy(node, slots, shapes, out):
    logits, target = shapes[:2]
    reduction = node.args[3] if len(node.args) > 3 else node.kwargs.get("reduction", 1)
    if len(slots) != 2 or reduction != 1 or len(logits) < 2:
        return []
    dims = [0] + list(range(2, len(logits)))        # samples, then any extra (non-class) dims
    return [_mapped(2, P, {0: d, 1: d if d == 0 else d - 1}) for d in dims if logits[d] > 1]


def _view(node, slots, shapes, out):
    """A sharded input dim maps to an output dim when both lead their group of merged/split dims."""
    if len(slots) != 1:
        return None
    mapping = view_dims(shapes[0], out)
    return [_mapped(1, k, {0: d}) for d, k in mapping.items()]


def view_dims(src: tuple, dst: tuple) -> dict[int, int]:
    """src dim -> dst dim for reshapes of ``src`` into ``dst`` (expand: same-size dims aligned from the
    right) whose contiguous blocks stay contiguous blocks: the leading non-1 dims of each group of
    dims with equal products."""
    if math.prod(src) != math.prod(dst):   # expand
        return {d: d + len(dst) - len(src) for d in range(len(src))
                if src[d] > 1 and src[d] == dst[d + len(dst) - len(src)]}
    got, i, j = {}, 0, 0
    while i < len(src) and j < len(dst):
        while i < len(src) and src[i] == 1:
            i += 1
        while j < len(dst) and dst[j] == 1:
            j += 1
        if i == len(src) or j == len(dst):
            break
        got[i] = j
        a, b = src[i], dst[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                a *= src[i]
                i += 1
            else:
                b *= dst[j]
                j += 1
    return got


def _transpose(node, slots, shapes, out):
    r = len(out)
    if op_name(node) == "t":
        perm = list(range(r))[::-1]
    elif op_name(node) == "permute":
        perm = [d % r for d in node.args[1]]
    else:
        a, b = node.args[1] % r, node.args[2] % r
        perm = list(range(r))
        perm[a], perm[b] = perm[b], perm[a]
    return [_mapped(1, k, {0: perm[k]}) for k in range(r) if out[k] > 1]


def _split(node, slots, shapes, out):
    x = shapes[0]
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(x)
    return [_mapped(1, d, {0: d}) for d in range(len(x)) if d != dim and x[d] > 1]


def _getitem(node, slots, shapes, out):
    if out is None or not isinstance(slots[0].meta.get("val"), (list, tuple)):
        return None
    return [_mapped(1, d, {0: d}) for d in range(len(out)) if out[d] > 1]


def _cat(node, slots, shapes, out):
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(out)
    if any(len(s) != len(out) for s in shapes):
        return []
    return [_mapped(len(slots), d, {j: d for j in range(len(slots))}) for d in range(len(out))
            if d != dim and out[d] > 1]


_RULES = {
    "linear": _linear, "matmul": _matmul, "mm": _matmul, "bmm": _matmul, "addmm": _addmm,
    "embedding": _embedding, "scaled_dot_product_attention": _attention,
    "cross_entropy_loss": _cross_entropy, "softmax": _softmax, "_softmax": _softmax, "log_softmax": _softmax,
    "_log_softmax": _softmax, "layer_norm": _norm, "rms_norm": _norm,
    "transpose": _transpose, "permute": _transpose, "t": _transpose,
    "split": _split, "chunk": _split, "split_with_sizes": _split, "getitem": _getitem, "cat": _cat,
}
