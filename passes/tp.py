"""apply_tp: rewrite a captured graph into one tensor-parallel rank (Megatron column/row pattern).

Parameters become this rank's shards, view/expand/split arguments become local, and the two
Megatron collectives are inserted: ``copy_to_group`` before colwise linears (identity forward,
all-reduce of the gradient backward) and ``reduce_from_group`` after rowwise linears (all-reduce
forward), with a rowwise bias added after the reduction. Placements come from
``search.placement.propagate`` so the rewrite runs exactly what the search priced.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from runtime.collectives import copy_to_group, reduce_from_group
from search.placement import module_of, propagate, weight_of


class GroupCollective(torch.nn.Module):
    """A differentiable collective over ``group`` as a graph submodule (printed code stays readable)."""

    def __init__(self, fn, group):
        super().__init__()
        self.fn = fn
        self.group = group

    def forward(self, x):
        return self.fn(x, self.group)


def shard_tensor(t: torch.Tensor, dim: int, groups: int, tp: int, rank: int) -> torch.Tensor:
    """This rank's part of ``t``: each of the ``groups`` sections of ``dim`` split ``tp`` ways."""
    sections = t.unflatten(dim, (groups, t.shape[dim] // groups))
    return sections.chunk(tp, dim=dim + 1)[rank].flatten(dim, dim + 1).contiguous()


def apply_tp(gm: fx.GraphModule, styles: dict[str, tuple[str, int]], group, tp: int, rank: int) -> fx.GraphModule:
    """Rewrite ``gm`` in place for tensor-parallel rank ``rank`` of ``tp`` (``group`` = its process group)."""
    if tp == 1:
        return gm
    layout = propagate(gm, styles, tp)
    _shard_parameters(gm, layout.param_shards, tp, rank)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    for name, args in layout.local_args.items():
        node = nodes[name]
        if args == ("drop",):
            if not node.users:
                graph.erase_node(node)
            continue
        node.args = args
    gm.add_module("tp_copy", GroupCollective(copy_to_group, group))  # Megatron f: all-reduce grads backward
    gm.add_module("tp_reduce", GroupCollective(reduce_from_group, group))  # Megatron g: all-reduce forward
    colwise = {n for n in graph.nodes if n.op == "call_function" and _is_styled(n, layout, "colwise", gm)}
    for name in layout.copy_before:
        src = nodes[name]
        with graph.inserting_after(src):
            copied = graph.call_module("tp_copy", (src,))
        _same_meta(copied, src)
        for user in list(src.users):
            if user in colwise:
                user.replace_input_with(src, copied)
    for name in layout.reduce_after:
        node = nodes[name]
        with graph.inserting_after(node):
            reduced = graph.call_module("tp_reduce", (node,))
        _same_meta(reduced, node)
        out = reduced
        bias = layout.bias_after_reduce.get(name)
        if bias is not None:
            with graph.inserting_after(reduced):
                b = graph.get_attr(bias)
            with graph.inserting_after(b):
                out = graph.call_function(torch.ops.aten.add.Tensor, (reduced, b))
            _same_meta(out, node)
            if node.target is torch.ops.aten.addmm.default:  # addmm(bias, x, w) -> mm(x, w), bias after
                node.target = torch.ops.aten.mm.default
                node.args = (node.args[1], node.args[2])
        node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not reduced)
    graph.lint()
    gm.recompile()
    return gm


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
