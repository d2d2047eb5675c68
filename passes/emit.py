"""emit: compose the transforms of a Plan on one rank, in a fixed order (tp, then dp)."""
from __future__ import annotations

import torch.fx as fx

from passes.dp import apply_dp
from passes.tp import apply_tp
from runtime.mesh import Mesh
from runtime.module import BatchSplit, DistributedModule
from search.errors import BadInput
from search.placement import propagate


def check_emittable(plan) -> None:
    """BadInput for plan features autopar prices but cannot run yet (before any group is built)."""
    if plan.degrees["pp"] != 1:
        raise BadInput(f"the plan pipelines over pp={plan.degrees['pp']} stages, which autopar prices but "
                       "cannot emit yet; re-plan with --fix pp=1 (auto_parallelize pins it)")
    if plan.pipeline["microbatches"] != 1:
        raise BadInput(f"the plan accumulates {plan.pipeline['microbatches']} microbatches, which autopar prices "
                       "but cannot emit yet; re-plan with --fix microbatches=1")
    recompute = plan.recompute  # "none" | "selective" | "full", or one of those per module
    if set(recompute.values() if isinstance(recompute, dict) else [recompute]) - {"none"}:
        raise BadInput(f"the plan recomputes activations (recompute={recompute}), which autopar prices but "
                       "cannot emit yet; re-plan with --fix recompute=none (auto_parallelize pins it)")


def emit(gm: fx.GraphModule, plan, mesh: Mesh, batch: BatchSplit) -> DistributedModule:
    """Rewrite ``gm`` for this rank as ``plan`` says (:func:`check_emittable` first). ``gm`` was captured
    on this rank's slice of the example inputs (``batch``); ``mesh`` is the plan's {"dp", "tp"} mesh."""
    deg = plan.degrees
    styles = {m: (v["style"], v["groups"]) for m, v in plan.tensor_parallel.items()}
    tp = deg["tp"]
    shards = propagate(gm, styles, tp).param_shards if tp > 1 else {}
    apply_tp(gm, styles, mesh.group("tp"), tp, mesh.local_rank("tp"))
    sync = apply_dp(gm, mesh.group("dp"), deg["zero"])
    return DistributedModule(gm, plan, mesh, sync, shards, batch)
