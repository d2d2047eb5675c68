"""Chunk flow (AutoChunk analysis): how one axis of a region of the captured graph flows through it.

One rule set with two users, like ``search.seqshard``: ``search.chunking`` finds and prices the
chunkable regions of a model with it, and ``passes.chunk`` rewrites exactly the regions it verifies.
Pure analysis: the graph is read, never changed.

    >>> from examples.zoo import build
    >>> from planner.capture import capture
    >>> model, args, _ = build("gpt-tiny", batch=2, device="cpu")
    >>> gm = capture(model, args).gm
    >>> mlp = scope_region(gm, "blocks.0.mlp")                    # fc -> gelu -> proj
    >>> chunk_flow(gm, mlp, dim=1).output_dims                   # the sequence dim flows through
    {'linear_3': 1}

A region is a list of call_function node names (any order); ``dim`` is a dimension of the *anchor*, the
first tensor argument of the region's first node in graph order. :func:`chunk_flow` follows that axis
through the region with one rule per op (views, pointwise ops with broadcasting, linear, matmul, einsum,
norms, softmax, attention, embedding, cat/split, sum/mean/cross-entropy/MSE), forwards from inputs and
backwards from outputs, so the inputs a chunk needs sliced (RoPE tables, targets) are found too. Region
nodes that do not depend on the axis run once, before the loop (the k/v path of query-chunked attention);
the others run per chunk. An op that contracts, normalises over or otherwise mixes the axis raises
:class:`ChunkError` naming the node, except a sum or mean (sum, mean, cross-entropy, MSE) whose result
leaves the region: each chunk then yields a partial sum and a count, and the result is sum / count.
A causal attention whose queries are chunked (:func:`causal_queries`) needs the chunk's offset.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from operator import attrgetter
from typing import NamedTuple

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from search.errors import BadInput

__all__ = ["ChunkError", "ChunkDim", "ChunkFlow", "chunk_flow", "scope_region", "region_between",
           "causal_queries", "reduction_kind", "MEAN_OPS"]

aten = torch.ops.aten


class ChunkError(BadInput):
    """The region cannot be chunked along the requested dim; the message names the node and why."""


class ChunkDim(NamedTuple):
    """Where a tensor carries the chunked axis (length S): dim ``pos``, of size outer * S * inner (a view
    may have merged the axis with its neighbours). ``reduced``: the node sums over the axis, and ``pos``
    is the axis's dim in its unreduced result."""

    pos: int
    outer: int = 1
    inner: int = 1
    reduced: bool = False


class _Rule(NamedTuple):
    """How one op indexes its inputs: for each dim o of its (unreduced) result, the dim of every tensor
    input that o walks along; inputs missing from an entry are broadcast or not indexed by o, dims missing
    from ``dims`` mix several input positions. ``reduced``: dims a sum/mean removes; ``kept``: the dims
    left in the actual result (None: all of them)."""

    dims: dict[int, dict[fx.Node, int]]
    reduced: frozenset = frozenset()
    kept: tuple | None = None


@dataclass
class ChunkFlow:
    """How the chunked axis (length ``size``) flows through a region."""

    size: int
    dims: dict[fx.Node, ChunkDim]  # per-chunk nodes and the inputs they read sliced
    body: list[fx.Node]            # nodes run once per chunk, in graph order
    inputs: list[fx.Node]          # what the body reads: sliced when in ``dims``, else whole
    outputs: list[fx.Node]         # body nodes used after the region

    @property
    def input_dims(self) -> dict[str, int | None]:
        """Input name -> the dim it is sliced along (None: passed whole)."""
        return {n.name: self.dims[n].pos if n in self.dims else None for n in self.inputs}

    @property
    def output_dims(self) -> dict[str, int | str]:
        """Output name -> the dim its chunks are concatenated along, or "sum" / "mean" for a reduction."""
        return {n.name: k if isinstance(k, str) else k.pos for n, k in zip(self.outputs, self.combine)}

    @property
    def combine(self) -> list[ChunkDim | str]:
        """Per output: the ChunkDim to concatenate along, or "sum" / "mean"."""
        return [reduction_kind(n) if self.dims[n].reduced else self.dims[n] for n in self.outputs]

    @property
    def scalar_loss(self) -> bool:
        """The region ends in one scalar sum or mean (a loss): the gradient that reaches it is a number,
        so the loop can take each chunk's gradients right after its forward instead of recomputing it."""
        return (len(self.outputs) == 1 and self.combine[0] in ("sum", "mean")
                and isinstance(_val(self.outputs[0]), torch.Tensor) and _val(self.outputs[0]).dim() == 0)


# --------------------------------------------------------------------------------------- regions

def scope_region(gm: fx.GraphModule, scope: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the call_function nodes of module ``scope`` (and its children), minus ``exclude`` scopes."""
    def under(s, prefix):
        return s == prefix or s.startswith(prefix + ".")
    return [n.name for n in gm.graph.nodes if n.op == "call_function"
            and under(_scope(n), scope) and not any(under(_scope(n), e) for e in exclude)]


def region_between(first: fx.Node, last: fx.Node) -> list[str]:
    """Names of the nodes on a path from ``first`` to ``last`` (both included), in graph order. Visits
    only nodes between the two (O(region), not O(graph))."""
    down, stack = set(), [first]
    while stack:
        n = stack.pop()
        if n not in down and not n > last:
            down.add(n)
            stack.extend(n.users)
    up, stack = set(), [last]
    while stack:
        n = stack.pop()
        if n not in up and n in down:
            up.add(n)
            stack.extend(n.all_input_nodes)
    return [n.name for n in sorted(up)]


# --------------------------------------------------------------------------------------- analysis

def chunk_flow(gm: fx.GraphModule, region: list[str], dim: int) -> ChunkFlow:
    """Follow dim ``dim`` of the region's anchor through ``region``; :class:`ChunkError` if it cannot."""
    nodes = _region_nodes(gm, region)
    anchor = nodes[0].all_input_nodes[0]
    if not isinstance(_val(anchor), torch.Tensor):
        raise ChunkError(f"the region's anchor {anchor.name} (first input of {nodes[0].name}) is not a tensor")
    shape = _shape(anchor)
    if not -len(shape) <= dim < len(shape):
        raise ChunkError(f"dim {dim} is out of range for {anchor.name} of shape {tuple(shape)}")
    dims = {anchor: ChunkDim(dim % len(shape))}
    inside = set(nodes)
    while _sweep(nodes, dims):
        pass
    for n in nodes:
        _check_carried(n, dims)
    body = [n for n in nodes if n in dims or (_val(n) is None and any(a in dims for a in n.all_input_nodes))]
    members = set(body)
    inputs = list(dict.fromkeys(a for n in body for a in n.all_input_nodes if a not in members))
    outputs = [n for n in body if any(u not in members for u in n.users)]
    for n in outputs:
        if not isinstance(_val(n), torch.Tensor):
            raise ChunkError(f"region output {n.name} is not a tensor: add its users ({_names(n.users)}) to the region")
    _check_convex(gm, inputs, outputs, members, inside)
    for n in body:
        causal_queries(n, dims)  # raises if a causal query dim merges the axis with other dims
    return ChunkFlow(shape[dim], {n: d for n, d in dims.items() if n in members or n in inputs},
                     body, inputs, outputs)


def _sweep(nodes: list[fx.Node], dims: dict[fx.Node, ChunkDim]) -> bool:
    """One pass of forward and backward propagation over ``nodes``; True if it learned something."""
    changed = False
    for n in nodes:
        if _val(n) is None:
            continue
        for a in _reads(n):
            if a not in dims:
                continue
            if dims[a].reduced:
                raise ChunkError(f"cannot chunk {_where(a)}: it reduces the chunked axis and {n.name} uses its "
                                 "result inside the region (a reduction over the axis must end the region)")
            changed |= _claim(dims, n, _forward(n, a, dims[a]), a)
        if n in dims:
            for a, want in _backward(n, dims[n]).items():
                if want is not None:
                    changed |= _claim(dims, a, want, n)
                elif a in dims:
                    raise ChunkError(f"cannot chunk {_where(n)}: it needs {a.name} whole, but {a.name} carries "
                                     f"the chunked axis (dim {dims[a].pos}); compute it outside the region")
    return changed


def _claim(dims: dict, node: fx.Node, d: ChunkDim, via: fx.Node) -> bool:
    if node not in dims:
        dims[node] = d
        return True
    if dims[node] != d:
        raise ChunkError(f"{node.name} would carry the chunked axis both as {_show(dims[node])} and, through "
                         f"{via.name}, as {_show(d)}")
    return False


def _check_carried(n: fx.Node, dims: dict) -> None:
    """A per-chunk node must get the axis from an input: it cannot create it (arange, expand from 1)."""
    if n in dims and not any(a in dims for a in n.all_input_nodes):
        raise ChunkError(f"cannot chunk {_where(n)}: it creates the chunked axis (dim {dims[n].pos}) from "
                         "inputs that do not carry it; compute it outside the region")


def _check_convex(gm, inputs, outputs, members, inside) -> None:
    """The loop replaces the body at one point: every input must exist before the first outside user."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    users = [u for n in outputs for u in n.users if u not in members]
    last_in = max(inputs, key=order.get)
    first_user = min(users, key=order.get)
    if order[last_in] > order[first_user]:
        raise ChunkError(f"the region is not convex: {first_user.name} uses its output and runs before its input "
                         f"{last_in.name}" + (" (a region node that does not carry the axis)" if last_in in inside
                                              else "; add the nodes in between to the region"))


def _forward(node: fx.Node, src: fx.Node, d: ChunkDim) -> ChunkDim:
    """Where ``node``'s result carries the axis that its input ``src`` carries as ``d``."""
    if _op(node) in _VIEWS:
        got = _refactor(_shape(src), _shape(node), d)
        if got is None:
            raise ChunkError(f"cannot chunk {_where(node)}: the view {tuple(_shape(src))} -> {tuple(_shape(node))} "
                             f"splits the chunked axis (dim {d.pos} of {src.name})")
        return got
    rule = _rule_of(node)
    for o, entry in rule.dims.items():
        if entry.get(src) == d.pos:
            if o in rule.reduced:
                return d._replace(pos=o, reduced=True)
            return d._replace(pos=rule.kept.index(o) if rule.kept is not None else o)
    raise ChunkError(f"cannot chunk {_where(node)}: it reduces or mixes dim {d.pos} of {src.name} (the chunked axis)")


def _backward(node: fx.Node, d: ChunkDim) -> dict[fx.Node, ChunkDim | None]:
    """Where each tensor input of ``node`` must carry the axis for its result to carry it as ``d``."""
    if _op(node) in _VIEWS:
        src = node.args[0]
        got = _refactor(_shape(node), _shape(src), d._replace(reduced=False))
        if got is None:
            raise ChunkError(f"cannot chunk {_where(node)}: the view {tuple(_shape(src))} -> {tuple(_shape(node))} "
                             f"merges the chunked axis (dim {d.pos}) across input dims")
        return {src: got}
    rule = _rule_of(node)
    o = d.pos if d.reduced or rule.kept is None else rule.kept[d.pos]
    if o not in rule.dims:
        raise ChunkError(f"cannot chunk {_where(node)}: its dim {d.pos} mixes several input dims")
    entry = rule.dims[o]
    return {a: (ChunkDim(entry[a], d.outer, d.inner) if a in entry else None) for a in _reads(node)}


def _refactor(src: tuple, dst: tuple, d: ChunkDim) -> ChunkDim | None:
    """The ChunkDim of a view of shape ``dst`` of a tensor of shape ``src`` carrying the axis as ``d``, or
    None if the view splits the axis. In row-major order the axis sits between ``before`` and ``after``
    elements; the dst dim that holds it is the one whose leading and trailing products divide those."""
    axis = src[d.pos] // (d.outer * d.inner)
    before = math.prod(src[:d.pos]) * d.outer
    after = d.inner * math.prod(src[d.pos + 1:])
    for e in range(len(dst)):
        lead, trail = math.prod(dst[:e]), math.prod(dst[e + 1:])
        if before % lead == 0 and after % trail == 0 and dst[e] == before // lead * axis * (after // trail):
            return ChunkDim(e, before // lead, after // trail)
    return None


# --------------------------------------------------------------------------------------- op rules

_VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze.dim", "squeeze.dims"}
_UNARY = {"to", "_to_copy", "type_as", "dropout", "contiguous", "alias", "detach", "clone", "lift_fresh_copy",
          "zeros_like", "ones_like", "full_like"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax"}
_SPLITS = {"split", "split_with_sizes", "chunk"}


def _reads(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values the op reads (``type_as``/``to`` read only the other's dtype)."""
    return node.args[:1] if _op(node) in _UNARY else node.all_input_nodes


def _rule_of(node: fx.Node) -> _Rule:
    rule = _rule(node)
    if rule is None:
        raise ChunkError(f"cannot chunk {_where(node)}: no chunking rule for this op")
    return rule


def _rule(node: fx.Node) -> _Rule | None:
    """The dim correspondence of ``node``'s op (see :class:`_Rule`); None for an op without a rule."""
    op, out = _op(node), _shape(node)
    if op == "getitem":
        return _Rule({o: {node.args[0]: o} for o in range(len(out))})
    if op in _UNARY:
        return _Rule(_aligned(out, [node.args[0]]))
    if op == "expand" or torch.Tag.pointwise in getattr(node.target, "tags", ()):
        return _Rule(_aligned(out, node.all_input_nodes))
    kw = _kwargs(node)
    rank = len(out)
    if op in ("linear", "embedding", "layer_norm", "rms_norm"):  # leading dims walk the rows, the last mix
        x = kw["indices"] if op == "embedding" else kw["input"]
        mixed = len(kw["normalized_shape"]) if op.endswith("norm") else 1
        return _Rule({o: {x: o} for o in range(rank - mixed)})
    if op in ("mm", "addmm", "bmm", "matmul"):
        return _matmul(node, kw, out)
    if op == "einsum":
        return _einsum(kw["equation"], kw["tensors"])
    if op == "scaled_dot_product_attention":
        return _attention(kw, out)
    if op in _SOFTMAX:
        return _Rule({o: {kw["input"]: o} for o in range(rank) if o != kw["dim"] % rank})
    if op in ("transpose", "permute", "t"):
        return _Rule({o: {kw["input"]: p} for o, p in enumerate(_permutation(op, kw, rank))})
    if op in ("select", "slice", "unbind") or op in _SPLITS:
        return _indexing(op, kw)
    if op == "broadcast_tensors":
        return _Rule(_aligned(out, kw["tensors"]))
    if op == "cat":
        d = kw["dim"] % rank
        return _Rule({o: {t: o for t in kw["tensors"]} for o in range(rank) if o != d})
    if op in ("sum", "mean"):
        x = kw["input"]
        return _reducing({o: {x: o} for o in range(len(_shape(x)))}, kw.get("dim"), kw.get("keepdim", False))
    if op == "mse_loss":
        a, b = kw["input"], kw["target"]
        return _loss(_aligned(torch.broadcast_shapes(_shape(a), _shape(b)), [a, b]), kw["reduction"])
    if op == "cross_entropy_loss" and kw["weight"] is None and not _val(kw["target"]).is_floating_point():
        x, t = kw["input"], kw["target"]
        return _loss({o: {x: o + (o > 0), t: o} for o in range(len(_shape(t)))}, kw["reduction"])
    return None


def _aligned(out, operands: list[fx.Node], shapes: list | None = None) -> dict:
    """Broadcasting (right-aligned): result dim o walks dim o - len(out) + len(shape) of each operand that
    has it with the same size; an operand of size 1 there is broadcast. Other sizes make o mixed (None)."""
    shapes = shapes or [_shape(t) for t in operands]
    dims = {}
    for o, size in enumerate(out):
        entry = {}
        for t, shape in zip(operands, shapes):
            j = o - len(out) + len(shape)
            if j < 0 or shape[j] == 1 != size:
                continue
            if shape[j] != size or entry.get(t, j) != j:
                entry = None
                break
            entry[t] = j
        dims[o] = entry
    return dims


def _merge(*maps: dict) -> dict:
    """Union of dim maps; a dim mixed in any of them, or walking one input two ways, is dropped."""
    merged, bad = {}, set()
    for m in maps:
        for o, entry in m.items():
            if entry is None:
                bad.add(o)
                continue
            into = merged.setdefault(o, {})
            for t, j in entry.items():
                if into.setdefault(t, j) != j:
                    bad.add(o)
    return {o: e for o, e in merged.items() if o not in bad}


def _reducing(dims: dict, reduce=None, keepdim: bool = False) -> _Rule:
    """A sum or mean over the dims ``reduce`` (None or []: all) of a result indexed as ``dims``."""
    rank = len(dims)
    reduced = frozenset(range(rank)) if not reduce else frozenset(r % rank for r in reduce)
    kept = None if keepdim else tuple(o for o in range(rank) if o not in reduced)
    return _Rule(_merge(dims), reduced, kept)


def _loss(dims: dict, reduction: int) -> _Rule:
    """A loss is element-wise with reduction 'none' (0), else a sum or mean of everything."""
    return _Rule(_merge(dims)) if reduction == 0 else _reducing(dims)


def _matmul(node, kw, out) -> _Rule | None:
    a, b = kw.get("mat1", kw["input"]), kw.get("mat2", kw.get("other"))
    sa, sb, r = _shape(a), _shape(b), len(out)
    if len(sa) < 2 or len(sb) < 2:
        return None
    maps = [_aligned(out[:-2], [a, b], [sa[:-2], sb[:-2]]), {r - 2: {a: len(sa) - 2}, r - 1: {b: len(sb) - 1}}]
    if "mat1" in kw:  # addmm's bias
        maps.append(_aligned(out, [kw["input"]]))
    return _Rule(_merge(*maps))


def _einsum(equation: str, tensors: list[fx.Node]) -> _Rule | None:
    equation = equation.replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    ins, out = equation.split("->")
    terms = ins.split(",")
    return _Rule(_merge(*({o: ({t: term.index(c)} if term.count(c) == 1 else None) for o, c in enumerate(out)
                           if c in term} for t, term in zip(tensors, terms))))


def _attention(kw, out) -> _Rule:
    """Batch dims walk q, k, v and the mask; the query dim walks q and the mask; the last dim walks v."""
    q, k, v, mask = kw["query"], kw["key"], kw["value"], kw["attn_mask"]
    r = len(out)
    maps = [_aligned(out[:-2], [q, k, v], [_shape(t)[:-2] for t in (q, k, v)]),
            {r - 2: {q: len(_shape(q)) - 2}, r - 1: {v: len(_shape(v)) - 1}}]
    if mask is not None:
        maps.append(_aligned(out[:-1], [mask], [_shape(mask)[:-1]]))
    return _Rule(_merge(*maps))


def _permutation(op, kw, rank) -> list[int]:
    if op == "permute":
        return [p % rank for p in kw["dims"]]
    perm = list(range(rank))
    i, j = (0, 1) if op == "t" else (kw["dim0"] % rank, kw["dim1"] % rank)
    perm[i], perm[j] = perm[j], perm[i]
    return perm


def _indexing(op, kw) -> _Rule:
    """select/unbind drop ``dim``; slice/split keep it but cut it (a full slice is the identity)."""
    x = kw["input"]
    shape = _shape(x)
    d = kw.get("dim", 0) % len(shape)
    if op in ("select", "unbind"):
        return _Rule({o: {x: o + (o >= d)} for o in range(len(shape) - 1)})
    full = (op == "slice" and kw["start"] in (None, 0) and kw["step"] == 1
            and (kw["end"] is None or kw["end"] >= shape[d]))
    return _Rule({o: {x: o} for o in range(len(shape)) if full or o != d})


# ops whose mean the rewrite splits into (sum, count) parts per chunk (``passes.chunk`` has one part
# function per entry): a mean, and a cross-entropy or MSE with reduction "mean"
MEAN_OPS = (aten.mean.default, aten.mean.dim, aten.cross_entropy_loss.default, aten.mse_loss.default)


def reduction_kind(node: fx.Node) -> str:
    """"mean" for a mean or a mean-reduced loss (the body returns (sum, count) parts), else "sum"."""
    if node.target in (aten.mean.default, aten.mean.dim):
        return "mean"
    return "mean" if node.target in MEAN_OPS and _kwargs(node)["reduction"] == 1 else "sum"



def causal_queries(n: fx.Node, dims: dict) -> bool:
    """A causal attention whose query rows are chunked (its mask depends on the chunk's offset)."""
    if _op(n) != "scaled_dot_product_attention" or n not in dims:
        return False
    kw = _kwargs(n)
    d = dims[n]
    if not kw["is_causal"] or d.pos != len(_shape(n)) - 2:
        return False
    if d.outer != 1 or d.inner != 1:
        raise ChunkError(f"cannot chunk {_where(n)}: its causal query dim merges the chunked axis with other dims")
    return True



# --------------------------------------------------------------------------------------- helpers

def _region_nodes(gm: fx.GraphModule, region: list[str]) -> list[fx.Node]:
    if not region:
        raise ChunkError("empty region")
    by_name = {n.name: n for n in gm.graph.nodes}
    missing = [r for r in region if r not in by_name]
    if missing:
        raise ChunkError(f"region names unknown nodes: {missing}")
    wanted = set(region)
    nodes = [n for n in gm.graph.nodes if n.name in wanted]
    bad = [n.name for n in nodes if n.op != "call_function"]
    if bad:
        raise ChunkError(f"a region holds call_function nodes only, not {bad}")
    return nodes


def _op(node: fx.Node) -> str:
    """Short op name; squeeze keeps its overload (squeeze.default squeezes every size-1 dim)."""
    if node.op != "call_function":
        return node.op
    if node.target is operator.getitem:
        return "getitem"
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return getattr(node.target, "__name__", str(node.target))
    name = schema.name.split("::")[-1]
    return f"squeeze.{node.target._overloadname}" if name == "squeeze" else name


def _kwargs(node: fx.Node) -> dict:
    """All arguments of an aten op by schema name, defaults filled in."""
    return normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs


def _val(node: fx.Node):
    if node.op == "get_attr":
        return attrgetter(node.target)(node.graph.owning_module)
    return node.meta.get("val")


def _shape(node: fx.Node) -> tuple:
    val = _val(node)
    if isinstance(val, (list, tuple)):
        val = val[0]
    return tuple(val.shape)


def _scope(node: fx.Node) -> str:
    """The node's module path: its NodeInfo scope, the scope a pass gave the call it outlined a region
    into (``meta["scope"]``), else the innermost entry of ``nn_module_stack`` (what ``planner.capture``
    derives the scope from; nodes a pass inserted may have only that)."""
    info = node.meta.get("autopar")
    if info is not None:
        return info.scope
    if "scope" in node.meta:
        return node.meta["scope"]
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    return path[len("L['self']"):].lstrip(".") if path.startswith("L['self']") else path


def _where(node: fx.Node) -> str:
    return f"{node.name} ({_op(node)})"


def _show(d: ChunkDim) -> str:
    extra = f" (merged: {d.outer} x axis x {d.inner})" if d.outer * d.inner > 1 else ""
    return f"dim {d.pos}{extra}" + (" reduced" if d.reduced else "")


def _names(nodes) -> str:
    return ", ".join(n.name for n in nodes)

