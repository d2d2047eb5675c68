"""apply_tp: rewrite a captured graph into one tensor-parallel rank (Megatron column/row pattern).

Parameters become this rank's shards, view/expand/split arguments become local, and the two
Megatron collectives are inserted: ``copy_to_group`` before colwise linears (identity forward,
all-reduce of the gradient backward) and ``reduce_from_group`` after rowwise linears (all-reduce
forward), with a rowwise bias added after the reduction. Placements come from
``search.placement.propagate`` so the rewrite runs exactly what the search priced.

``sequence=True`` adds Megatron sequence parallelism: the token-wise regions between cones hold this
rank's block of the sequence, so rowwise outputs are reduce-scattered (``sp_reduce_scatter``) and
colwise inputs all-gathered (``sp_gather``) — the same volume as the two all-reduces — while
replicated values entering such a region are split (``sp_split``), values leaving it for other ops
are gathered (``sp_unsplit``), and the gradients of replicated inputs the region reads (norm weights,
rowwise biases) are summed over the ranks (``tp_copy``).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from passes.localize import localize_args
from runtime.collectives import (copy_to_group, gather_from_sequence, reduce_from_group, reduce_scatter_to_sequence,
                                 scatter_to_sequence)
from search.placement import module_of, propagate, weight_of


class GroupCollective(torch.nn.Module):
    """A differentiable collective over ``group`` as a graph submodule (printed code stays readable);
    extra call arguments (a dim) and fixed ``options`` are passed through."""

    def __init__(self, fn, group, **options):
        super().__init__()
        self.fn = fn
        self.group = group
        self.options = options

    def forward(self, x, *args):
        return self.fn(x, self.group, *args, **self.options)


def shard_tensor(t: torch.Tensor, dim: int, groups: int, tp: int, rank: int) -> torch.Tensor:
    """This rank's part of ``t``: each of the ``groups`` sections of ``dim`` split ``tp`` ways."""
    sections = t.unflatten(dim, (groups, t.shape[dim] // groups))
    return sections.chunk(tp, dim=dim + 1)[rank].flatten(dim, dim + 1).contiguous()


def apply_tp(gm: fx.GraphModule, styles: dict[str, tuple[str, int]], group, tp: int, rank: int,
             sequence: bool = False) -> fx.GraphModule:
    """Rewrite ``gm`` in place for tensor-parallel rank ``rank`` of ``tp`` (``group`` = its process group);
    ``sequence=True`` splits the regions between cones on the sequence (Megatron-SP)."""
    if tp == 1:
        return gm
    layout = propagate(gm, styles, tp, sequence)
    _shard_parameters(gm, layout.param_shards, tp, rank)
    graph = gm.graph
    localize_args(graph, layout.local_args)
    nodes = {n.name: n for n in graph.nodes}
    gm.add_module("tp_copy", GroupCollective(copy_to_group, group))  # Megatron f: all-reduce grads backward
    gm.add_module("tp_reduce", GroupCollective(reduce_from_group, group))  # Megatron g: all-reduce forward
    if sequence:
        gm.add_module("sp_reduce_scatter", GroupCollective(reduce_scatter_to_sequence, group))
        gm.add_module("sp_gather", GroupCollective(gather_from_sequence, group))
        gm.add_module("sp_split", GroupCollective(scatter_to_sequence, group))
        gm.add_module("sp_unsplit", GroupCollective(gather_from_sequence, group, reduce_grad=False))
    colwise = {n for n in graph.nodes if n.op == "call_function" and _is_styled(n, layout, "colwise", gm)}
    values = dict(nodes)
    for name in layout.reduce_after:
        values[name] = _close_rowwise(graph, nodes[name], layout, sequence)
    _route(graph, [(values[x], ()) for x in layout.copy_before], "tp_copy", colwise.__contains__)
    if sequence:
        _sequence_boundaries(graph, layout, values, colwise)
    graph.lint()
    gm.recompile()
    return gm


def _close_rowwise(graph: fx.Graph, node: fx.Node, layout, sequence: bool) -> fx.Node:
    """Reduce a rowwise linear's partial output (all-reduce, or reduce-scatter to this rank's block of
    the sequence) and add its bias after; every reader of ``node`` now reads the returned node."""
    with graph.inserting_after(node):
        if sequence:
            reduced = graph.call_module("sp_reduce_scatter", (node, layout.seq_dims[node.name]))
        else:
            reduced = graph.call_module("tp_reduce", (node,))
    _same_meta(reduced, node)
    out = reduced
    bias = layout.bias_after_reduce.get(node.name)
    if bias is not None:
        with graph.inserting_after(reduced):
            b = graph.get_attr(bias)
        if sequence:  # added on this rank's tokens only: its gradient is summed over the ranks
            with graph.inserting_after(b):
                b = graph.call_module("tp_copy", (b,))
        with graph.inserting_after(b):
            out = graph.call_function(torch.ops.aten.add.Tensor, (reduced, b))
        _same_meta(out, node)
        if node.target is torch.ops.aten.addmm.default:  # addmm(bias, x, w) -> mm(x, w), bias after
            node.target = torch.ops.aten.mm.default
            node.args = (node.args[1], node.args[2])
    node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not reduced)
    return out


def _sequence_boundaries(graph: fx.Graph, layout, values: dict[str, fx.Node], colwise: set[fx.Node]) -> None:
    """Collectives where sequence-split values meet other readers: all-gather for colwise linears and
    for replicated ops, a local split for replicated values entering a split region, and a gradient
    sum for the replicated operands (norm weights) it reads."""
    local = {values[n] for n in layout.seq_dims}  # ops on this rank's block of the sequence
    dims = layout.seq_dims
    _route(graph, [(values[x], (dims[x],)) for x in layout.gather_before], "sp_gather", colwise.__contains__)
    _route(graph, [(values[x], (dims[x],)) for x in layout.seq_gather], "sp_unsplit",
           lambda u: u.op != "call_module" and u not in local)
    _route(graph, [(values[x], (d,)) for x, d in layout.seq_split.items()], "sp_split", local.__contains__)
    _route(graph, [(values[x], ()) for x in layout.seq_grad_sum], "tp_copy", local.__contains__)


def _route(graph: fx.Graph, sources: list[tuple[fx.Node, tuple]], module: str, reads) -> None:
    """Insert ``module(src, *extra)`` after each source; the users ``reads`` selects read it instead."""
    for src, extra in sources:
        users = [u for u in src.users if reads(u)]
        if not users:
            continue
        with graph.inserting_after(src):
            new = graph.call_module(module, (src, *extra))
        _same_meta(new, src)
        for user in users:
            user.replace_input_with(src, new)


def _same_meta(new: fx.Node, like: fx.Node) -> None:
    """A node the rewrite adds keeps the (global) value metadata of the one it stands for, so later
    passes read shapes off every node."""
    if "val" in like.meta:
        new.meta["val"] = like.meta["val"]


def _is_styled(node, layout, style, gm) -> bool:
    w = weight_of(gm, node)
    return w is not None and layout.styles.get(module_of(w), ("",))[0] == style


def _shard_parameters(gm: fx.GraphModule, shards: dict[str, tuple[int, int]], tp: int, rank: int) -> None:
    for fqn, (dim, groups) in shards.items():
        owner_name, _, attr = fqn.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        full = getattr(owner, attr)
        with torch.no_grad():
            local = shard_tensor(full.detach(), dim, groups, tp, rank)
        setattr(owner, attr, torch.nn.Parameter(local, requires_grad=full.requires_grad))
