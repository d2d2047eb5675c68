"""apply_dp: average gradients over the data-parallel group at the end of every backward."""
from __future__ import annotations

import torch

from runtime.dp import GradSync
from search.errors import BadInput


def apply_dp(module: torch.nn.Module, group, zero: int) -> GradSync:
    """Attach gradient averaging to ``module``'s parameters. ZeRO stages are priced by the search;
    emission of stages 1-3 (sharded optimizer/grads/params) is not implemented yet, so refuse them."""
    if zero:
        raise BadInput(f"the plan uses ZeRO stage {zero}, which autopar prices but cannot emit yet; "
                       "re-plan with --fix zero=0 (or constraints={'zero': 0})")
    return GradSync([p for p in module.parameters() if p.requires_grad], group)
