"""Tensor-parallel placement rules: which tensors are sharded, and how each op's arguments become local.

One rule set with two users: the search prices a Megatron layout with it, and ``passes.tp`` rewrites
the graph with it, so what is priced is what runs.

A value is replicated (``None``) or ``Shard(dim, groups)``: split on ``dim`` into ``t`` parts, where
``groups > 1`` means the dimension holds ``groups`` equal sections (a fused q|k|v projection) and each
section is split separately. A linear is *colwise* (weight split on its output features, output
``Shard(-1)``) or *rowwise* (input sharded on features, weight split on input features, output
all-reduced). Anything sharded that reaches an op with no rule makes the layout unsupported.

With ``sequence=True`` (Megatron sequence parallelism, Korthikanti et al.) the token-wise regions
between cones (residual adds, norms, dropout) hold this rank's contiguous 1/tp block of the sequence
(dim 1 of [B, S, H]): rowwise outputs are reduce-scattered instead of all-reduced, colwise inputs
all-gathered instead of copied, a replicated value is split where it first meets such a region and a
sequence-split value is all-gathered before any other op (``seq_*`` fields of :class:`Layout`).

    >>> styles = choose_styles(mg.gm, tp=2)                        # doctest: +SKIP
    >>> layout = propagate(mg.gm, styles, tp=2)                    # doctest: +SKIP
    >>> megatron_sp_nodes(mg.gm, styles, tp=2)                     # doctest: +SKIP
    ['add_1', 'layer_norm_1', ...]
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.fx as fx


class Shard(NamedTuple):
    dim: int
    groups: int = 1


class Unsupported(Exception):
    """A sharded value reached an op the rules cannot keep local."""


@dataclass
class Layout:
    """Result of propagation: per-node placement, the linears' styles and where collectives go."""

    tp: int
    styles: dict[str, tuple[str, int]]                   # module FQN -> ("colwise"|"rowwise", groups)
    placement: dict[str, Shard | None] = field(default_factory=dict)  # node name -> placement
    local_args: dict[str, tuple] = field(default_factory=dict)       # node name -> rewritten args
    copy_before: list[str] = field(default_factory=list)  # replicated inputs of colwise linears (bwd all-reduce)
    reduce_after: list[str] = field(default_factory=list)  # rowwise linears (fwd all-reduce of the output)
    param_shards: dict[str, tuple[int, int]] = field(default_factory=dict)  # param FQN -> (dim, groups)
    bias_after_reduce: dict[str, str] = field(default_factory=dict)  # rowwise node -> bias param FQN
    # sequence=True only (node names):
    seq_dims: dict[str, int] = field(default_factory=dict)  # values holding 1/tp of the sequence -> its dim
    gather_before: list[str] = field(default_factory=list)  # their colwise reads (fwd all-gather, bwd reduce-scatter)
    seq_gather: list[str] = field(default_factory=list)  # their other reads (fwd all-gather, bwd keep own block)
    seq_split: dict[str, int] = field(default_factory=dict)  # replicated -> dim split for 1/tp readers (bwd all-gather)
    seq_grad_sum: list[str] = field(default_factory=list)  # replicated non-token inputs of 1/tp readers (bwd all-reduce)


_POINTWISE = {
    "gelu", "silu", "relu", "tanh", "sigmoid", "dropout", "neg", "exp", "rsqrt", "sqrt", "pow", "to",
    "contiguous", "clone", "alias", "detach", "type_as", "_to_copy", "native_dropout", "erf", "abs",
    "add", "sub", "mul", "div", "where", "masked_fill", "__and__", "__or__", "eq", "ne", "lt", "le", "gt", "ge",
    "lift_fresh_copy", "copy",
}
_MATMUL_LINEAR = {"linear", "addmm"}


def op_name(node: fx.Node) -> str:
    target = node.target
    if hasattr(target, "_schema"):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def weight_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """FQN of the weight parameter of a linear/addmm node, or None."""
    op = op_name(node)
    if op not in _MATMUL_LINEAR:
        return None
    w = node.args[1] if op == "linear" else node.args[2]
    if isinstance(w, fx.Node) and w.op == "get_attr" and _is_param(gm, w.target):
        return w.target
    return None


def module_of(weight_fqn: str) -> str:
    return weight_fqn.rsplit(".", 1)[0] if "." in weight_fqn else weight_fqn


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return isinstance(obj, torch.nn.Parameter)


def _shape(n) -> tuple[int, ...] | None:
    if isinstance(n, fx.Node):
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            return tuple(int(d) for d in v.shape)
    return None


@dataclass(frozen=True)
class Cone:
    """One Megatron unit: colwise linears reading one input, the rowwise linears that close their
    sharded region, and the nodes whose work is split tp ways (region and closers)."""

    styles: tuple[tuple[str, tuple[str, int]], ...]   # (module FQN, (style, groups)) in graph order
    nodes: tuple[str, ...]                            # node names computed on 1/tp of the data

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(m for m, _ in self.styles)


def megatron_cones(gm: fx.GraphModule, tp: int, starts: set[fx.Node] | None = None) -> list[Cone]:
    """Every Megatron cone of ``gm`` for ``tp``, in graph order: replicated-input linears become
    colwise when their sharded cone closes cleanly at rowwise linears (attention: qkv -> proj,
    MLP: fc1 -> fc2); linears whose cone does not close stay replicated. Cones are disjoint, so
    any subset of them is a valid layout. ``starts`` limits which linears may open a cone (the
    search passes one instance per template and maps the cones to the others)."""
    if tp == 1:
        return []
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    decided: set[str] = set()
    styles: dict[str, tuple[str, int]] = {}
    cones: list[Cone] = []
    for node in nodes if starts is None else sorted(starts, key=index.__getitem__):
        w = weight_of(gm, node)
        if w is None or module_of(w) in decided:
            continue
        # linears reading the same input (q/k/v, gate/up) are sharded together or not at all
        x = _linear_input(node)
        siblings = [u for u in x.users if weight_of(gm, u) is not None and _linear_input(u) is x
                    and module_of(weight_of(gm, u)) not in decided]
        mine = {module_of(weight_of(gm, sib)): ("colwise", _split_groups(sib)) for sib in siblings}
        decided.update(mine)
        try:
            closers, placement = _propagate_cone(gm, siblings, {**styles, **mine}, tp, index)
        except Unsupported:
            continue
        for rowwise in closers:
            mine[module_of(weight_of(gm, rowwise))] = ("rowwise", 1)
        decided.update(mine)
        styles.update(mine)
        inside = [n for n, p in placement.items() if p is not None] + closers
        cones.append(Cone(styles=tuple(mine.items()), nodes=tuple(n.name for n in sorted(inside, key=index.get))))
    return cones


def choose_styles(gm: fx.GraphModule, tp: int) -> dict[str, tuple[str, int]]:
    """The full Megatron layout: every cone of :func:`megatron_cones` sharded."""
    return {m: style for cone in megatron_cones(gm, tp) for m, style in cone.styles}


def _linear_input(node: fx.Node) -> fx.Node:
    return node.args[0] if op_name(node) == "linear" else node.args[1]


def _split_groups(node: fx.Node) -> int:
    """A fused projection whose output is split into k equal parts on the last dim has k groups
    (views that keep the last dim, such as HF Conv1D's 2-D -> 3-D reshape, are looked through)."""
    shape = _shape(node)
    for user in node.users:
        op = op_name(user)
        if op in ("view", "reshape", "_unsafe_view") and _shape(user) and _shape(user)[-1] == shape[-1]:
            groups = _split_groups(user)
            if groups > 1:
                return groups
        if op in ("split", "chunk"):
            dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", 0)
            if dim in (-1, len(shape) - 1):
                if op == "chunk":
                    return int(user.args[1])
                size = user.args[1]
                if isinstance(size, int) and shape[-1] % size == 0:
                    return shape[-1] // size
    return 1


def _propagate_cone(gm, starts: list[fx.Node], styles, tp, index) -> tuple[list[fx.Node], dict]:
    """Propagate colwise ``starts`` forward; return the rowwise linears that close their cone and
    the placement of every node reached."""
    placement: dict[fx.Node, Shard | None] = {}
    heap = []
    for start in starts:
        placement[start], _ = _rule(gm, start, {}, styles, tp)
        heap += [(index[u], u.name, u) for u in start.users]
    heapq.heapify(heap)
    seen = set()
    closers = []
    while heap:
        _, _, node = heapq.heappop(heap)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "output":
            raise Unsupported("a sharded value reaches the model output")
        w = weight_of(gm, node)
        if w is not None and module_of(w) not in styles:
            styles = {**styles, module_of(w): ("rowwise", 1)}  # the sharded cone closes here
        out, _ = _rule(gm, node, placement, styles, tp)
        placement[node] = out
        if w is not None and styles[module_of(w)][0] == "rowwise":
            closers.append(node)
            continue
        if out is not None:
            for u in node.users:
                heapq.heappush(heap, (index[u], u.name, u))
    return closers, placement


def propagate(gm: fx.GraphModule, styles: dict[str, tuple[str, int]], tp: int, sequence: bool = False) -> Layout:
    """Placement of every node under ``styles``; raises :class:`Unsupported` where it cannot stay local.
    ``sequence=True`` adds Megatron sequence parallelism between the cones (module docstring)."""
    layout = Layout(tp=tp, styles=dict(styles))
    placement: dict[fx.Node, Shard | None] = {}
    copy_inputs: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            for a in node.all_input_nodes:
                if placement.get(a) is not None:
                    raise Unsupported(f"sharded value {a.name} reaches the model output")
            continue
        if node.op != "call_function":
            placement[node] = None
            continue
        out, new_args = _rule(gm, node, placement, styles, tp)
        placement[node] = out
        layout.placement[node.name] = out
        if new_args is not None:
            layout.local_args[node.name] = new_args
        w = weight_of(gm, node)
        if w is None or tp == 1 or module_of(w) not in styles:
            continue
        style, groups = styles[module_of(w)]
        op = op_name(node)
        x = _linear_input(node)
        bias = bias_of(node)
        if style == "colwise":
            copy_inputs[x.name] = None
            layout.param_shards[w] = (0 if op == "linear" else 1, groups)
            if bias is not None:
                layout.param_shards[bias.target] = (0, groups)
        else:
            layout.reduce_after.append(node.name)
            layout.param_shards[w] = (1 if op == "linear" else 0, 1)
            if bias is not None:
                layout.bias_after_reduce[node.name] = bias.target
    layout.copy_before = list(copy_inputs)
    if sequence and tp > 1:
        _sequence_layout(gm, layout)
    return layout


def megatron_sp_nodes(gm: fx.GraphModule, styles: dict[str, tuple[str, int]], tp: int) -> list[str]:
    """Nodes that run on 1/tp of the sequence under Megatron sequence parallelism (their activations
    and memory-bound work shrink by tp), in graph order. Rowwise linears are not listed: they belong
    to their cones (already split tp ways); only their reduced output is sequence-split."""
    layout = propagate(gm, styles, tp, sequence=True)
    closers = set(layout.reduce_after)
    return [n for n in layout.seq_dims if n not in closers]


_NORMS = {"layer_norm", "native_layer_norm", "rms_norm"}
_REDUCTIONS = {"mean", "sum", "amax"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax"}


def _sequence_layout(gm: fx.GraphModule, layout: Layout) -> None:
    """Fill the ``seq_*`` fields: grow the sequence-split regions from the rowwise outputs through
    token-wise ops, then name the boundaries and the collectives they need."""
    seq, split = _sequence_regions(gm, layout)
    names = {n.name for n in seq}
    layout.seq_dims = {n.name: d for n, d in seq.items()}
    layout.seq_split = {n.name: d for n, d in split.items()}
    layout.gather_before = [x for x in layout.copy_before if x in names]
    layout.copy_before = [x for x in layout.copy_before if x not in names]
    grad_sum: dict[str, None] = {}
    closers = set(layout.reduce_after)
    for node in seq:
        if node.name not in closers:
            _, operands = _token_dims(node, seq, split)
            grad_sum.update((a.name, None) for a, d in operands.items() if d is None and a not in seq)
        readers = [u for u in node.users if u not in seq and not _is_colwise_read(gm, u, node, layout)]
        asserts = [u for u in readers if u.op == "call_function" and op_name(u) == "_assert_tensor_metadata"]
        layout.local_args.update((u.name, ("drop",)) for u in asserts)
        if len(readers) > len(asserts):
            layout.seq_gather.append(node.name)
    layout.seq_grad_sum = list(grad_sum)


def _is_colwise_read(gm, user: fx.Node, value: fx.Node, layout: Layout) -> bool:
    w = weight_of(gm, user)
    return (w is not None and layout.styles.get(module_of(w), ("",))[0] == "colwise"
            and _linear_input(user) is value)


def _sequence_regions(gm: fx.GraphModule, layout: Layout) -> tuple[dict[fx.Node, int], dict[fx.Node, int]]:
    """(values split on the sequence -> dim, replicated values split where such values read them -> dim).

    Sources are the rowwise outputs (after their reduce-scatter). A token-wise op joins when it reads
    a sequence-split value or a replicated value already split for another reader (so the first norm
    after the embedding is split too); a split value joins itself, moving the split onto its input,
    when only split ops and colwise linears read it and it has one operand spanning the sequence (so
    the boundary stays one all-gather); repeat until nothing joins."""
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    sources = [by_name[name] for name in layout.reduce_after]
    seq = {n: _source_dim(n, layout.tp) for n in sources}
    split: dict[fx.Node, int] = {}
    grown = True
    while grown:
        grown = False
        for node in nodes:
            if node in seq or not _replicated_op(node, layout):
                continue
            token = _token_dims(node, seq, split)
            if token is None:
                continue
            seq[node], operands = token
            split.pop(node, None)
            split.update((a, d) for a, d in operands.items() if d is not None and a not in seq)
            grown = True
        for value, d in list(split.items()):
            operands = _hoisted(gm, value, d, seq, layout)
            if operands is not None:
                seq[value] = split.pop(value)
                split.update((a, e) for a, e in operands.items() if e is not None)
                grown = True
    for node in seq.keys() - set(sources):  # a later split may contradict an earlier decision
        if _token_dims(node, seq, split) is None:
            raise Unsupported(f"{node.name}: reads the sequence split on different dims")
    return {n: seq[n] for n in nodes if n in seq}, split


def _hoisted(gm, value: fx.Node, d: int, seq, layout: Layout) -> dict[fx.Node, int | None] | None:
    """Operand dims if replicated ``value``, read only by split ops and colwise linears, were computed
    split on ``d`` instead: a pointwise op or norm with exactly one operand spanning the sequence."""
    if not _replicated_op(value, layout) or not all(
            u in seq or _is_colwise_read(gm, u, value, layout) or op_name(u) == "_assert_tensor_metadata"
            for u in value.users):
        return None
    op = op_name(value)
    x = value.args[0]
    if op in _POINTWISE:
        operands = {a: _aligned(a, d, len(_shape(value) or ())) for a in value.all_input_nodes}
    elif op in ("layer_norm", "rms_norm") and d < len(_shape(x)) - len(value.args[1]):
        operands = {a: None for a in value.all_input_nodes}
        operands[x] = d
    else:
        return None
    return operands if sum(e is not None for e in operands.values()) == 1 else None


def _source_dim(node: fx.Node, tp: int) -> int:
    shape = _shape(node)
    if shape is None or len(shape) < 3:
        raise Unsupported(f"sequence parallelism needs [batch, seq, hidden] outputs of the rowwise linear "
                          f"{node.name}; it gives {shape}")
    if shape[1] % tp:
        raise Unsupported(f"sequence parallelism splits the sequence (dim 1 of {node.name}, length {shape[1]}) "
                          f"into tp={tp} blocks: {shape[1]} is not divisible by {tp}")
    return 1


def _replicated_op(node: fx.Node, layout: Layout) -> bool:
    """A call that reads and makes only replicated values under plain tp (not a cone op)."""
    return (node.op == "call_function" and layout.placement.get(node.name) is None
            and all(layout.placement.get(a.name) is None for a in node.all_input_nodes))


def _token_dims(node: fx.Node, seq, split) -> tuple[int, dict[fx.Node, int | None]] | None:
    """(sequence dim of the output, sequence dim of each tensor operand or None where the operand
    does not span tokens) when ``node`` is token-wise and reads a value split on the sequence (or
    one already split for another reader), consistently with ``seq`` and ``split``; else None."""
    def held(a):
        return seq[a] if a in seq else split.get(a)

    op = op_name(node)
    x = node.args[0] if node.args else None
    if op == "getitem":
        return (seq[x], {}) if x in seq else None
    if op in _POINTWISE:
        out_rank = len(_shape(node) or _shape(x) or ())
        dims = {held(a) + out_rank - len(_shape(a)) for a in node.all_input_nodes if held(a) is not None}
        if len(dims) != 1:
            return None
        d = dims.pop()
        operands = {a: _aligned(a, d, out_rank) for a in node.all_input_nodes}
    elif op in _NORMS | _REDUCTIONS | _SOFTMAX and isinstance(x, fx.Node) and held(x) is not None:
        operands = {a: None for a in node.all_input_nodes}
        operands[x] = held(x)
        d = _token_reduction(node, op, held(x), len(_shape(x)))
        if d is None:
            return None
    else:
        return None
    if any(held(a) not in (None, ad) for a, ad in operands.items()):
        return None
    return d, operands


def _aligned(a: fx.Node, d: int, out_rank: int) -> int | None:
    """Dim of broadcast operand ``a`` that lines up with output dim ``d`` (None if absent or size 1)."""
    shape = _shape(a)
    if shape is None:
        return None
    ad = d - (out_rank - len(shape))
    return ad if ad >= 0 and shape[ad] != 1 else None


def _token_reduction(node: fx.Node, op: str, d: int, rank: int) -> int | None:
    """Output sequence dim of a norm / reduction / softmax whose input is split on ``d``, or None when it
    reduces over ``d``."""
    if op in _NORMS:
        return d if d < rank - len(node.args[1]) else None
    dims = node.args[1] if len(node.args) > 1 else None
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    dims = [e % rank for e in dims]
    if not dims or d in dims:
        return None
    keep = op in _SOFTMAX or (len(node.args) > 2 and node.args[2]) or node.kwargs.get("keepdim", False)
    return d if keep else d - sum(1 for e in dims if e < d)


def _check_private_params(gm: fx.GraphModule, node: fx.Node) -> None:
    """A sharded weight or bias must be read by its own linear only: a tied weight or a regulariser
    reading it elsewhere would see one shard as if it were the whole tensor."""
    for p in (node.args[1] if op_name(node) == "linear" else node.args[2], bias_of(node)):
        if p is None:
            continue
        readers = list(p.users)  # torch.export reads each parameter through one get_attr node
        if readers != [node]:
            raise Unsupported(f"{node.name}: parameter {p.target} is also read by "
                              f"{', '.join(sorted(u.name for u in readers if u is not node))}")


def bias_of(node: fx.Node) -> fx.Node | None:
    op = op_name(node)
    b = node.args[2] if op == "linear" and len(node.args) > 2 else (node.args[0] if op == "addmm" else None)
    return b if isinstance(b, fx.Node) else None


def _rule(gm, node: fx.Node, placement, styles, tp) -> tuple[Shard | None, tuple | None]:
    """Output placement of ``node`` and its local args (None when unchanged)."""
    if node.op != "call_function":
        return None, None
    op = op_name(node)
    ins = {a: placement.get(a) for a in node.all_input_nodes}
    sharded = {a: p for a, p in ins.items() if p is not None}
    w = weight_of(gm, node)
    if w is not None and module_of(w) in styles:
        style, groups = styles[module_of(w)]
        _check_private_params(gm, node)
        x = _linear_input(node)
        xp = placement.get(x)
        shape = _shape(node)
        if style == "colwise":
            if xp is not None:
                raise Unsupported(f"colwise {node.name} needs a replicated input")
            if shape[-1] % (groups * tp):
                raise Unsupported(f"{node.name}: {shape[-1]} features do not split into {groups}x{tp}")
            return Shard(len(shape) - 1, groups), None
        if xp is None or xp.dim != len(_shape(x)) - 1 or xp.groups != 1:
            raise Unsupported(f"rowwise {node.name} needs its input sharded on features")
        if op == "addmm":  # bias is added after the all-reduce
            return None, None
        return None, (node.args[0], node.args[1])  # drop bias: added after the all-reduce
    if not sharded:
        return None, None
    if op in _MATMUL_LINEAR:
        raise Unsupported(f"{node.name}: linear with sharded input but no rowwise style")
    if op == "_assert_tensor_metadata":
        return None, ("drop",)
    if op == "getitem":
        src, i = node.args
        p = placement.get(src)
        return (p[i] if isinstance(p, tuple) and not isinstance(p, Shard) else p), None
    if op in ("split", "chunk", "split_with_sizes"):
        return _split_rule(node, sharded, tp)
    shard = next(iter(sharded.values()))
    x = node.args[0]
    in_shape = _shape(x)
    out_shape = _shape(node)
    if op in _POINTWISE:
        return _broadcast_rule(node, placement, tp), None
    if op in ("softmax", "_softmax", "log_softmax", "_log_softmax", "mean", "sum", "amax"):
        dims = node.args[1] if len(node.args) > 1 else None
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if not dims or any(d % len(in_shape) == shard.dim for d in dims):
            raise Unsupported(f"{node.name}: {op} reduces over the sharded dim")
        keep = len(node.args) > 2 and node.args[2]
        if op in ("mean", "sum", "amax") and not keep:
            return Shard(shard.dim - sum(1 for d in dims if d % len(in_shape) < shard.dim), shard.groups), None
        return shard, None
    if op == "transpose":
        a, b = (d % len(in_shape) for d in node.args[1:3])
        d = {a: b, b: a}.get(shard.dim, shard.dim)
        return Shard(d, shard.groups), None
    if op == "permute":
        perm = [d % len(in_shape) for d in node.args[1]]
        return Shard(perm.index(shard.dim), shard.groups), None
    if op == "unsqueeze":
        d = node.args[1] % len(out_shape)
        return Shard(shard.dim + (1 if d <= shard.dim else 0), shard.groups), None
    if op in ("slice", "select", "narrow"):
        d = node.args[1] % len(in_shape) if len(node.args) > 1 else 0
        if op == "slice" and out_shape == in_shape:  # x[:, :] keeps everything
            return shard, None
        if d == shard.dim:
            raise Unsupported(f"{node.name}: {op} on the sharded dim")
        if op == "select" and d < shard.dim:
            return Shard(shard.dim - 1, shard.groups), None
        return shard, None
    if op == "cat":
        d = node.args[1] % len(out_shape) if len(node.args) > 1 else 0
        ps = [placement.get(t) for t in node.args[0]]
        if d == shard.dim or any(p != shard for p in ps):
            raise Unsupported(f"{node.name}: cat of mixed or sharded-dim inputs")
        return shard, None
    if op == "expand":
        sizes = list(node.args[1])
        off = len(sizes) - len(in_shape)
        d = shard.dim + off
        if sizes[d] != -1:
            sizes[d] = sizes[d] // tp
        return Shard(d, shard.groups), (x, sizes) + tuple(node.args[2:])
    if op in ("view", "reshape", "_unsafe_view"):
        return _view_rule(node, shard, in_shape, out_shape, tp)
    if op == "scaled_dot_product_attention":
        q, k, v = node.args[:3]
        if any(placement.get(t) != Shard(1) for t in (q, k, v)):
            raise Unsupported(f"{node.name}: attention needs q, k, v sharded on heads")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node) and (_shape(mask)[-3] if len(_shape(mask)) >= 3 else 1) != 1:
            raise Unsupported(f"{node.name}: per-head attention mask")
        return Shard(1), None
    raise Unsupported(f"no tensor-parallel rule for {op} ({node.name})")


def _split_rule(node, sharded, tp):
    x = node.args[0]
    shard = sharded[x]
    shape = _shape(x)
    op = op_name(node)
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(shape)
    if dim != shard.dim:
        n = len(node.meta["val"])
        return tuple(shard for _ in range(n)), None
    if op == "chunk":
        if shard.groups != node.args[1]:
            raise Unsupported(f"{node.name}: chunk count does not match the projection's sections")
        return tuple(Shard(dim) for _ in range(node.args[1])), None
    size = node.args[1]
    if not isinstance(size, int) or shape[dim] % size or shape[dim] // size != shard.groups:
        raise Unsupported(f"{node.name}: split does not follow the projection's sections")
    return tuple(Shard(dim) for _ in range(shard.groups)), (x, size // tp) + tuple(node.args[2:])


def _broadcast_rule(node, placement, tp):
    out_shape = _shape(node)
    result = None
    for a in node.args:
        if not isinstance(a, fx.Node):
            continue
        shape = _shape(a)
        if shape is None:
            continue
        off = len(out_shape) - len(shape)
        p = placement.get(a)
        if p is not None:
            cand = Shard(p.dim + off, p.groups)
            if result is not None and result != cand:
                raise Unsupported(f"{node.name}: inputs sharded differently")
            result = cand
    for a in node.args:
        if isinstance(a, fx.Node) and placement.get(a) is None and _shape(a) is not None:
            shape = _shape(a)
            off = len(out_shape) - len(shape)
            d = result.dim - off
            if 0 <= d < len(shape) and shape[d] != 1:
                raise Unsupported(f"{node.name}: replicated operand {a.name} spans the sharded dim")
    return result


def _view_rule(node, shard, in_shape, out_shape, tp):
    """Map the sharded input dim through a view; shard the first output dim of its group."""
    d = shard.dim
    before = 1
    for s in in_shape[:d]:
        before *= s
    acc = 1
    e = 0
    while e < len(out_shape) and acc < before:
        acc *= out_shape[e]
        e += 1
    while e < len(out_shape) and out_shape[e] == 1 and in_shape[d] != 1:  # size-1 dims (batch 1) precede it
        e += 1
    if acc != before or e >= len(out_shape):
        raise Unsupported(f"{node.name}: view moves the sharded dim across others")
    if out_shape[e] % tp:
        raise Unsupported(f"{node.name}: {out_shape[e]} does not split over tp={tp}")
    if out_shape[e] < in_shape[d] and in_shape[d] % out_shape[e]:
        raise Unsupported(f"{node.name}: irregular view of the sharded dim")
    if out_shape[e] > in_shape[d] and shard.groups != 1:
        raise Unsupported(f"{node.name}: merging a sectioned dim")
    groups = shard.groups
    if groups > 1:
        if out_shape[e] % groups:
            raise Unsupported(f"{node.name}: view splits a section")
    sizes = list(node.args[1])
    if sizes[e] != -1:
        sizes[e] = sizes[e] // tp
    return Shard(e, groups), (node.args[0], sizes) + tuple(node.args[2:])

