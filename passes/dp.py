"""apply_dp: average gradients over the ranks that share parameters at the end of every backward;
under ZeRO (stages 1-3) shard parameters, gradients and optimizer state over them (``passes.zero``)."""
from __future__ import annotations

import torch.fx as fx

from passes.zero import apply_zero
from runtime.dp import GradSync, ShardedGradSync


def apply_dp(gm: fx.GraphModule, group, zero: int, blocks: list[str]) -> GradSync | ShardedGradSync:
    """Gradient averaging over ``group`` for ``gm`` (ZeRO ``zero``: 0 plain data parallelism, 1-3 sharded,
    one FSDP group per block of ``blocks``, module scopes)."""
    if zero:
        return apply_zero(gm, group, zero, blocks)
    return GradSync([p for p in gm.parameters() if p.requires_grad], group)
