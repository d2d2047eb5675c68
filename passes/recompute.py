"""apply_recompute: run a plan's recompute choice under ``torch.utils.checkpoint`` (non-reentrant).

``full``: every repeated block (``search.recompute.block_scopes``, found again on this rank's graph by
module scope) becomes one checkpointed submodule; ``selective``: every attention core
(``search.recompute.attention_cores``). A block's region is the contiguous run of call nodes from the
first to the last node of its scope, so nodes other passes inserted inside it (tensor-parallel
collectives, chunked regions) are recomputed with it: the backward re-issues a block's forward
collectives in the same order on every rank. The random state is restored for the recompute, so
dropout draws the same masks.

    >>> from examples.zoo import build
    >>> from planner.capture import capture
    >>> from search.fold import fold
    >>> from search.recompute import block_scopes
    >>> model, args, _ = build("gpt-tiny", batch=2, device="cpu")
    >>> mg = capture(model, args)
    >>> gm = apply_recompute(mg.gm, "full", block_scopes(mg, fold(mg)))
    >>> sorted(name for name, _ in gm.named_children() if name.startswith("recomputed"))
    ['recomputed_blocks_0', 'recomputed_blocks_1']
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils.checkpoint import checkpoint

from passes.outline import copy_body, outline, region_io, scope_run
from search.errors import BadInput
from search.recompute import RECOMPUTE, attention_cores


class Recomputed(torch.nn.Module):
    """``body`` under non-reentrant checkpoint: its forward saves nothing for backward but its inputs."""

    def __init__(self, body: fx.GraphModule):
        super().__init__()
        self.body = body

    def forward(self, *inputs):
        return checkpoint(self.body, *inputs, use_reentrant=False)


def apply_recompute(gm: fx.GraphModule, recompute: str, blocks: list[str], *, required: bool = True) -> fx.GraphModule:
    """Rewrite ``gm`` in place so that ``recompute`` ("none", "selective", "full") holds; ``blocks`` are
    the module scopes of the repeated blocks (for "full"). BadInput if there is nothing to recompute,
    unless not ``required`` (a pipeline stage may hold no block)."""
    if recompute not in RECOMPUTE:
        raise BadInput(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    if recompute == "none":
        return gm
    if recompute == "full":
        regions = [(scope, scope_run(gm, scope)) for scope in blocks]
        regions = [(scope, run) for scope, run in regions if run]
        if not regions and required:
            raise BadInput(f"recompute=full but none of the blocks {blocks[:3]} is in this graph: was the plan "
                           "made for this model?")
    else:
        nodes = {n.name: n for n in gm.graph.nodes}
        regions = [(core[0], [nodes[n] for n in core]) for core in attention_cores(gm)]
        if not regions and required:
            raise BadInput("recompute=selective but this graph has no attention core (no softmax between two "
                           "matmuls, no scaled_dot_product_attention): re-plan with --fix recompute=none or full")
    for label, region in regions:
        inputs, outputs = region_io(region)
        outline(gm, region, inputs, outputs, Recomputed(copy_body(gm, region, inputs, outputs)),
                "recomputed_" + label.replace(".", "_"))
    gm.recompile()
    return gm
