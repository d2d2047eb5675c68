"""apply_dsp: Dynamic Sequence Parallelism (DSP, arXiv 2403.10266) for a spatial-temporal transformer.

Inputs arrive sharded on the temporal dim (every tensor input is [B, T, ...] and each of the P ranks
holds T/P frames: :func:`shard_inputs`). Everything position-wise and the spatial attention (over N,
batch B*T) stays local. A repeated block (``blocks.3``) whose attention mixes over the sharded axis
is a temporal block: its inputs are switched from T to N sharding with one all-to-all at the block
boundary, and its outputs back from N to T (on the [B, T, N, hidden] residual stream, the smallest
activation of the block: qkv is 3x and the MLP 4x wider). Parameters stay replicated, view/reshape
sizes become local, a replicated operand added to a T-sharded tensor (the temporal position
embedding) is narrowed to this rank's frames, and the mean loss becomes the local mean.

    >>> mg = capture(model, (x, target))                                         # doctest: +SKIP
    >>> dsp = DSPModule(apply_dsp(mg.gm, group, P, rank), group)                 # doctest: +SKIP
    >>> loss = dsp(*shard_inputs((x, target), P, rank))  # value: the global loss # doctest: +SKIP
    >>> loss.backward()                   # grads averaged over the group: exact # doctest: +SKIP

Communication per training step, bytes sent per rank (e = element size, L_t = temporal blocks =
depth // 2 in examples.dit, activation [B, T, N, hidden] with T/P of it on each rank):

    all_to_all   4 · L_t · (P-1)/P · B·T·N·hidden·e / P     (2 switches forward + 2 backward per
                                                             temporal block, DESIGN §4 all-to-all)
    all_reduce   2 (P-1)/P · (param_bytes + e)               (gradient average, as in data
                                                             parallelism, + the scalar loss report)

e.g. dit-xl (B=1, T=16, N=1024, hidden=1152, L_t=14), bf16, P=8: 56 all-to-alls of 4,718,592 B held
per rank, 231,211,008 B sent per rank per step (the block-internal activations never move).

Limitations: tensor inputs must all be [B, T, ...]; attention masks, dropout, and reductions other
than a mean loss are refused (``BadInput``); two consecutive temporal blocks still switch back and
forth between them.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
import torch.fx as fx

from runtime.collectives import all_reduce_mean_scalar
from runtime.dp import GradSync
from runtime.dsp import SwitchShard
from search.errors import BadInput
from search.placement import op_name

__all__ = ["Split", "apply_dsp", "shard_inputs", "DSPModule"]

TEMPORAL, SPATIAL = 1, 2  # dims of T and N in the inputs and in the residual stream between blocks
_VIEWS = {"view", "reshape", "_unsafe_view"}
_ELEMENTWISE = {"add", "sub", "mul", "div", "where", "gelu", "silu", "relu", "tanh", "sigmoid", "neg", "exp",
                "rsqrt", "sqrt", "pow", "erf", "abs", "clone", "contiguous", "alias", "detach", "_to_copy", "to"}


class Split(NamedTuple):
    """The sharded axis (global ``size``) lies in tensor dim ``dim``; ``inner`` is the product of the
    sizes merged into ``dim`` to the right of the axis (1: the axis is the innermost factor)."""

    dim: int
    size: int
    inner: int = 1


class _MixesShardedAxis(Exception):
    """An attention's sequence dimension holds the sharded axis (apply_dsp then switches its block)."""

    def __init__(self, node: fx.Node, placement: dict):
        super().__init__(node.name)
        self.node, self.placement = node, placement


def shard_inputs(args: tuple, degree: int, rank: int) -> tuple:
    """This rank's frames of every tensor input: dim 1 (T) split ``degree`` ways (BadInput if uneven)."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            if a.dim() < 2 or a.shape[TEMPORAL] % degree:
                raise BadInput(f"DSP input {i} has shape {tuple(a.shape)}: expected [B, T, ...] with T divisible "
                               f"by the DSP degree {degree}")
            a = a.chunk(degree, dim=TEMPORAL)[rank]
        out.append(a)
    return tuple(out)


def apply_dsp(gm: fx.GraphModule, group, degree: int, rank: int) -> fx.GraphModule:
    """Rewrite ``gm`` (captured on the global [B, T, N, C] inputs) in place for DSP rank ``rank`` of
    ``degree``; ``group`` is the DSP process group. BadInput when T or N is not divisible by ``degree``."""
    T, N = _axis_sizes(gm, degree)
    if degree == 1:
        return gm
    switched: set[str] = set()
    while True:
        try:
            placement, narrows = _propagate(gm, T)
            break
        except _MixesShardedAxis as mix:
            block = _block_of(mix.node)
            if block is None or block in switched:
                raise BadInput(f"DSP: attention {mix.node.name} ({_where(mix.node)}) mixes over the sharded "
                               "axis and is not inside a repeated block that can be switched to N sharding") from None
            _switch_block(gm, block, mix.placement, group, N, len(switched))
            switched.add(block)
    _localize(gm, placement, narrows, degree, rank)
    gm.graph.lint()
    gm.recompile()
    return gm


class DSPModule(torch.nn.Module):
    """Runs the rewritten graph on this rank's input shards. A scalar output (the local mean loss) is
    returned with the value of the mean over ranks (equal shards: the global loss) and the gradient of
    the local loss; parameter gradients are averaged over ``group`` when backward ends, which makes
    them the gradients of the global loss."""

    def __init__(self, gm: fx.GraphModule, group):
        super().__init__()
        self.gm = gm
        self.group = group
        self.grad_sync = GradSync([p for p in gm.parameters() if p.requires_grad], group)

    def forward(self, *local_args):
        out = self.gm(*local_args)
        if isinstance(out, torch.Tensor) and out.dim() == 0:
            return out + (all_reduce_mean_scalar(out, self.group) - out.detach())
        return out


# --- analysis ----------------------------------------------------------------------------------------

def _axis_sizes(gm: fx.GraphModule, degree: int) -> tuple[int, int]:
    """T and N of the tensor inputs (the first is [B, T, N, ...], every one [B, T, ...]); BadInput
    unless both divide by ``degree``."""
    shapes = {n.name: _shape(n) for n in gm.graph.find_nodes(op="placeholder") if _shape(n) is not None}
    if not shapes:
        raise BadInput("DSP: the graph has no tensor input")
    name, first = next(iter(shapes.items()))
    if len(first) < 3:
        raise BadInput(f"DSP input {name} has shape {first}: expected [B, T, N, ...]")
    T, N = first[TEMPORAL], first[SPATIAL]
    for other, shape in shapes.items():
        if len(shape) < 2 or shape[TEMPORAL] != T:
            raise BadInput(f"DSP input {other} has shape {shape}: every tensor input must be [B, T = {T}, ...]")
    for axis, size in (("T (frames)", T), ("N (spatial tokens)", N)):
        if size % degree:
            raise BadInput(f"DSP degree {degree} does not divide {axis} = {size} of input {name} {first}: "
                           f"pick a degree that divides both T = {T} and N = {N}")
    return T, N


def _propagate(gm: fx.GraphModule, T: int) -> tuple[dict, list]:
    """Placement of every node (Split, None = replicated, or a tuple for list outputs) and the
    replicated operands to narrow to this rank's part: [(user, operand, dim)]. Raises
    ``_MixesShardedAxis`` at the first attention over the sharded axis, BadInput at an unsupported op."""
    placement: dict[fx.Node, object] = {}
    narrows: list[tuple[fx.Node, fx.Node, int]] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            placement[node] = Split(TEMPORAL, T) if _shape(node) is not None else None
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), SwitchShard):
            sw, shape = gm.get_submodule(node.target), _shape(node)
            _require(placement[node.args[0]] == Split(sw.from_dim, shape[sw.from_dim]), node,
                     f"switches a tensor that is not sharded on dim {sw.from_dim} alone")
            placement[node] = Split(sw.to_dim, shape[sw.to_dim])
        elif node.op == "call_function":
            ins = {a: placement.get(a) for a in node.all_input_nodes}
            if not any(ins.values()):
                placement[node] = None
            elif op_name(node) == "scaled_dot_product_attention" and _mixes(node, ins[node.args[0]]):
                raise _MixesShardedAxis(node, placement)
            else:
                placement[node] = _rule(node, ins, narrows)
        else:
            placement[node] = None
    return placement, narrows


def _rule(node: fx.Node, ins: dict, narrows: list):
    """Output placement of ``node``, given that some input is sharded."""
    op = op_name(node)
    x = ins.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    if op == "getitem":
        return x[node.args[1]]
    if op in _VIEWS:
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
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(_shape(node.args[0]))
        _require(dim != x.dim, node, "unbinds the sharded dim")
        return tuple(x._replace(dim=x.dim - int(dim < x.dim)) for _ in node.meta["val"])
    if op == "linear":
        _require(x.dim != len(_shape(node)) - 1 and not any(ins.get(a) for a in node.args[1:]), node,
                 "contracts over the sharded dim")
        return x
    if op == "layer_norm":
        _require(x.dim < len(_shape(node)) - len(node.args[1]) and not any(ins.get(a) for a in node.args[2:4]),
                 node, "normalizes over the sharded dim")
        return x
    if op == "scaled_dot_product_attention":
        _require(len(node.args) < 4 and node.kwargs.get("attn_mask") is None, node, "has an attention mask")
        return _elementwise(node, node.args[:3], ins, narrows)
    if op == "broadcast_tensors":
        out = _elementwise(node, node.args[0], ins, narrows)
        return tuple(out for _ in node.args[0])
    if op == "mse_loss":
        _require(_reduction(node) == 1, node, "is not a mean reduction")
        _elementwise(node, node.all_input_nodes, ins, narrows)
        return None  # this rank's mean: the mean over equal shards is the global loss
    if op in _ELEMENTWISE:
        return _elementwise(node, node.all_input_nodes, ins, narrows)
    raise BadInput(f"DSP cannot keep {op} local: node {node.name} ({_where(node)}) reads a tensor sharded "
                   "on the sequence; supported: views, permutes, linear, layer_norm, attention over an unsharded "
                   "axis, element-wise ops and a mean MSE loss")


def _mixes(node: fx.Node, q: Split) -> bool:
    return q.dim >= len(_shape(node.args[0])) - 2


def _reduction(node: fx.Node) -> int:
    return node.kwargs.get("reduction", node.args[2] if len(node.args) > 2 else 1)


def _elementwise(node: fx.Node, operands, ins: dict, narrows: list) -> Split:
    """Broadcast operands aligned on the right: sharded ones must agree; a replicated one that is not
    size 1 on the sharded dim is narrowed, which needs the dim to be exactly the axis."""
    ndim = max(len(_shape(a)) for a in operands)
    aligned = {ins[a]._replace(dim=ins[a].dim + ndim - len(_shape(a))) for a in operands if ins.get(a)}
    _require(len(aligned) == 1, node, "mixes differently sharded operands")
    (split,) = aligned
    for a in operands:
        dim = split.dim - (ndim - len(_shape(a)))
        if ins.get(a) or dim < 0 or _shape(a)[dim] == 1:
            continue
        _require(_shape(a)[dim] == split.size and split.inner == 1, node,
                 "broadcasts a replicated operand over a merged sharded dim")
        narrows.append((node, a, dim))
    return split


def _view_split(src: tuple, dst: tuple, x: Split, node: fx.Node) -> Split:
    """Where the sharded axis lands after viewing ``src`` as ``dst`` (row-major logical strides)."""
    axis_stride = x.inner * math.prod(src[x.dim + 1:])
    for dim, size in enumerate(dst):
        stride = math.prod(dst[dim + 1:])
        if size > 1 and axis_stride % stride == 0 and axis_stride * x.size <= stride * size:
            return Split(dim, x.size, axis_stride // stride)
    raise BadInput(f"DSP: {node.name} ({_where(node)}) views {src} as {dst}, splitting the sharded axis of "
                   f"size {x.size} across dims")


def _block_of(node: fx.Node) -> str | None:
    """The outermost repeated-block scope (``blocks.3``) of ``node``, or None."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        path = re.sub(r"^L\['self'\]\.?", "", str(path))
        if re.search(r"\.\d+$", path):
            return path
    return None


# --- rewrite -----------------------------------------------------------------------------------------

def _switch_block(gm: fx.GraphModule, block: str, placement: dict, group, N: int, index: int) -> None:
    """Switch the block's sharded inputs from T to N sharding and its outputs back to T."""
    graph = gm.graph
    inside = {n for n in graph.nodes if n.op == "call_function" and _block_of(n) == block}
    to_n, to_t = f"dsp_to_spatial_{index}", f"dsp_to_temporal_{index}"
    gm.add_module(to_n, SwitchShard(group, TEMPORAL, SPATIAL))
    gm.add_module(to_t, SwitchShard(group, SPATIAL, TEMPORAL))
    sources = {a for n in inside for a in n.all_input_nodes if a not in inside and placement.get(a)}
    for src in sources:
        _require(placement[src] == Split(TEMPORAL, _shape(src)[TEMPORAL]) and _shape(src)[SPATIAL] == N, src,
                 f"enters {block} without the [B, T, N, ...] layout, so it cannot switch to N sharding")
        _insert_after(src, to_n, lambda user: user in inside)
    for out in [n for n in inside if any(u not in inside for u in n.users)]:
        _insert_after(out, to_t, lambda user: user not in inside)


def _insert_after(src: fx.Node, module: str, rewire) -> None:
    with src.graph.inserting_after(src):
        new = src.graph.call_module(module, (src,))
    new.meta["val"] = src.meta["val"]  # a switch keeps the global shape
    src.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new and rewire(user))


def _localize(gm: fx.GraphModule, placement: dict, narrows: list, degree: int, rank: int) -> None:
    """Local view/reshape sizes; replicated operands narrowed to this rank's part of the axis; the
    export's input guards (they check the global shapes) dropped."""
    for guard in gm.graph.find_nodes(op="call_module", target="_guards_fn"):
        gm.graph.erase_node(guard)
    for node, split in placement.items():
        if node.op == "call_function" and op_name(node) in _VIEWS and split:
            local = list(_shape(node))
            local[split.dim] //= degree
            node.args = (node.args[0], local)
    for user, operand, dim in narrows:
        n = _shape(operand)[dim] // degree
        with gm.graph.inserting_before(user):
            part = gm.graph.call_function(torch.ops.aten.narrow.default, (operand, dim, rank * n, n))
        user.replace_input_with(operand, part)


# --- helpers -----------------------------------------------------------------------------------------

def _shape(node) -> tuple[int, ...] | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(d) for d in v.shape) if isinstance(v, torch.Tensor) else None


def _where(node: fx.Node) -> str:
    stack = node.meta.get("stack_trace") or ""
    lines = re.findall(r'File "([^"]+)", line (\d+)', stack)
    return f"{lines[-1][0].rsplit('/', 1)[-1]}:{lines[-1][1]}" if lines else op_name(node)


def _require(ok: bool, node: fx.Node, what: str) -> None:
    if not ok:
        raise BadInput(f"DSP: {node.name} ({_where(node)}) {what}")
