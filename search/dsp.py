"""DSP layout: where a spatial-temporal model holds which frames or tokens under Dynamic Sequence Parallelism.

One rule set with two users, like ``search.seqshard``: the planner prices DSP with it
(:func:`dsp_traffic`), and ``passes.dsp`` applies exactly this layout, so what is priced is what runs.
Pure analysis: the graph is read, never changed.

DSP (arXiv 2403.10266) shards a [B, T, N, ...] model on one of its two sequence axes at a time. The
inputs arrive T-sharded (each of the P ranks holds T/P frames: ``x.chunk(P, dim=1)[rank]``).
Everything position-wise and the spatial attention (over N, batch B*T) stays local. A repeated block
(scope ``blocks.3``) whose attention mixes over the sharded axis is *switched*: a T-sharded value
entering it from outside is switched to N sharding (one all-to-all, "to_spatial"), and a value it
produces that is used outside is switched back to T sharding ("to_temporal"); a value passing
directly from one switched block into another stays N-sharded. Parameters stay replicated, view
sizes become local, a replicated operand broadcast against the sharded axis (a position embedding)
is narrowed to this rank's part, and a mean loss is this rank's mean (equal shards: the mean over
ranks is the global loss).

A placement is ``None`` (replicated), :class:`Split` or, for a tuple output (``unbind``), a tuple of
them. Anything else makes the graph :class:`Unsupported` with the node named.

    >>> layout = dsp_layout(mg.gm, degree=4)                    # doctest: +SKIP
    >>> layout.switched, [(e.source, e.direction) for e in layout.switches]   # doctest: +SKIP
    (['blocks.1', 'blocks.3'], [('add_3', 'to_spatial'), ('add_5', 'to_temporal'), ...])
    >>> forward_bytes, backward_bytes = dsp_traffic(layout, 4)  # doctest: +SKIP
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch.fx as fx

from search.placement import _shape, op_name
from search.seqshard import Unsupported

__all__ = ["Split", "SwitchEdge", "DSPLayout", "Unsupported", "dsp_layout", "dsp_traffic", "block_of",
           "TEMPORAL", "SPATIAL", "VIEWS"]

TEMPORAL, SPATIAL = 1, 2  # dims of T and N in the inputs and in the [B, T, N, hidden] residual stream
VIEWS = {"view", "reshape", "_unsafe_view"}
_ELEMENTWISE = {"add", "sub", "mul", "div", "where", "gelu", "silu", "relu", "tanh", "sigmoid", "neg", "exp",
                "rsqrt", "sqrt", "pow", "erf", "abs", "clone", "contiguous", "alias", "detach", "_to_copy", "to"}


class Split(NamedTuple):
    """The sharded axis (global ``size``) lies in tensor dim ``dim``; ``inner`` is the product of the
    sizes merged into ``dim`` to the right of the axis (1: the axis is the innermost factor)."""

    dim: int
    size: int
    inner: int = 1


class SwitchEdge(NamedTuple):
    """One all-to-all: ``source``'s value re-sharded for its ``users`` (node names)."""

    source: str             # the node whose value is switched
    block: str              # the switched block it enters (to_spatial) or leaves (to_temporal)
    direction: str          # "to_spatial" (T -> N sharding) or "to_temporal" (N -> T sharding)
    nbytes: int             # global bytes of the value (node.meta["val"]); each rank holds nbytes / P
    users: tuple[str, ...]  # the nodes that read the switched value instead of the source (graph order)
    grad: bool = True       # the value depends on a trainable parameter: its gradient switches back


@dataclass
class DSPLayout:
    """Result of :func:`dsp_layout` (node names throughout)."""

    degree: int
    frames: int                                                   # T
    tokens: int                                                   # N
    inputs: list[str] = field(default_factory=list)               # T-sharded placeholders (dim 1)
    placement: dict[str, Split | tuple | None] = field(default_factory=dict)  # in the node's own block
    narrows: list[tuple[str, str, int]] = field(default_factory=list)  # (user, replicated operand, dim)
    switched: list[str] = field(default_factory=list)             # switched blocks, in graph order
    switches: list[SwitchEdge] = field(default_factory=list)      # in graph order of the first user
    loss: str | None = None                                       # the mean-loss node (a local mean)


class _Mixes(Exception):
    """An attention outside any switched block mixes over the sharded axis: its block must switch."""

    def __init__(self, node: fx.Node):
        super().__init__(node.name)
        self.node = node


def dsp_layout(gm: fx.GraphModule, degree: int) -> DSPLayout:
    """The DSP layout of ``gm`` (captured on the global [B, T, N, ...] inputs) for ``degree`` ranks.
    :class:`Unsupported` (message names the node) when DSP cannot apply, including T or N not
    divisible by ``degree`` and a graph without a [B, T, N, ...] input. ``gm`` is not changed."""
    T, N, inputs = _axes(gm, degree)
    state = _State(gm, T, N)
    nodes = state.nodes
    first = {}  # block -> index of its first node
    for i, node in enumerate(nodes):
        if state.block[node] is not None:
            first.setdefault(state.block[node], i)
    switched: list[str] = []
    i = 0
    while i < len(nodes):
        try:
            state.visit(nodes[i])
            i += 1
        except _Mixes as mix:
            block = state.block[mix.node]
            if block is None or block in state.switched:
                where = "is not inside a repeated block" if block is None else f"is in {block}, which is already switched"
                raise Unsupported(f"DSP: attention {mix.node.name} ({_where(mix.node)}) mixes over the sharded axis "
                                  f"and {where}; DSP switches whole repeated blocks between T and N "
                                  "sharding") from None
            switched.append(block)
            state.switched.add(block)
            i = first[block]  # nodes before the block are unaffected by switching it: resume there
    layout = DSPLayout(degree=degree, frames=T, tokens=N, inputs=inputs,
                       switched=sorted(switched, key=first.__getitem__), loss=state.loss)
    edges: dict[tuple[str, str, str], list[str]] = {}
    for node in nodes:
        layout.placement[node.name] = state.place.get(node)
        layout.narrows += [(node.name, operand.name, dim) for operand, dim in state.narrows.get(node, ())]
        for src, block, direction in state.edges.get(node, ()):
            users = edges.setdefault((src.name, block, direction), [])
            if node.name not in users:
                users.append(node.name)
    by_name = {n.name: n for n in nodes}
    layout.switches = [SwitchEdge(src, block, direction, _nbytes(by_name[src]), tuple(users),
                                  by_name[src] in state.needs_grad)
                       for (src, block, direction), users in edges.items()]
    return layout


def dsp_traffic(layout: DSPLayout, degree: int) -> tuple[int, int]:
    """(forward, backward) bytes one rank sends per step for ``layout``'s switches on ``degree`` ranks.
    Every switch is one all-to-all of the 1/P of its value a rank holds, forward, and one of the same
    size on its gradient, backward; each sends (P-1)/P of it (DESIGN §4, ``runtime.collectives``):

        per switch and direction:  (P - 1) * (nbytes // P) // P        (integers, as comm_stats counts)

    Backward counts only switches with ``grad`` (no gradient flows into a constant's switch).
    """
    if degree <= 1:
        return 0, 0
    per = [(degree - 1) * (e.nbytes // degree) // degree for e in layout.switches]
    return sum(per), sum(b for b, e in zip(per, layout.switches) if e.grad)


def block_of(node: fx.Node) -> str | None:
    """The outermost repeated-block scope (``blocks.3``) of ``node``, or None."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        path = re.sub(r"^L\['self'\]\.?", "", str(path))
        if re.search(r"\.\d+$", path):
            return path
    return None


# --- propagation ---------------------------------------------------------------------------------------

class _State:
    """Placements under a growing set of switched blocks. Every per-node record is keyed by the node, so
    re-visiting a node (after its block was switched) replaces what the earlier visit recorded."""

    def __init__(self, gm: fx.GraphModule, T: int, N: int):
        self.gm, self.T, self.N = gm, T, N
        self.nodes = list(gm.graph.nodes)
        self.block = {n: block_of(n) if n.op == "call_function" else None for n in self.nodes}
        self.switched: set[str] = set()
        self.place: dict[fx.Node, object] = {}
        self.narrows: dict[fx.Node, list[tuple[fx.Node, int]]] = {}
        self.edges: dict[fx.Node, list[tuple[fx.Node, str, str]]] = {}  # consumer -> (source, block, direction)
        self.loss: str | None = None
        self.needs_grad: set[fx.Node] = set()  # nodes that depend on a trainable parameter
        for n in self.nodes:
            if n.op == "get_attr":
                attr = _attr(gm, n.target)
                if getattr(attr, "requires_grad", False):
                    self.needs_grad.add(n)
            elif n.op in ("call_function", "call_module") and any(a in self.needs_grad for a in n.all_input_nodes):
                self.needs_grad.add(n)

    def visit(self, node: fx.Node) -> None:
        self.narrows.pop(node, None)
        self.edges.pop(node, None)
        if self.loss == node.name:
            self.loss = None
        if node.op == "placeholder":
            shape = _shape(node)
            sharded = shape is not None and len(shape) >= 2 and shape[TEMPORAL] == self.T
            self.place[node] = Split(TEMPORAL, self.T) if sharded else None
            return
        ins = {a: self.seen(a, node) for a in node.all_input_nodes}
        if node.op == "output":
            for a, p in ins.items():
                _require(p is None, a, "reaches the model output holding one rank's frames or tokens; DSP trains "
                         "models that return a mean loss: pass the targets with the inputs")
            return
        if not any(ins.values()):
            self.place[node] = None
        elif node.op == "call_function":
            if op_name(node) == "scaled_dot_product_attention" and _mixes(node, ins[node.args[0]]):
                raise _Mixes(node)
            self.place[node] = self.rule(node, ins)
        else:  # a shape-preserving module another pass inserted (a collective)
            self.place[node] = ins[node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else None

    def domain(self, node: fx.Node) -> str | None:
        """The switched block ``node`` computes in (its values are N-sharded), or None (T-sharded)."""
        block = self.block[node]
        return block if block in self.switched else None

    def seen(self, value: fx.Node, user: fx.Node):
        """``value``'s placement as ``user`` reads it: switched when they compute in different
        domains (T-sharded outside switched blocks, N-sharded inside), recording the switch edge."""
        p = self.place.get(value)
        src, dst = self.domain(value), self.domain(user)
        if p is None or (src is None) == (dst is None):
            return p
        shape = _shape(value)
        layout_ok = shape is not None and len(shape) > SPATIAL and shape[TEMPORAL] == self.T and shape[SPATIAL] == self.N
        if dst is not None:
            _require(p == Split(TEMPORAL, self.T) and layout_ok, value,
                     f"enters the switched block {dst} (read by {user.name}) without the [B, T, N, ...] layout "
                     f"sharded on T (placement {p}), so it cannot switch to N sharding")
            self.edges.setdefault(user, []).append((value, dst, "to_spatial"))
            return Split(SPATIAL, self.N)
        _require(p == Split(SPATIAL, self.N) and layout_ok, value,
                 f"leaves the switched block {src} (read by {user.name}) without the [B, T, N, ...] layout "
                 f"sharded on N (placement {p}), so it cannot switch back to T sharding")
        self.edges.setdefault(user, []).append((value, src, "to_temporal"))
        return Split(TEMPORAL, self.T)

    def rule(self, node: fx.Node, ins: dict):
        """Output placement of ``node``, given that some input is sharded."""
        op = op_name(node)
        x = ins.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if op == "getitem":
            _require(_is_tuple(x), node, "indexes a sharded value that is not a tuple")
            return x[node.args[1]]
        _require(not _is_tuple(x), node, "reads a tuple of sharded values")
        if op in VIEWS:
            return _view_split(_shape(node.args[0]), _shape(node), x, node)
        if op == "permute":
            perm = [d % len(_shape(node)) for d in node.args[1]]
            return x._replace(dim=perm.index(x.dim))
        if op == "transpose":
            a, b = (d % len(_shape(node)) for d in node.args[1:3])
            return x._replace(dim={a: b, b: a}.get(x.dim, x.dim))
        if op == "unsqueeze":
            return x._replace(dim=x.dim + int(node.args[1] % len(_shape(node)) <= x.dim))
        if op == "unbind":
            dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(_shape(node.args[0]))
            _require(dim != x.dim, node, "unbinds the sharded dim")
            return tuple(x._replace(dim=x.dim - int(dim < x.dim)) for _ in node.meta["val"])
        if op == "linear":
            _require(x is not None and x.dim != len(_shape(node)) - 1 and not any(ins.get(a) for a in node.args[1:]),
                     node, "contracts over the sharded dim")
            return x
        if op == "layer_norm":
            _require(x is not None and x.dim < len(_shape(node)) - len(node.args[1])
                     and not any(ins.get(a) for a in node.args[2:4]), node, "normalizes over the sharded dim")
            return x
        if op == "scaled_dot_product_attention":
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
            _require(mask is None, node, "has an attention mask")
            _require(not dropout, node, f"has attention dropout {dropout} (set it to 0 for DSP)")
            return self.elementwise(node, node.args[:3], ins)
        if op == "broadcast_tensors":
            out = self.elementwise(node, node.args[0], ins)
            return tuple(out for _ in node.args[0])
        if op == "mse_loss":
            _require(_reduction(node) == 1, node, "is not a mean reduction")
            _require([u.op for u in node.users] == ["output"], node, "(the loss) is used inside the model")
            self.elementwise(node, node.all_input_nodes, ins)
            self.loss = node.name
            return None  # this rank's mean: the mean over equal shards is the global loss
        if op in _ELEMENTWISE:
            return self.elementwise(node, node.all_input_nodes, ins)
        raise Unsupported(f"DSP cannot keep {op} local: node {node.name} ({_where(node)}) reads a tensor sharded "
                          "on the sequence; supported: views, permutes, linear, layer_norm, attention over an "
                          "unsharded axis, element-wise ops and a mean MSE loss")

    def elementwise(self, node: fx.Node, operands, ins: dict) -> Split:
        """Broadcast operands aligned on the right: sharded ones must agree; a replicated one that is not
        size 1 on the sharded dim is narrowed, which needs the dim to be exactly the axis."""
        operands = [a for a in operands if isinstance(a, fx.Node) and _shape(a) is not None]
        ndim = max(len(_shape(a)) for a in operands)
        aligned = {ins[a]._replace(dim=ins[a].dim + ndim - len(_shape(a))) for a in operands if ins.get(a)}
        _require(len(aligned) == 1, node, "mixes differently sharded operands")
        (split,) = aligned
        for a in operands:
            dim = split.dim - (ndim - len(_shape(a)))
            if ins.get(a) or dim < 0 or _shape(a)[dim] == 1:
                continue
            _require(_shape(a)[dim] == split.size and split.inner == 1, node,
                     f"broadcasts the replicated {a.name} over a merged sharded dim")
            self.narrows.setdefault(node, []).append((a, dim))
        return split


# --- helpers -------------------------------------------------------------------------------------------

def _axes(gm: fx.GraphModule, degree: int) -> tuple[int, int, list[str]]:
    """T and N of the first tensor input ([B, T, N, ...]), and the inputs sharded on T (every tensor
    placeholder with T at dim 1). Unsupported unless ``degree`` divides both."""
    if degree < 1:
        raise Unsupported(f"DSP degree {degree}: must be at least 1")
    tensors = [n for n in gm.graph.find_nodes(op="placeholder") if _shape(n) is not None]
    if not tensors or len(_shape(tensors[0])) < 3:
        got = f"its first tensor input {tensors[0].name} has shape {_shape(tensors[0])}" if tensors else \
            "it has no tensor input"
        raise Unsupported(f"DSP needs a [B, T, N, ...] input (frames T, spatial tokens N) and {got}")
    first = tensors[0]
    T, N = _shape(first)[TEMPORAL], _shape(first)[SPATIAL]
    for axis, size in (("T (frames)", T), ("N (spatial tokens)", N)):
        if size % degree:
            raise Unsupported(f"DSP degree {degree} does not divide {axis} = {size} of input {first.name} "
                              f"{_shape(first)}: pick a degree that divides both T = {T} and N = {N}")
    inputs = [n.name for n in tensors if len(_shape(n)) >= 2 and _shape(n)[TEMPORAL] == T]
    return T, N, inputs


def _is_tuple(p) -> bool:
    """A tuple of placements (a tuple output), not a :class:`Split` (itself a NamedTuple)."""
    return isinstance(p, tuple) and not isinstance(p, Split)


def _mixes(node: fx.Node, q) -> bool:
    return isinstance(q, Split) and q.dim >= len(_shape(node.args[0])) - 2


def _reduction(node: fx.Node) -> int:
    return node.kwargs.get("reduction", node.args[2] if len(node.args) > 2 else 1)


def _view_split(src: tuple, dst: tuple, x: Split, node: fx.Node) -> Split:
    """Where the sharded axis lands after viewing ``src`` as ``dst`` (row-major logical strides)."""
    axis_stride = x.inner * math.prod(src[x.dim + 1:])
    for dim, size in enumerate(dst):
        stride = math.prod(dst[dim + 1:])
        if size > 1 and axis_stride % stride == 0 and axis_stride * x.size <= stride * size:
            return Split(dim, x.size, axis_stride // stride)
    raise Unsupported(f"DSP: {node.name} ({_where(node)}) views {src} as {dst}, splitting the sharded axis of "
                      f"size {x.size} across dims")


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _nbytes(node: fx.Node) -> int:
    v = node.meta["val"]
    return math.prod(int(d) for d in v.shape) * v.dtype.itemsize


def _where(node: fx.Node) -> str:
    stack = node.meta.get("stack_trace") or ""
    lines = re.findall(r'File "([^"]+)", line (\d+)', stack)
    return f"{lines[-1][0].rsplit('/', 1)[-1]}:{lines[-1][1]}" if lines else op_name(node)


def _require(ok: bool, node: fx.Node, what: str) -> None:
    if not ok:
        raise Unsupported(f"DSP: {node.name} ({_where(node)}) {what}")
