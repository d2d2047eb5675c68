"""Sequence-sharding rules: which values hold only this rank's tokens, and how each op stays local.

One rule set with two users, like ``search.placement`` for tensor parallelism: the search checks
that a graph can be sequence-parallel (and reads its attention shapes), and ``passes.sp`` rewrites
the graph with it. Under sequence (context) parallelism of degree ``sp`` every rank holds ``S/sp``
tokens of every sequence; token-wise ops (linears, norms, MLPs, embeddings, element-wise ops) run
unchanged on them, and only three things need care:

* **attention** (``scaled_dot_product_attention`` with q, k, v sharded on their sequence dim) mixes
  tokens: the pass replaces it with a sequence-parallel kernel (``runtime.attention``);
* **position tables**: a replicated operand that spans the sequence (RoPE cos/sin, a learned
  position embedding looked up with ``arange(S)``) is indexed with this rank's positions
  (``select_positions``), which is also what makes the zig-zag layout exact;
* **the loss**: a token-mean cross-entropy of this rank's tokens is a partial mean; the module
  averages it over the sequence-parallel ranks like over data-parallel ones (equal token counts).

A placement is ``None`` (replicated: independent of which tokens a rank holds) or ``Seq(dim)``.
Anything else that mixes tokens (a reduction over the sequence, a per-token output, an explicit
attention mask) makes the graph :class:`Unsupported` with the node named.

    >>> layout = propagate_seq(mg.gm, seq_len=mg.seq_len, sp=2)        # doctest: +SKIP
    >>> layout.attention, layout.select_positions, layout.loss         # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch.fx as fx

from search.placement import _POINTWISE, Unsupported, _shape, op_name

__all__ = ["Seq", "SeqLayout", "Unsupported", "propagate_seq", "attention_shapes"]


class Seq(NamedTuple):
    """The value holds this rank's tokens on ``dim``."""

    dim: int


_LOSS = "loss"   # placement of a token-mean loss: a partial mean over this rank's tokens
_TOKENWISE_POINTWISE = _POINTWISE | {"cos", "sin", "reciprocal", "log", "square", "zeros_like", "ones_like",
                                     "full_like", "empty_like"}
_NORMS = {"layer_norm", "native_layer_norm", "rms_norm", "group_norm"}


@dataclass
class SeqLayout:
    """Result of propagation (node names throughout)."""

    sp: int
    seq_len: int
    placement: dict[str, Seq | str | None] = field(default_factory=dict)
    inputs: dict[str, int] = field(default_factory=dict)             # placeholder -> sequence dim
    local_args: dict[str, tuple] = field(default_factory=dict)       # node -> rewritten args
    attention: list[str] = field(default_factory=list)               # attention nodes to replace
    select_positions: list[tuple[str, int, int]] = field(default_factory=list)  # (node, arg index, dim)
    loss: str | None = None                                          # the partial-mean loss node


def propagate_seq(gm: fx.GraphModule, *, seq_len: int, sp: int) -> SeqLayout:
    """Sequence placement of every node when the inputs' dim 1 of size ``seq_len`` is split ``sp`` ways.
    Inputs are the placeholders whose value has at least two dims and ``seq_len`` at dim 1."""
    layout = SeqLayout(sp=sp, seq_len=seq_len)
    place: dict[fx.Node, Seq | str | None] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = _shape(node)
            p = Seq(1) if shape is not None and len(shape) >= 2 and shape[1] == seq_len else None
            if p is not None:
                layout.inputs[node.name] = 1
            place[node] = p
        elif node.op == "call_function":
            place[node] = _rule(node, place, layout)
        elif node.op == "call_module" and node.args and isinstance(node.args[0], fx.Node):
            place[node] = place.get(node.args[0])  # a collective another pass inserted: shape-preserving
        elif node.op == "output":
            _check_output(node, place)
        else:
            place[node] = None
        if node in place:
            layout.placement[node.name] = place[node]
    if not layout.inputs:
        raise Unsupported(f"no model input has the sequence length {seq_len} at dim 1")
    return layout


def attention_shapes(gm: fx.GraphModule) -> list[tuple[tuple[int, ...], tuple[int, ...], bool]]:
    """(q shape, k shape, is_causal) of every attention node, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and op_name(node) == "scaled_dot_product_attention":
            out.append((_shape(node.args[0]), _shape(node.args[1]), _is_causal(node)))
    return out


def _is_causal(node: fx.Node) -> bool:
    return bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))


def _check_output(node: fx.Node, place) -> None:
    for a in node.all_input_nodes:
        p = place.get(a)
        if isinstance(p, Seq):
            raise Unsupported(f"{a.name} reaches the model output holding one rank's tokens (per-token "
                              "outputs such as logits); sequence parallelism trains models that return "
                              "their loss: pass the targets with the inputs")


def _rule(node: fx.Node, place, layout: SeqLayout):
    op = op_name(node)
    ins = {a: place.get(a) for a in node.all_input_nodes}
    if any(p == _LOSS for p in ins.values()):
        raise Unsupported(f"{node.name} ({op}) uses the loss inside the model; sequence parallelism needs "
                          "the token-mean loss to be the model's output")
    if op == "getitem":
        p = place.get(node.args[0])
        return p[node.args[1]] if isinstance(p, tuple) and not isinstance(p, Seq) else p
    sharded = {a: p for a, p in ins.items() if isinstance(p, Seq)}
    if not sharded:
        return None
    if op == "_assert_tensor_metadata":
        layout.local_args[node.name] = ("drop",)
        return None
    x = node.args[0]
    d = sharded.get(x, next(iter(sharded.values()))).dim
    in_shape, out_shape = _shape(x), _shape(node)
    if op in ("linear", "addmm", "mm", "matmul"):
        a = node.args[1] if op == "addmm" else x
        pa = place.get(a)
        if not isinstance(pa, Seq) or pa.dim == len(_shape(a)) - 1 or len(sharded) > 1:
            raise Unsupported(f"{node.name}: {op} contracts over the sequence")
        return pa
    if op == "embedding":
        return Seq(place[node.args[1]].dim) if isinstance(place.get(node.args[1]), Seq) else _mixing(node, op)
    if op in _NORMS:
        if d >= len(in_shape) - len(node.args[1]):
            raise Unsupported(f"{node.name}: {op} normalises over the sequence")
        return Seq(d) if op != "native_layer_norm" else (Seq(d), None, None)
    if op in _TOKENWISE_POINTWISE:
        return _broadcast(node, place, layout)
    if op in ("softmax", "_softmax", "log_softmax", "_log_softmax", "mean", "sum", "amax", "var"):
        dims = node.args[1] if len(node.args) > 1 else None
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if not dims or any(k % len(in_shape) == d for k in dims):
            raise Unsupported(f"{node.name}: {op} reduces over the sequence")
        keep = len(node.args) > 2 and node.args[2]
        if op in ("mean", "sum", "amax", "var") and not keep:
            return Seq(d - sum(1 for k in dims if k % len(in_shape) < d))
        return Seq(d)
    if op in ("split", "chunk", "split_with_sizes", "unbind"):
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(in_shape)
        if dim == d:
            raise Unsupported(f"{node.name}: {op} along the sequence")
        return tuple(Seq(d) for _ in node.meta["val"])
    if op == "transpose":
        a, b = (k % len(in_shape) for k in node.args[1:3])
        return Seq({a: b, b: a}.get(d, d))
    if op == "permute":
        return Seq([k % len(in_shape) for k in node.args[1]].index(d))
    if op == "unsqueeze":
        k = node.args[1] % len(out_shape)
        return Seq(d + (1 if k <= d else 0))
    if op in ("slice", "select", "narrow"):
        k = node.args[1] % len(in_shape) if len(node.args) > 1 else 0
        if op == "slice" and out_shape == in_shape:
            return Seq(d)
        if k == d:
            raise Unsupported(f"{node.name}: {op} along the sequence")
        return Seq(d - 1) if op == "select" and k < d else Seq(d)
    if op == "cat":
        k = node.args[1] % len(out_shape) if len(node.args) > 1 else 0
        if k == d or any(place.get(t) != Seq(d) for t in node.args[0]):
            raise Unsupported(f"{node.name}: cat along the sequence or of mixed inputs")
        return Seq(d)
    if op == "expand":
        sizes = list(node.args[1])
        e = d + len(sizes) - len(in_shape)
        if sizes[e] != -1:
            sizes[e] //= layout.sp
        layout.local_args[node.name] = (x, sizes) + tuple(node.args[2:])
        return Seq(e)
    if op in ("view", "reshape", "_unsafe_view"):
        return _view(node, d, in_shape, out_shape, layout)
    if op == "scaled_dot_product_attention":
        return _attention(node, place, layout)
    if op == "cross_entropy_loss":
        return _loss(node, place, layout)
    if op == "outer":
        return Seq(0) if isinstance(place.get(node.args[0]), Seq) else Seq(1)
    return _mixing(node, op)


def _mixing(node: fx.Node, op: str):
    raise Unsupported(f"no sequence-parallel rule for {op} ({node.name}): it may mix tokens")


def _broadcast(node: fx.Node, place, layout: SeqLayout) -> Seq:
    """Element-wise op: sharded operands agree on the output dim; a replicated operand that spans
    the whole sequence there (a position table) is indexed with this rank's positions."""
    out_shape = _shape(node)
    result = None
    for a in node.all_input_nodes:
        p, shape = place.get(a), _shape(a)
        if isinstance(p, Seq):
            cand = Seq(p.dim + len(out_shape) - len(shape))
            if result is not None and result != cand:
                raise Unsupported(f"{node.name}: operands sharded on different dims")
            result = cand
    for i, a in enumerate(node.args):
        if not isinstance(a, fx.Node) or isinstance(place.get(a), Seq) or _shape(a) is None:
            continue
        shape = _shape(a)
        k = result.dim - (len(out_shape) - len(shape))
        if 0 <= k < len(shape) and shape[k] != 1:
            if shape[k] != layout.seq_len:
                raise Unsupported(f"{node.name}: operand {a.name} spans the sequence with size {shape[k]}")
            layout.select_positions.append((node.name, i, k))
    return result


def _view(node: fx.Node, d: int, in_shape, out_shape, layout: SeqLayout) -> Seq:
    """A view may merge the sequence dim with dims before it (tokens flattened, still whole tokens)
    but not split it or merge it with the dims after it: output dim ``e`` holds the sequence when
    the dims up to it hold exactly the input dims up to the sequence, and the dims before it no more
    than the input dims before the sequence."""
    before = through = 1
    for s in in_shape[:d]:
        before *= s
    through = before * in_shape[d]
    acc = 1
    for e, size in enumerate(out_shape):
        if acc * size == through and acc <= before:
            sizes = list(node.args[1])
            if sizes[e] != -1:
                sizes[e] //= layout.sp
            layout.local_args[node.name] = (node.args[0], sizes) + tuple(node.args[2:])
            return Seq(e)
        acc *= size
    raise Unsupported(f"{node.name}: view splits the sequence dim or merges it with the dims after it")


def _attention(node: fx.Node, place, layout: SeqLayout) -> Seq:
    q, k, v = node.args[:3]
    if any(place.get(t) != Seq(2) for t in (q, k, v)):
        raise Unsupported(f"{node.name}: attention needs q, k and v sharded on their sequence dim")
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    if mask is not None:
        raise Unsupported(f"{node.name}: attention with an explicit mask (only causal or no mask shard "
                          "over the sequence)")
    if dropout:
        raise Unsupported(f"{node.name}: attention dropout {dropout} (set it to 0 for sequence parallelism)")
    layout.attention.append(node.name)
    return Seq(2)


def _loss(node: fx.Node, place, layout: SeqLayout) -> str:
    logits, target = node.args[:2]
    reduction = node.args[3] if len(node.args) > 3 else node.kwargs.get("reduction", 1)
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    if place.get(logits) != Seq(0) or place.get(target) != Seq(0) or reduction != 1 or weight is not None:
        raise Unsupported(f"{node.name}: only an unweighted token-mean cross-entropy over flattened tokens "
                          "is sequence-parallel")
    if [u.op for u in node.users] != ["output"]:
        raise Unsupported(f"{node.name}: the loss is used inside the model")
    layout.loss = node.name
    return _LOSS
