"""apply_sp: rewrite a captured graph into one sequence-parallel rank.

Every rank holds the tokens ``runtime.attention.positions(S, sp, rank, layout)`` of each sequence
(``runtime.module.BatchSplit`` deals the inputs out). Following ``search.seqshard``: view/expand
sizes along the sequence become local, position tables (RoPE cos/sin, a learned position embedding)
are indexed with this rank's positions, and every attention node becomes a call of the plan's
sequence-parallel kernel (``runtime.attention.sp_attention``). The loss stays this rank's token mean;
the module averages it (and the gradients) over the data- and sequence-parallel ranks.
Runs after ``passes.tp`` (it reads the tensor-parallel graph; shapes in ``node.meta`` are global).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from passes.localize import localize_args
from runtime.attention import positions, sp_attention
from search.seqshard import propagate_seq


class SequenceAttention(torch.nn.Module):
    """``scaled_dot_product_attention`` of this rank's queries over the whole sequence."""

    def __init__(self, variant: str, group, inner_group, layout: str, seq_len: int):
        super().__init__()
        self.variant, self.group, self.inner_group = variant, group, inner_group
        self.layout, self.seq_len = layout, seq_len

    def forward(self, q, k, v, is_causal: bool = False, scale: float | None = None, tokens_outer: bool = False):
        """``tokens_outer``: lay the output out as [B, S, H, D] in memory, as the captured attention did
        (the graph may view it after a transpose without a copy)."""
        out = sp_attention(q, k, v, variant=self.variant, group=self.group, inner_group=self.inner_group,
                           is_causal=is_causal, layout=self.layout, seq_len=self.seq_len, scale=scale)
        return out.transpose(1, 2).contiguous().transpose(1, 2) if tokens_outer else out

    def extra_repr(self) -> str:
        return f"variant={self.variant}, layout={self.layout}, seq_len={self.seq_len}"


def apply_sp(gm: fx.GraphModule, *, variant: str, layout: str, seq_len: int, sp: int, rank: int, group,
             inner_group=None) -> fx.GraphModule:
    """Rewrite ``gm`` in place for sequence-parallel rank ``rank`` of ``sp``. ``group``/``inner_group``
    are the kernel's groups (``runtime.attention.sp_attention``)."""
    if sp == 1:
        return gm
    plan = propagate_seq(gm, seq_len=seq_len, sp=sp)
    graph = gm.graph
    localize_args(graph, plan.local_args)
    nodes = {n.name: n for n in graph.nodes}
    _select_positions(gm, plan.select_positions, nodes, positions(seq_len, sp, rank, layout))
    gm.add_module("sp_attention", SequenceAttention(variant, group, inner_group, layout, seq_len))
    for name in plan.attention:
        node = nodes[name]
        q, k, v = node.args[:3]
        causal = bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))
        scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
        val = node.meta.get("val")
        outer = val is not None and not val.is_contiguous() and val.transpose(1, 2).is_contiguous()
        with graph.inserting_before(node):
            new = graph.call_module("sp_attention", (q, k, v),
                                    {"is_causal": causal, "scale": scale, "tokens_outer": outer})
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def _select_positions(gm: fx.GraphModule, uses: list[tuple[str, int, int]], nodes: dict, pos: torch.Tensor) -> None:
    """Index each position table once per dim with this rank's positions (a buffer of the module)."""
    if not uses:
        return
    gm.register_buffer("sp_positions", pos, persistent=False)
    graph = gm.graph
    done: dict[tuple[str, int], fx.Node] = {}
    for name, i, dim in uses:
        node = nodes[name]
        table = node.args[i]
        if (table.name, dim) not in done:
            with graph.inserting_after(table):
                idx = graph.get_attr("sp_positions")
            with graph.inserting_after(idx):
                done[table.name, dim] = graph.call_function(torch.ops.aten.index_select.default, (table, dim, idx))
        args = list(node.args)
        args[i] = done[table.name, dim]
        node.args = tuple(args)
