"""apply_dsp: rewrite a captured spatial-temporal graph into one Dynamic Sequence Parallelism rank (arXiv 2403.10266).

Applies ``search.dsp.dsp_layout`` -- the layout the planner priced -- and decides nothing itself: a
``SwitchShard`` (``runtime.dsp``, one all-to-all forward and one backward) on every recorded switch
edge, view/reshape sizes made local, and the recorded replicated operands (the temporal position
embedding) narrowed to this rank's part. Every rank holds the frames ``x.chunk(P, dim=1)[rank]`` of
each [B, T, ...] input (``runtime.module.BatchSplit`` deals them out); a switched (temporal) block
computes on the tokens ``chunk(P, dim=2)[rank]`` instead. Parameters stay replicated; the mean loss
stays this rank's mean, and the module averages it and the gradients over the data- and
sequence-parallel ranks (equal shards: the global loss and its gradients).

    >>> mg = capture(model, (x, target))                          # doctest: +SKIP
    >>> gm = apply_dsp(mg.gm, group, P, rank)                     # doctest: +SKIP
    >>> loss = gm(x.chunk(P, dim=1)[rank], target.chunk(P, dim=1)[rank])   # doctest: +SKIP

Communication per training step, bytes sent per rank (e = element size, L_t = switched (temporal)
blocks = depth // 2 in examples.dit, activation [B, T, N, hidden]), exactly
``search.dsp.dsp_traffic``:

    all_to_all   4 · L_t · (P-1)/P · B·T·N·hidden·e / P     (2 switches forward + 2 backward per
                                                             temporal block, DESIGN §4 all-to-all)
    all_reduce   2 (P-1)/P · (param_bytes + e)               (gradient average, as in data
                                                             parallelism, + the scalar loss report)

e.g. dit-xl (B=1, T=16, N=1024, hidden=1152, L_t=14), bf16, P=8: 56 all-to-alls of 4,718,592 B held
per rank, 231,211,008 B sent per rank per step (the block-internal activations never move).

Errors: whatever ``dsp_layout`` refuses raises ``search.seqshard.Unsupported`` naming the node (T or N
not divisible by the degree, no [B, T, N, ...] input, attention masks or dropout, ops that mix over the
sharded axis, reductions other than a mean MSE loss).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from runtime.dsp import SwitchShard
from search.dsp import SPATIAL, TEMPORAL, VIEWS, dsp_layout
from search.placement import op_name

__all__ = ["apply_dsp"]

_SWITCH_DIMS = {"to_spatial": (TEMPORAL, SPATIAL), "to_temporal": (SPATIAL, TEMPORAL)}


def apply_dsp(gm: fx.GraphModule, group, degree: int, rank: int) -> fx.GraphModule:
    """Rewrite ``gm`` (captured on the global [B, T, N, C] inputs) in place for DSP rank ``rank`` of
    ``degree``; ``group`` is the DSP process group. ``Unsupported`` when DSP cannot apply."""
    layout = dsp_layout(gm, degree)
    if degree == 1:
        return gm
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    for edge in layout.switches:
        module = f"dsp_{edge.direction}_{edge.block.replace('.', '_')}"
        if not hasattr(gm, module):
            gm.add_module(module, SwitchShard(group, *_SWITCH_DIMS[edge.direction]))
        src = nodes[edge.source]
        with graph.inserting_after(src):
            switched = graph.call_module(module, (src,))
        switched.meta["val"] = src.meta["val"]  # a switch keeps the global shape
        for user in edge.users:
            nodes[user].replace_input_with(src, switched)
    for name, split in layout.placement.items():
        node = nodes[name]
        if split and node.op == "call_function" and op_name(node) in VIEWS:
            local = list(node.meta["val"].shape)
            local[split.dim] //= degree
            node.args = (node.args[0], [int(d) for d in local])
    for user, operand, dim in layout.narrows:
        operand = nodes[operand]
        n = int(operand.meta["val"].shape[dim]) // degree
        with graph.inserting_before(nodes[user]):
            part = graph.call_function(torch.ops.aten.narrow.default, (operand, dim, rank * n, n))
        nodes[user].replace_input_with(operand, part)
    graph.lint()
    gm.recompile()
    return gm

