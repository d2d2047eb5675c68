"""Run pipeline stages with a torch.distributed.pipelining schedule chosen by name.

    runner = PipelineRunner(stages, "1f1b", microbatches=8, group=pp_group)   # every stage, on every rank
    loss = runner.step(ids, targets)   # whole batch in; backward done; the mean loss on every rank

``stages`` are modules in pipeline order (``passes.pipeline.split_stages``): positional inputs are the
previous stage's outputs, keyword inputs the model's root inputs, the last returns the scalar loss of
one microbatch. Each rank wraps the stages the schedule places on it in ``PipelineStage`` objects.

Schedules: ``gpipe`` (ScheduleGPipe) and ``1f1b`` (Schedule1F1B), one stage per rank;
``interleaved`` (ScheduleInterleaved1F1B) and ``zb-h1`` = ``zero-bubble``
(ScheduleInterleavedZeroBubble, backward split into input and weight gradients), v stages per rank
placed round-robin; ``zbv`` (ScheduleZBVZeroBubble), two stages per rank in a V; ``wave``
(:class:`ScheduleWave`, Hanayo-style), v stages per rank in a zig-zag.

Gradients: the loss of each microbatch is divided by the microbatch count before its backward (the
schedules' own ``scale_grads`` would divide a parameter shared by two local stages twice), so the
gradients equal the full-batch gradients and accumulate like ``loss.backward()``. A parameter held by
stages on several ranks (a tied embedding / LM head) gets its step's gradient summed over those
ranks (Megatron's embedding group: a process group of just those ranks).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch.distributed.tensor import DTensor
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.microbatch import TensorChunkSpec, _Replicate
from torch.distributed.pipelining.schedules import (
    ScheduleGPipe,
    Schedule1F1B,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
    _Action,
    _ComputationType,
    _PipelineScheduleRuntime,
)
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

from runtime.collectives import all_reduce, all_reduce_mean_scalar
from runtime.module import unshard
from search.errors import BadInput

__all__ = ["PipelineRunner", "ScheduleWave", "SCHEDULES", "stage_ranks", "wave_order"]

# name -> (torch schedule class, stage placement "loop" | "v", stages per rank: an int, or None for any)
SCHEDULES = {
    "gpipe": (ScheduleGPipe, "loop", 1),
    "1f1b": (Schedule1F1B, "loop", 1),
    "interleaved": (ScheduleInterleaved1F1B, "loop", None),
    "zb-h1": (ScheduleInterleavedZeroBubble, "loop", None),
    "zero-bubble": (ScheduleInterleavedZeroBubble, "loop", None),
    "zbv": (ScheduleZBVZeroBubble, "v", 2),
}


def stage_ranks(schedule: str, num_stages: int, pp: int) -> list[int]:
    """The pipeline rank of each stage under ``schedule`` (BadInput if the counts do not fit)."""
    if schedule not in SCHEDULES and schedule != "wave":
        raise BadInput(f"unknown pipeline schedule {schedule!r}; expected one of {sorted([*SCHEDULES, 'wave'])}")
    style, per_rank = SCHEDULES[schedule][1:] if schedule in SCHEDULES else ("v", None)
    if num_stages % pp or (per_rank is not None and num_stages != per_rank * pp):
        need = f"{per_rank} stage(s) per rank" if per_rank else "a multiple of the ranks"
        raise BadInput(f"schedule {schedule!r} on {pp} pipeline ranks needs {need}, got {num_stages} stages")
    mapping = generate_stage_to_rank_mapping(pp, num_stages, style=style)
    return [mapping[s] for s in range(num_stages)]


class PipelineRunner:
    """This rank's part of a pipeline: its ``PipelineStage``s, the schedule, the tied-gradient groups."""

    def __init__(self, stages: list[torch.nn.Module], schedule: str, microbatches: int, group=None,
                 all_pipelines: list[list[int]] | None = None):
        """``group``: this rank's pipeline; ``all_pipelines``: the global ranks of every pipeline of the
        job (default: one pipeline over the whole world), so that every rank creates the tied-weight
        groups of every pipeline in the same order (``new_group`` must be called by all ranks)."""
        self.pp = dist.get_world_size(group)
        self.all_pipelines = all_pipelines or [list(range(dist.get_world_size()))]
        self.rank = dist.get_rank(group)
        self.ranks = stage_ranks(schedule, len(stages), self.pp)
        if microbatches < 1:
            raise BadInput(f"microbatches must be >= 1, got {microbatches}")
        self.schedule_name, self.microbatches, self.group = schedule, microbatches, group
        self.stages = stages
        self.local = [PipelineStage(stages[s], s, len(stages), _device(stages[s]), group=group)
                      for s in range(len(stages)) if self.ranks[s] == self.rank]
        self._tied = self._tied_groups()
        self._schedule = None
        self._chunking = None

    def step(self, *args, **kwargs) -> torch.Tensor:
        """Forward and backward of the whole batch (``args``/``kwargs`` as the model takes them) in
        ``microbatches`` microbatches; returns the mean microbatch loss (= the full-batch loss) on every rank."""
        roots = self._roots(args, kwargs)
        chunking = {k: self._split_dim(k, v) for k, v in roots.items()}
        if self._schedule is None:
            self._schedule, self._chunking = self._build_schedule(chunking), chunking
        elif chunking != self._chunking:
            raise BadInput(f"inputs split differently from the first step ({chunking} vs {self._chunking}): "
                           "pass the same input shapes every step")
        before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p, _ in self.tied]
        losses: list[torch.Tensor] = []
        self._schedule.step(target=torch.zeros(self.microbatches), losses=losses, return_outputs=False, **roots)
        for (p, grp), old in zip(self.tied, before):
            if isinstance(p.grad, DTensor):  # ZeRO: every holder keeps the same part of the gradient
                local, before_local = p.grad.to_local(), old.to_local()
                local.copy_(before_local + all_reduce(local - before_local, grp))
                continue
            delta = all_reduce(p.grad - old if p.grad is not None else -old, grp)
            p.grad = old + delta
        loss = torch.stack(losses).sum().detach() if losses else torch.zeros((), dtype=torch.float32)
        dist.broadcast(loss, group=self.group, group_src=self.ranks[-1])
        return loss

    def _build_schedule(self, chunking):
        cls = ScheduleWave if self.schedule_name == "wave" else SCHEDULES[self.schedule_name][0]
        m = self.microbatches
        stages = self.local if cls not in (ScheduleGPipe, Schedule1F1B) else self.local[0]
        spec = {k: _Replicate() if d is None else TensorChunkSpec(d) for k, d in chunking.items()}
        try:
            return cls(stages, m, loss_fn=lambda out, _target: out / m, kwargs_chunk_spec=spec, scale_grads=False)
        except ValueError as exc:  # microbatch count the schedule cannot arrange
            raise BadInput(f"schedule {self.schedule_name!r} with {m} microbatches on {self.pp} ranks: {exc}") from None

    def _roots(self, args, kwargs) -> dict[str, torch.Tensor]:
        names = [n.name for n in self.stages[0].graph.nodes if n.op == "placeholder"]
        spec = getattr(self.stages[0], "in_spec", None)
        try:
            leaves = (fx_pytree.tree_flatten_spec((args, kwargs), spec) if spec is not None
                      else pytree.tree_leaves((args, kwargs)))
        except Exception as exc:  # noqa: BLE001 - any structure mismatch is the caller's
            raise BadInput(f"pipeline inputs do not match the captured model's inputs {names}: {exc}") from None
        if len(leaves) != len(names):
            raise BadInput(f"pipeline got {len(leaves)} inputs, the captured model takes {len(names)}: {names}")
        return dict(zip(names, leaves))

    def _split_dim(self, name: str, x) -> int | None:
        """0 (split into microbatches) when ``x`` holds ``microbatches`` x the captured rows; None (every
        microbatch gets all of ``x``) when it has exactly the captured shape."""
        node = next(n for n in self.stages[0].graph.nodes if n.op == "placeholder" and n.name == name)
        captured = node.meta.get("val")
        if not isinstance(x, torch.Tensor) or captured is None or x.dim() == 0:
            return None
        rows, m = captured.shape[0], self.microbatches
        if x.shape[0] == rows * m and x.shape[1:] == captured.shape[1:]:
            return 0
        if tuple(x.shape) == tuple(captured.shape):
            return None
        raise BadInput(f"input {name!r} has shape {tuple(x.shape)}, but the stages were captured for microbatches of "
                       f"shape {tuple(captured.shape)}: {m} microbatches need a batch of {rows * m} "
                       "(capture at batch / microbatches)")

    @property
    def tied(self) -> list[tuple[torch.nn.Parameter, object]]:
        """(parameter, group of the ranks holding it) for each parameter held on more than one rank, as
        this rank's stages hold it now (ZeRO replaces the parameters after the runner is built)."""
        return [(self.stages[s].get_parameter(name), group) for s, name, group in self._tied]

    def _tied_groups(self) -> list[tuple[int, str, object]]:
        """(local stage, parameter name, group of the ranks holding it) for each parameter held on more
        than one rank."""
        owners: dict[int, tuple[tuple[int, str] | None, set[int]]] = {}
        for s, stage in enumerate(self.stages):
            for name, p in stage.named_parameters():
                if p.requires_grad:
                    entry = owners.setdefault(id(p), (None, set()))
                    entry[1].add(self.ranks[s])
                    if entry[0] is None and self.ranks[s] == self.rank:
                        owners[id(p)] = ((s, name), entry[1])
        me = dist.get_rank()
        groups, tied = {}, []
        for held, ranks in owners.values():  # same order on every rank: stage order, then parameter order
            if len(ranks) < 2:
                continue
            key = tuple(sorted(ranks))
            if key not in groups:  # every rank creates this group for every pipeline, in the same order
                mine = None
                for pipeline in self.all_pipelines:
                    members = [pipeline[r] for r in key]
                    made = dist.new_group(members)
                    if me in members:
                        mine = made
                groups[key] = mine
            if self.rank in ranks:
                tied.append((*held, groups[key]))
        return tied


def _device(module: torch.nn.Module) -> torch.device:
    t = next(iter(module.parameters()), None)
    return t.device if t is not None else torch.device("cpu")


def wave_order(stage_rank: list[int], microbatches: int) -> dict[int, list[_Action]]:
    """Per-rank F/B order of a wave schedule by list scheduling: repeatedly take the action that can
    start earliest (forward 1 time unit, backward 2), forward first on ties, then the older microbatch,
    then the deeper stage; a rank starts a new microbatch only while fewer than 2·pp are in flight on it.
    On that time model the order takes about interleaved 1F1B's ideal m·3v + 3(p−1) units (v stages per
    rank; tests/test_pipeline_emit.py checks it); the ``2·pp`` cap bounds the activations a rank holds."""
    F, B = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD
    num, pp = len(stage_rank), max(stage_rank) + 1
    first = [min(s for s in range(num) if stage_rank[s] == r) for r in range(pp)]
    pending = {(kind, s, i) for kind in (F, B) for s in range(num) for i in range(microbatches)}
    finish: dict[tuple, int] = {}
    free, in_flight = [0] * pp, [0] * pp
    order: dict[int, list[_Action]] = {r: [] for r in range(pp)}
    while pending:
        best = None
        for kind, s, i in pending:
            if kind == F:
                deps = [(F, s - 1, i)] if s else []
            else:
                deps = [(F, s, i)] + ([(B, s + 1, i)] if s < num - 1 else [])
            r = stage_rank[s]
            if any(d not in finish for d in deps) or (kind == F and s == first[r] and in_flight[r] >= 2 * pp):
                continue
            start = max([free[r]] + [finish[d] for d in deps])
            key = (start, kind != F, i, -s)
            if best is None or key < best[0]:
                best = (key, kind, s, i)
        (start, *_), kind, s, i = best
        r = stage_rank[s]
        finish[(kind, s, i)] = free[r] = start + (1 if kind == F else 2)
        if s == first[r]:
            in_flight[r] += 1 if kind == F else -1
        pending.remove((kind, s, i))
        order[r].append(_Action(s, kind, i))
    return order


class ScheduleWave(_PipelineScheduleRuntime):
    """Hanayo-style wave schedule (Liu et al., SC'23) on torch's multi-stage runtime: rank r holds stages
    r, 2p-1-r, 2p+r, ... (torch's "v" placement), so each microbatch's forward sweeps down the ranks and
    back up in waves and its backward retraces them; the per-rank order comes from :func:`wave_order`."""

    def __init__(self, stages, n_microbatches, loss_fn=None, kwargs_chunk_spec=None, scale_grads=True):
        super().__init__(stages=stages, n_microbatches=n_microbatches, loss_fn=loss_fn,
                         kwargs_chunk_spec=kwargs_chunk_spec, scale_grads=scale_grads)
        mapping = generate_stage_to_rank_mapping(self.pp_group_size, self._num_stages, style="v")
        self.pipeline_order = wave_order([mapping[s] for s in range(self._num_stages)], n_microbatches)
        self._prepare_schedule_with_comms(self.pipeline_order)


class PipelineModule(torch.nn.Module):
    """What ``auto_parallelize`` returns for a pipelined plan: this rank's stages, and ``step``.

    A pipeline runs forward and backward together, so training is ``loss = pmodel.step(*inputs)``
    (the whole global batch, as the model takes it) then ``opt.step()`` over ``pmodel.parameters()``
    (this rank's parameters, original names). With data parallelism, ``batch`` takes this replica's
    slice, ``grad_sync`` averages the gradients over ``dp_group`` once per step and the loss returned
    is the dp mean. With tensor parallelism the stages hold this rank's shards: ``param_shards`` maps a
    sharded parameter's name to its (dim, groups) (``passes.tp.shard_tensor``) over the mesh's "tp"
    axis. ``aliases`` maps every state name of the model to the name the stages hold its tensor under
    (a tied weight has two names, the stages keep one; a tensor no stage reads is left out)."""

    def __init__(self, runner: PipelineRunner, plan, mesh, aliases: dict[str, str], batch=None, grad_sync=None,
                 dp_group=None, param_shards: dict[str, tuple[int, int]] | None = None):
        super().__init__()
        self.runner, self.plan, self.batch, self.grad_sync, self.dp_group = runner, plan, batch, grad_sync, dp_group
        self.mesh, self.aliases, self.param_shards = mesh, dict(aliases), dict(param_shards or {})
        self.stages = torch.nn.ModuleList(runner.stages[s] for s in range(len(runner.stages))
                                          if runner.ranks[s] == runner.rank)

    def step(self, *args, **kwargs) -> torch.Tensor:
        if self.batch is not None:
            args, kwargs = self.batch(args, kwargs)
        if self.grad_sync is None:  # no dp, or ZeRO (FSDP stages: the schedule reduce-scatters)
            loss = self.runner.step(*args, **kwargs)
        else:
            with self.grad_sync.no_sync():
                loss = self.runner.step(*args, **kwargs)
            self.grad_sync.sync()
        return loss if self.dp_group is None else all_reduce_mean_scalar(loss, self.dp_group)

    def forward(self, *args, **kwargs):
        raise BadInput("a pipelined module runs forward and backward together: call loss = module.step(*inputs), "
                       "then opt.step()")

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """This rank's parameters under the model's own names (a tied weight once)."""
        seen = set()
        for stage in self.stages:
            for name, p in stage.named_parameters(prefix=prefix, recurse=recurse):
                if id(p) not in seen or not remove_duplicate:
                    seen.add(id(p))
                    yield name, p

    def state_dict(self, *args, **kwargs):
        """This rank's parameters and buffers under the model's own names."""
        out = {}
        for stage in self.stages:
            out.update(stage.state_dict(*args, **kwargs))
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's unsharded tensors under its original names, on every rank (collective: every
        rank must call it): tp shards are gathered over the tp group, every stage's entries over the
        pipeline; loads into the plain model or into a module emitted from another plan."""
        local = {}
        for name, t in self.state_dict().items():
            if isinstance(t, DTensor):  # ZeRO: gather the data-parallel parts
                t = t.full_tensor()
            if name in self.param_shards:
                t = unshard(t, *self.param_shards[name], self.mesh.group("tp"))
            local[name] = t.detach().clone()
        parts: list[dict | None] = [None] * self.runner.pp
        dist.all_gather_object(parts, local, group=self.runner.group)
        held = {k: v for part in parts for k, v in part.items()}
        return {name: held[name_held] for name, name_held in self.aliases.items()}
