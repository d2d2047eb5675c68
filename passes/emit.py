"""emit: compose the transforms of a Plan on one rank, in a fixed order (tp, sp, chunking, recompute, dp), or split it
into pipeline stages (``emit_pipeline``)."""
from __future__ import annotations

import torch.fx as fx

from passes.dp import apply_dp
from passes.pipeline import split_stages
from passes.recompute import apply_recompute
from passes.chunk import apply_chunking
from passes.dsp import apply_dsp
from passes.sp import apply_sp
from passes.tp import apply_tp
from passes.zero import apply_zero_stages
from runtime.mesh import Mesh
from runtime.module import BatchSplit, DistributedModule
from runtime.pipeline import PipelineModule, PipelineRunner
from search.errors import BadInput
from search.placement import propagate
from search.seqshard import Unsupported


def check_emittable(plan) -> None:
    """BadInput for plan features autopar prices but cannot run yet (before any group is built)."""
    deg = plan.degrees
    if deg["pp"] > 1 and deg["zero"] > 1:
        raise BadInput(f"the plan pipelines over pp={deg['pp']} with ZeRO stage {deg['zero']}: pipelined "
                       "microbatches accumulate whole gradients, so pipelines run ZeRO 0 or 1 (as the search "
                       "plans them); re-plan with --fix zero=1 or --fix pp=1")
    if deg["pp"] > 1 and deg["sp"] > 1:
        raise BadInput(f"the plan pipelines over pp={deg['pp']} with sp={deg['sp']}: autopar emits sequence "
                       "parallelism without pipelining so far; re-plan with --fix sp=1 or --fix pp=1")
    recompute = plan.recompute  # "none" | "selective" | "full", or one of those per module
    if not isinstance(recompute, str):
        raise BadInput(f"the plan recomputes per module ({recompute}), which autopar cannot emit yet; re-plan "
                       "with one --fix recompute=none|selective|full")


def emit_pipeline(gm: fx.GraphModule, plan, cuts: list[str], mesh: Mesh, batch: BatchSplit,
                  blocks: list[str]) -> PipelineModule:
    """Rewrite ``gm`` (captured at one microbatch of this replica's slice ``batch``) for this rank's
    tensor-parallel rank over the mesh's "tp" axis, split it at ``cuts`` into the plan's stages, in
    model order, run them with its schedule over the "pp" axis, and average gradients over "dp" once
    per step. Tensor parallelism is applied to the whole graph before the split: the stages hold this
    rank's shards and run the cone collectives, and a cut sends what the tp layout leaves there (the
    replicated residual stream between Megatron cones; its 1/tp sequence block under Megatron-SP).
    Recompute applies per stage, to the blocks (``blocks``: their module scopes) or attention cores it holds;
    under ZeRO-1 each of this rank's stages (and each block in it) is an FSDP group over "dp"."""
    tp = plan.degrees["tp"]
    styles = {m: (v["style"], v["groups"]) for m, v in plan.tensor_parallel.items()}
    shards = propagate(gm, styles, tp, plan.megatron_sp).param_shards if tp > 1 else {}
    order = [n.name for n in gm.graph.nodes]
    apply_tp(gm, styles, mesh.group("tp"), tp, mesh.local_rank("tp"), sequence=plan.megatron_sp)
    alive = {n.name for n in gm.graph.nodes}  # a cut on a shape assert the rewrite dropped moves to the next node
    stages = split_stages(gm, [next(x for x in order[order.index(c):] if x in alive) for c in cuts])
    for stage in stages:
        apply_recompute(stage, plan.recompute, blocks, required=False)
    held = {id(t): name for st in stages for name, t in st.state_dict(keep_vars=True).items()}
    aliases = {name: held[id(t)] for name, t in gm.state_dict(keep_vars=True).items() if id(t) in held}
    runner = PipelineRunner(stages, plan.pipeline["schedule"], plan.pipeline["microbatches"],
                            group=mesh.group("pp"), all_pipelines=mesh.all_groups("pp"))
    module = PipelineModule(runner, plan, mesh, aliases, batch, param_shards=shards)
    if mesh.size("dp") > 1:
        module.dp_group = mesh.group("dp")
        if plan.degrees["zero"]:  # FSDP on this rank's stages: the schedule reduce-scatters after the last backward
            apply_zero_stages(stages, runner.ranks, runner.rank, mesh.group("dp"), plan.degrees["zero"], blocks)
        else:
            module.grad_sync = apply_dp(module, mesh.group("dp"), 0, [])
    return module


def plan_mesh(plan) -> Mesh:
    """The process groups of ``plan`` (collective: every rank builds it): axes pp (if > 1), dp, the
    sequence-parallel axis (``sp``, or ``spo`` × ``spi`` for the outer and inner rings of ring2d / the
    ring and Ulysses groups of usp) and tp, outermost first."""
    deg = plan.degrees
    axes = {"pp": deg["pp"]} if deg["pp"] > 1 else {}
    axes["dp"] = deg["dp"]
    sp = plan.sequence_parallel
    if sp and sp["variant"] in ("ring2d", "usp"):
        axes.update(spo=sp["degree"] // sp["inner"], spi=sp["inner"])
    elif sp:
        axes["sp"] = sp["degree"]
    axes["tp"] = deg["tp"]
    return Mesh(axes)


def batch_split(plan, mesh: Mesh, args: tuple, kwargs: dict) -> BatchSplit:
    """How this rank takes its samples (and tokens) of every call's global batch."""
    sp = plan.sequence_parallel
    sequence = dict(sp=sp["degree"], sp_rank=_sp_rank(mesh), seq_len=plan.seq_len, layout=sp["layout"]) if sp else {}
    return BatchSplit.from_example(args, kwargs, plan.global_batch, mesh.size("dp"), mesh.local_rank("dp"), **sequence)


def _sp_rank(mesh: Mesh) -> int:
    if "sp" in mesh.names:
        return mesh.local_rank("sp")
    return mesh.local_rank("spo") * mesh.size("spi") + mesh.local_rank("spi")


def emit(gm: fx.GraphModule, plan, mesh: Mesh, batch: BatchSplit, blocks: list[str]) -> DistributedModule:
    """Rewrite ``gm`` for this rank as ``plan`` says (:func:`check_emittable` first): tensor parallelism,
    then sequence parallelism, chunking, recompute, then gradient averaging (or ZeRO sharding) over the
    ranks that share parameters. ``gm`` was captured on this rank's data-parallel slice of the example inputs
    (``batch.replica``); ``mesh`` is :func:`plan_mesh`; ``blocks``: the module scopes of its repeated
    blocks (``search.recompute.block_scopes``: what full recompute checkpoints and ZeRO shards as
    one FSDP group each)."""
    deg = plan.degrees
    styles = {m: (v["style"], v["groups"]) for m, v in plan.tensor_parallel.items()}
    tp = deg["tp"]
    shards = propagate(gm, styles, tp).param_shards if tp > 1 else {}
    apply_tp(gm, styles, mesh.group("tp"), tp, mesh.local_rank("tp"), sequence=plan.megatron_sp)
    replicas = ("dp",)
    sp = plan.sequence_parallel
    if sp:
        two_d = "sp" not in mesh.names
        try:
            if sp["variant"] == "dsp":
                apply_dsp(gm, mesh.group("sp"), sp["degree"], _sp_rank(mesh))
            else:
                apply_sp(gm, variant=sp["variant"], layout=sp["layout"], seq_len=plan.seq_len, sp=sp["degree"],
                         rank=_sp_rank(mesh), group=mesh.group("spo" if two_d else "sp"),
                         inner_group=mesh.group("spi") if two_d else None)
        except Unsupported as exc:
            raise BadInput(f"the plan's sequence parallelism ({sp['variant']}, sp={sp['degree']}) does not fit "
                           f"this model: {exc}; re-plan for it") from None
        replicas = ("dp", "spo", "spi") if two_d else ("dp", "sp")
    if plan.chunking:
        apply_chunking(gm, plan.chunking)
    apply_recompute(gm, plan.recompute, blocks)
    group = mesh.joint_group(replicas)
    sync = apply_dp(gm, group, deg["zero"], blocks)
    return DistributedModule(gm, plan, mesh, sync, shards, batch, group)
