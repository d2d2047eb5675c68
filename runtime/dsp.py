"""DSP's dimension switch (arXiv 2403.10266): re-shard an activation from one dim to another with one
all-to-all, differentiably.

    y = switch_shard(x, group, from_dim=1, to_dim=2)   # [B, T/P, N, H] -> [B, T, N/P, H]

Forward and backward are each one counted ``all_to_all`` of the tensor the rank holds, so a switch
costs (P-1)/P * bytes(x) per rank each way. Pure data movement: exact.
"""
from __future__ import annotations

import torch

from runtime.collectives import all_to_all, group_size

__all__ = ["switch_shard", "SwitchShard"]


class _Switch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, from_dim, to_dim):
        ctx.group, ctx.from_dim, ctx.to_dim = group, from_dim, to_dim
        return all_to_all(x, group, scatter_dim=to_dim, gather_dim=from_dim)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.group, scatter_dim=ctx.from_dim, gather_dim=ctx.to_dim), None, None, None


def switch_shard(x: torch.Tensor, group, from_dim: int, to_dim: int) -> torch.Tensor:
    """``x`` is this rank's shard of dim ``from_dim`` over ``group`` (rank order); return its shard of
    ``to_dim`` with ``from_dim`` whole. ``to_dim`` must divide by the group size. Backward: the inverse."""
    if group_size(group) == 1:
        return x
    return _Switch.apply(x, group, from_dim, to_dim)


class SwitchShard(torch.nn.Module):
    """:func:`switch_shard` as a graph submodule, so the rewritten graph prints readably."""

    def __init__(self, group, from_dim: int, to_dim: int):
        super().__init__()
        self.group, self.from_dim, self.to_dim = group, from_dim, to_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return switch_shard(x, self.group, self.from_dim, self.to_dim)

    def extra_repr(self) -> str:
        return f"from_dim={self.from_dim}, to_dim={self.to_dim}"
