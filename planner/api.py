"""Public API: ``make_plan`` (no process group needed) and ``auto_parallelize`` (inside torchrun).

    # train.py, run as: torchrun --nproc-per-node 4 train.py
    dmodel = auto_parallelize(model, (idx, targets))      # plans for the local ranks, then emits
    loss = dmodel(idx, targets)                            # same global batch on every rank
    loss.backward(); opt.step()                            # opt over dmodel.parameters()
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from planner.capture import capture, capture_symbolic, example_sizes
from planner.models import resolve_model
from planner.plan import Plan, decision
from search.baseline import best, enumerate_candidates, shard_all
from search.candidate import Candidate
from search.cluster import Cluster, cpu_cache_path, get_cluster
from search.errors import AutoparError, BadInput, Infeasible
from search.opspace import ops_candidates
from search.fold import fold as fold_graph
from search.fold import no_fold
from search.placement import propagate
from search.range import Bounds, Outcome, plan_range
from search.recompute import block_scopes
from search.seqpar import preference
from search.specialize import Specializer
from search.strategy import ilp_select
from search.symbolic import SYMBOLS

_RUNNERS_UP = 4


def load_cluster(cluster: Cluster | str | None, devices: int | None = None) -> Cluster:
    """A Cluster from a built-in name, a JSON file or an object; ``cpu`` is measured on first use."""
    if isinstance(cluster, Cluster):
        return cluster.with_devices(devices) if devices else cluster
    name = cluster or "cpu"
    if name != "cpu":
        return get_cluster(name, devices)
    from runtime.calibrate import calibration_lock

    ranks = devices or 2
    with calibration_lock(ranks):  # ranks that start together wait for one measurement
        if not cpu_cache_path(ranks).exists():
            _calibrate_in_subprocess(ranks)
    return get_cluster(name, ranks)


def _calibrate_in_subprocess(ranks: int) -> None:
    """Measure the local machine for ``ranks`` ranks in a clean process (torchrun's variables would
    hijack its ranks); the caller holds the calibration lock."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                        "GROUP_RANK", "ROLE_RANK") and not k.startswith("TORCHELASTIC")}
    done = subprocess.run([sys.executable, "-m", "runtime.calibrate", "--ranks", str(ranks), "--locked"], env=env,
                          capture_output=True, text=True, cwd=str(Path(__file__).resolve().parent.parent),
                          timeout=300)
    if done.returncode != 0:
        raise BadInput(f"measuring the local cpu profile failed: {done.stderr.strip()[-500:]}; "
                       "run `python -m runtime.calibrate` by hand or pass a cluster JSON file")


def make_plan(model: torch.nn.Module, example_inputs, cluster: Cluster | str, *, global_batch=None,
              seq_len=None, dtype: str = "bf16", memory_limit: float | None = None, fix: dict | None = None,
              fold: bool = True, search: str = "ilp", timings: bool = False, name: str | None = None) -> Plan:
    """Capture ``model`` on ``example_inputs`` (a tuple of args, or ``(args, kwargs)``) and choose a plan.

    ``example_inputs`` hold the global batch (meta tensors are fine). ``memory_limit`` is bytes per
    device (default: the cluster's device memory). ``fix`` pins degrees, e.g. ``{"tp": 2, "zero": 1}``.
    ``search`` is ``"ilp"`` (the ILP picks the tensor-parallel cones; ``fold`` solves each repeated
    block once), ``"enumerate"`` (the full Megatron pattern for every degree: the oracle) or ``"ops"``
    (Alpa's per-op ILP: every op's Replicate/Shard/Partial placement on both axes of each dp × tp mesh,
    ``search.opspace``; one microbatch, no ZeRO, pipeline, sequence parallelism or recompute yet).

    A range ``seq_len=(lo, hi)`` or ``(lo, hi, step)`` (or ``global_batch=(lo, hi[, step])``) plans the
    whole grid ``lo, lo + step, ..., hi`` from one symbolic capture and returns a piecewise plan: the
    plan at ``lo`` with a ``range`` section listing each piece, the breakpoints and the predicted
    curve (``search.range``; ``Plan.piece_for(value)`` selects a piece). The example inputs' sequence
    must then reach ``hi`` where the model has position tables.
    """
    if search not in ("ilp", "enumerate", "ops"):
        raise BadInput(f"unknown search {search!r}; use 'ilp', 'enumerate' or 'ops'")
    start = time.perf_counter()
    cl = load_cluster(cluster)
    args, kwargs = split_inputs(example_inputs)
    grid = _grid(global_batch, seq_len)
    options = dict(dtype=dtype, memory_limit=memory_limit, fix=fix, fold=fold, search=search)
    if grid is not None and search == "ops":
        raise BadInput("range plans (--seq LO..HI, --global-batch LO..HI) use the cone search; plan points "
                       "with the per-op search")
    if grid is not None:
        return _range_plan(model, args, kwargs, cl, grid, global_batch, name or type(model).__name__, start, timings,
                           options)
    mg = capture(model, args, kwargs, name=name or type(model).__name__)
    plan, _, why = _point_plan(mg, cl, global_batch or mg.batch_size, **options)
    if plan is None:
        raise Infeasible(why)
    if timings:
        plan["search"]["seconds"] = round(time.perf_counter() - start, 3)
    return Plan.from_dict(plan)


def _point_plan(mg, cl: Cluster, gb: int, *, dtype, memory_limit, fix, fold, search,
                bounds: Bounds | None = None) -> tuple[dict | None, list, str]:
    """(plan dict or None when nothing fits, every candidate priced, why nothing fits) of the captured
    ``mg``; a range search's ``bounds`` skip configurations (no candidates: all were skipped)."""
    folding = fold_graph(mg) if fold else no_fold(mg)
    if search == "ops":
        cands = ops_candidates(mg, cl, global_batch=gb, dtype=dtype, memory_limit=memory_limit, fix=fix,
                               folding=folding)
    else:
        cands = enumerate_candidates(mg, cl, global_batch=gb, dtype=dtype, memory_limit=memory_limit, fix=fix,
                                     select=ilp_select if search == "ilp" else shard_all, folding=folding,
                                     bounds=bounds)
    if not cands:
        return None, cands, ""
    try:
        win = best(cands, memory_limit if memory_limit is not None else cl.memory_bytes)
    except Infeasible as exc:
        return None, cands, str(exc)
    if win.tp > 1 and not win.placements:
        propagate(mg.gm, win.styles, win.tp)  # what is priced must be what the passes can run
    plan = {
        "version": 1,
        "model": {"name": mg.name, "params": mg.num_params, "layers": mg.layers},
        "cluster": {"name": cl.name, "devices": cl.devices, "devices_per_node": cl.devices_per_node},
        "global_batch": gb,
        "seq_len": mg.seq_len,
        "dtype": dtype,
        "mesh": _mesh(win),
        "degrees": {"dp": win.dp, "tp": win.tp, "pp": win.pp, "sp": win.sp_degree, "zero": win.zero},
        "pipeline": {"schedule": win.schedule, "microbatches": win.microbatches,
                     "microbatch_size": win.microbatch_size, "stages": _stages(win, folding)},
        "tensor_parallel": {m: {"style": s, "groups": g} for m, (s, g) in win.styles.items()},
        "megatron_sp": win.megatron_sp,
        "sequence_parallel": _sequence_parallel(win),
        "placements": win.placements,
        "templates": [{"id": t.id, "hash": t.hash[:16], "instances": len(t.instances), "first": t.instances[0],
                       "nodes": t.num_nodes, "params": t.num_params} for t in folding.templates],
        "chunking": win.chunking,
        "recompute": win.recompute,
        "predicted": _predicted(win, mg, cl, dtype, gb),
        "search": {"seconds": None, "folded": fold,
                   "unique_blocks": len(folding.templates), "ilp_variables": win.solver.get("variables", 0),
                   "solver_status": win.solver.get("status", "enumerated"), "candidates": len(cands)},
        "alternatives": [_alternative(c, win) for c in _runners_up(cands, win)],
        "warnings": list(mg.warnings) + win.warnings,
    }
    return plan, cands, ""


def _range_plan(model, args, kwargs, cl: Cluster, grid: tuple, global_batch, name: str, start: float,
                timings: bool, options: dict) -> Plan:
    """The piecewise plan over ``grid`` = (symbol, lo, hi, step): one symbolic capture, specialised and
    searched at the values ``search.range.plan_range`` asks for."""
    symbol, lo, hi, step = grid
    mg = capture_symbolic(model, args, kwargs, name=name, batch_dim=0 if symbol == "B" else None,
                          seq_dims=(1,) if symbol == "S" else (), folded=options["fold"])
    at = Specializer(mg)
    example_batch, example_seq = example_sizes(args, kwargs)
    limit = options["memory_limit"] if options["memory_limit"] is not None else cl.memory_bytes
    plans: dict[int, dict] = {}

    def search_at(v: int, bounds: Bounds) -> Outcome:
        point = at(v, example_seq) if symbol == "B" else at(example_batch, v)
        gb = v if symbol == "B" else (global_batch or example_batch)
        plan, cands, why = _point_plan(point, cl, gb, bounds=bounds, **options)
        if plan is None and bounds.only is None and bounds.skipped:  # nothing fits: the full search says why
            plan, cands, why = _point_plan(point, cl, gb, **options)
            bounds = Bounds()
        if plan is None:
            return Outcome(None, costs=_costs(cands, limit), reason=why, configs=_configs(cands, limit),
                           skipped=bounds.skipped)
        if bounds.only is None:
            plans[v] = plan
        return Outcome(json.dumps(decision(plan), sort_keys=True), _variant(cands[0]), _costs(cands, limit),
                       family=_config(cands[0]), configs=_configs(cands, limit), config=cands[0].config(),
                       skipped=bounds.skipped, inner=cands[0].chunk_key())

    result = plan_range(search_at, lo, hi, step, limit, SYMBOLS[symbol])
    pieces = [{"lo": p.lo, "hi": p.hi, "plan": plans.get(p.lo),
               "infeasible": p.outcome.reason if p.outcome.decision is None else "",
               "step_time_s": str(p.step_time) if p.step_time is not None else "",
               "peak_memory_bytes": str(p.memory) if p.memory is not None else ""} for p in result.pieces]
    first = next((p["plan"] for p in pieces if p["plan"] is not None), None)
    if first is None:
        raise Infeasible(f"no plan fits anywhere in {symbol} = {lo}..{hi}: at {lo}: {pieces[0]['infeasible']}")
    piece_of = {v: i for i, p in enumerate(result.pieces) for v in result.evaluated if p.lo <= v <= p.hi}
    top = dict(first)
    top["range"] = {
        "symbol": symbol, "lo": lo, "hi": hi, "step": step, "memory_limit_bytes": limit, "pieces": pieces,
        "breakpoints": [{"at": b.at, "cause": b.cause, "left": _cost_dict(b.left), "right": _cost_dict(b.right)}
                        for b in result.breakpoints],
        "samples": [{"at": v, "piece": piece_of[v],
                     "step_time_s": o.cost[0] if o.cost else None,
                     "peak_memory_bytes": o.cost[1] if o.cost else None,
                     "priced": len(o.configs), "skipped": o.skipped} for v, o in result.evaluated.items()],
    }
    if timings:
        top["search"] = dict(top["search"], seconds=round(time.perf_counter() - start, 3))
    return Plan.from_dict(top)


def _grid(global_batch, seq_len) -> tuple | None:
    """("S" or "B", lo, hi, step) when one of them is a range (a tuple), else None."""
    ranges = [(sym, v) for sym, v in (("B", global_batch), ("S", seq_len)) if isinstance(v, (tuple, list))]
    if isinstance(seq_len, int):
        raise BadInput("seq_len takes a range (lo, hi) or (lo, hi, step); a point plan's sequence length is "
                       "the example inputs'")
    if not ranges:
        return None
    if len(ranges) > 1:
        raise BadInput("plan over a range of the sequence length or of the global batch, not both at once")
    sym, v = ranges[0]
    what = "--seq" if sym == "S" else "--global-batch"
    if len(v) not in (2, 3) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise BadInput(f"{what} range must be LO..HI or LO..HI:STEP with integers, got {v!r}")
    lo, hi = v[0], v[1]
    step = v[2] if len(v) == 3 else _default_step(lo, hi)
    if not (1 <= lo <= hi) or step < 1 or (hi - lo) % step:
        raise BadInput(f"{what} {lo}..{hi}:{step}: need 1 <= LO <= HI and STEP dividing HI - LO "
                       f"(e.g. {lo}..{lo + (hi - lo) // step * step}:{step})")
    if sym == "S" and lo < 2:
        raise BadInput(f"--seq range must start at 2 or more (a symbolic capture specialises length 1), got {lo}")
    return sym, lo, hi, step


def _default_step(lo: int, hi: int) -> int:
    """The largest power of two dividing both ends, at most 128: lengths that split over any
    power-of-two sequence-parallel degree up to 64 in the zig-zag layout."""
    g = math.gcd(lo, hi)
    return min(g & -g, 128)


def _config(c: Candidate) -> tuple:
    """What makes two candidates one configuration across values of a range: the key (degrees, ZeRO,
    microbatch, recompute, schedule) and the chunked regions. The attention variant is the mesh's
    fastest at each value, so it is not part of it."""
    return (*c.key(), c.chunk_key())


def _variant(c: Candidate) -> tuple:
    """``_config`` with the attention variant (and its inner degree): the range search's finer key."""
    return _config(c) + ((c.sp.variant, c.sp.inner) if c.sp is not None else ())


def _costs(cands: list[Candidate], limit: float) -> dict:
    """Configuration -> (step time, peak memory, fits) of every candidate, also per attention variant
    priced for its mesh; a chunked one also gives its configuration without chunking (what it costs
    and whether it fits), so the range search sees memory cross the limit where chunking sets in."""
    out = {}
    for c in cands:
        out.setdefault(_config(c), (c.step_time_s, c.peak_memory, c.feasible))
        for ch, exposed, _ in c.sp_options:
            t = c.step_time_s - c.breakdown["sp_attention"] + exposed * c.microbatches
            out.setdefault(_config(c) + (ch.variant, ch.inner), (t, c.peak_memory, c.feasible))
        for chunks, cost in c.chunk_options.items():
            out.setdefault(_config(c)[:-1] + (chunks,), cost)
        if c.chunking:
            bare = c.peak_memory + c.chunk_freed
            out.setdefault(_config(c)[:-1] + ((),), (c.step_time_s - c.breakdown["chunk_recompute"], bare,
                                                       bare <= limit))
    return out


def _configs(cands: list[Candidate], limit: float) -> dict:
    """What a range search's bounds read (``search.range.Outcome.configs``): per configuration its least
    step time (before activation chunking, the cheapest of its schedules) and whether its memory fits
    ``limit`` (a configuration invalid at this value for another reason, e.g. a length its attention
    variant cannot split, may be valid at the next); candidates that were not priced are left out."""
    out: dict[tuple, tuple[float, bool]] = {}
    for c in cands:
        if c.memory:
            least, fits = out.get(c.config(), (math.inf, False))
            out[c.config()] = (min(least, c.step_time_s - c.breakdown.get("chunk_recompute", 0.0)),
                               fits or c.peak_memory <= limit)
    return out


def _cost_dict(cost) -> dict:
    if cost is None:
        return {"step_time_s": None, "peak_memory_bytes": None, "feasible": False}
    return {"step_time_s": cost[0], "peak_memory_bytes": cost[1], "feasible": cost[2]}


def make_plan_from_spec(model_spec: str, *, cluster: str = "a100-80g", devices: int | None = None,
                        global_batch=None, seq_len=None, dtype: str = "bf16",
                        memory_limit_gib: float | None = None, fix: dict | None = None, fold: bool = True,
                        timings: bool = False, search: str = "ilp") -> Plan:
    """The CLI's ``autopar plan``: resolve a zoo name / ``file.py:factory`` / ``hf:type`` and plan it
    (``seq_len`` / ``global_batch``: an int, or a range tuple as :func:`make_plan` takes)."""
    cl = load_cluster(cluster, devices)
    seq_range, batch_range = isinstance(seq_len, tuple), isinstance(global_batch, tuple)
    gb = global_batch[0] if batch_range else global_batch or cl.devices
    loaded = resolve_model(model_spec, batch=gb, seq=seq_len[1] if seq_range else seq_len, device="meta")
    limit = memory_limit_gib * 2**30 if memory_limit_gib is not None else None
    return make_plan(loaded.model, (loaded.args, loaded.kwargs), cl,
                     global_batch=global_batch if batch_range else gb, seq_len=seq_len if seq_range else None,
                     dtype=dtype, memory_limit=limit, fix=fix, fold=fold, timings=timings, name=loaded.name,
                     search=search)


def split_inputs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[0], tuple)
            and isinstance(example_inputs[1], dict)):
        return example_inputs[0], example_inputs[1]
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise BadInput("example_inputs must be a tensor, a tuple of inputs, or (args_tuple, kwargs_dict)")


def _predicted(c: Candidate, mg, cl: Cluster, dtype: str, gb: int) -> dict:
    model_flops = sum(n.meta["autopar"].fwd_flops + n.meta["autopar"].bwd_flops for n in mg.nodes())
    model_flops *= gb / mg.batch_size
    tflops = model_flops / cl.devices / c.step_time_s / 1e12 if c.step_time_s else 0.0
    return {
        "step_time_s": c.step_time_s,
        "peak_memory_bytes": int(c.peak_memory),
        "comm_bytes": int(c.comm_bytes),
        "bubble_fraction": c.bubble_s / c.step_time_s if c.step_time_s else 0.0,
        "tflops_per_device": tflops,
        "mfu": tflops * 1e12 / cl.peak(dtype),
        "breakdown": {**{f"time_{k}_s": v for k, v in c.breakdown.items()},
                      **{f"memory_{k}_bytes": int(v) for k, v in c.memory.items()},
                      **({"activations_freed_by_chunking_bytes": int(c.chunk_freed)} if c.chunking else {})},
    }


def _mesh(c: Candidate) -> dict:
    """Axes outer to inner, tp innermost (fastest links), then sp; size-1 sp and pp axes left out."""
    axes = {"pp": c.pp, "dp": c.dp, "sp": c.sp_degree, "tp": c.tp}
    keep = [a for a in axes if a in ("dp", "tp") or axes[a] > 1]
    return {"shape": [axes[a] for a in keep], "axes": keep}


def _sequence_parallel(c: Candidate) -> dict:
    """The attention variant and every variant priced for its degree (per step: × microbatches)."""
    if c.sp is None:
        return {}
    m = c.microbatches

    def entry(ch, exposed, sent):
        return {"variant": ch.variant, "inner": ch.inner, "exposed_s_per_step": exposed * m,
                "comm_bytes_per_step": int(sent * m)}

    chosen = next(o for o in c.sp_options if o[0] == c.sp)
    return {"variant": c.sp.variant, "degree": c.sp.degree, "inner": c.sp.inner, "layout": c.sp.layout,
            "comm_bytes_per_step": int(chosen[2] * m), "exposed_s_per_step": chosen[1] * m,
            "options": [entry(*o) for o in sorted(c.sp_options, key=preference)]}


def _stages(c: Candidate, folding) -> list[dict]:
    """Each pipeline stage (model chunk) in model order: its regions (blocks by scope), the pipeline
    rank that runs it, predicted time per microbatch and its rank's peak memory."""
    out = []
    for st in c.stages:
        regions = folding.regions[st.regions[0]:st.regions[1]]
        scopes = [r.scope for r in regions if r.scope]
        out.append({"regions": list(st.regions), "rank": st.rank,
                    "blocks": f"{scopes[0]}..{scopes[-1]}" if scopes else "",
                    "outside_blocks": sum(1 for r in regions if not r.scope),
                    "time_per_microbatch_s": st.time_s, "fwd_per_microbatch_s": st.fwd_s,
                    "wgrad_per_microbatch_s": st.wgrad_s, "peak_memory_bytes": int(sum(st.memory.values()))})
    return out


def _runners_up(cands: list[Candidate], win: Candidate) -> list[Candidate]:
    """Best candidate of each other (pp, dp, tp), then the leanest infeasible one if any."""
    def mesh(c):
        return c.pp, c.dp, c.sp_degree, c.tp

    seen = {mesh(win)}
    out = []
    for c in cands:
        if c.feasible and mesh(c) not in seen:
            seen.add(mesh(c))
            out.append(c)
    same = [c for c in cands if c.feasible and mesh(c) == mesh(win) and c is not win]
    out += same[:1]
    bad = [c for c in cands if not c.feasible]
    return (out + bad[:1])[:_RUNNERS_UP]


def _alternative(c: Candidate, win: Candidate) -> dict:
    return {
        "degrees": {"dp": c.dp, "tp": c.tp, "pp": c.pp, "sp": c.sp_degree},
        "attention": c.sp.variant if c.sp is not None else "none",
        "schedule": c.schedule,
        "zero": c.zero,
        "microbatch_size": c.microbatch_size,
        "recompute": c.recompute,
        "step_time_s": c.step_time_s,
        "peak_memory_bytes": int(c.peak_memory),
        "feasible": c.feasible,
        "why": c.reason if not c.feasible else _why_slower(c, win),
    }


def _why_slower(c: Candidate, win: Candidate) -> str:
    if not win.step_time_s or c.step_time_s <= win.step_time_s * 1.0005:
        return (f"same predicted step time, more memory ({c.peak_memory / 2**30:.2f} GiB vs "
                f"{win.peak_memory / 2**30:.2f} GiB)")
    delta = (c.step_time_s / win.step_time_s - 1) * 100
    if c.pp != win.pp:  # different breakdowns: name the pipeline's bubble and the work per step
        return (f"+{delta:.1f}% step time with pp={c.pp} ({c.schedule}: bubble {c.bubble_s * 1e3:.3g} ms, "
                f"work {c.breakdown.get('pipeline_work', 0.0) * 1e3:.3g} ms) vs pp={win.pp}")
    worst = max(c.breakdown, key=lambda k: c.breakdown[k] - win.breakdown.get(k, 0.0))
    return f"+{delta:.1f}% step time, mostly {worst.replace('_', ' ')} ({c.breakdown[worst] * 1e3:.3g} ms vs " \
           f"{win.breakdown.get(worst, 0.0) * 1e3:.3g} ms)"


def auto_parallelize(model: torch.nn.Module, example_inputs, *, cluster: Cluster | str | None = None,
                     plan: Plan | str | os.PathLike | None = None, constraints: dict | None = None,
                     memory_limit: float | None = None, search: str = "ilp"):
    """Plan (or load ``plan``) for the ranks torchrun started and return this rank's module.

    ``example_inputs`` hold the global batch: the tensors whose first dimension is the plan's global
    batch are the batched inputs, sliced over data-parallel ranks on every call. Without ``plan``,
    rank 0 plans (the other ranks' ``cluster``, ``constraints`` and ``memory_limit`` are not used)
    and broadcasts the plan, or its error, so every rank emits the same plan or raises the same error.

    A piecewise plan (``make_plan(..., seq_len=(lo, hi))``) runs the piece that holds the inputs'
    sequence length (or global batch, for a batch range).

    ``search="ops"`` plans with Alpa's per-op ILP (``make_plan``) and returns a ``PlacedModule``: the
    model's graph on DTensors placed op by op (every rank passes the global batch, gets whole outputs).

    Returns a ``DistributedModule`` (``loss = m(*inputs); loss.backward()``, or ``loss = m.step(*inputs)``:
    forward and backward of every microbatch, required when the plan accumulates gradients) for plans
    without a pipeline, ZeRO 0-3 included, or for a pipelined plan (pp > 1, with dp, tp and ZeRO 0-1) a
    ``PipelineModule`` whose ``loss = m.step(*inputs)`` runs forward and backward of all microbatches. Without a plan, pp=1 is
    pinned unless ``constraints`` ask for a pipeline, e.g. ``{"pp": 2, "dp": 1, "tp": 1, "microbatches": 4,
    "schedule": "1f1b"}``. Recompute (selective or full) is chosen when memory binds.
    """
    from passes.emit import batch_split, check_emittable, emit, emit_pipeline, plan_mesh
    from runtime.mesh import init_distributed

    rank, world = init_distributed()
    if plan is None:
        plan = _plan_on_rank0(model, example_inputs, cluster, constraints, memory_limit, rank, world, search)
    elif not isinstance(plan, Plan):
        plan = Plan.from_json(Path(plan))
    args, kwargs = split_inputs(example_inputs)
    if plan.range is not None:  # a piecewise plan: the piece for these inputs' length (or batch)
        batch_size, seq = example_sizes(args, kwargs)
        plan = plan.piece_for(seq if plan.range["symbol"] == "S" else batch_size)
    if plan.cluster["devices"] != world:
        raise BadInput(f"the plan is for {plan.cluster['devices']} devices but torchrun started {world} ranks; "
                       f"relaunch with --nproc-per-node {plan.cluster['devices']} or re-plan for {world}")
    check_emittable(plan)
    if plan.placements:  # a per-op plan runs on DTensor over the global batch, as it was captured and planned
        from passes.placements import emit_placements
        return emit_placements(capture(model, args, kwargs, name=plan.model["name"]).gm, plan)
    deg = plan.degrees
    mesh = plan_mesh(plan)
    batch = batch_split(plan, mesh, args, kwargs)
    if deg["pp"] > 1:  # capture one microbatch of this replica's slice; cut where the plan's stages start
        first = batch.microbatches(plan.pipeline["microbatches"])[0]
        mg = capture(model, *first(*batch(args, kwargs)), name=plan.model["name"])
        folding = fold_graph(mg)
        cuts = [folding.regions[st["regions"][0]].nodes[0] for st in plan.pipeline["stages"][1:]]
        blocks = block_scopes(mg, folding) if plan.recompute == "full" or deg["zero"] else []
        return emit_pipeline(mg.gm, plan, cuts, mesh, batch, blocks)
    first = batch.microbatches(plan.pipeline["microbatches"])[0]  # gradient accumulation: one microbatch
    mg = capture(model, *first.replica(*batch.replica(args, kwargs)), name=plan.model["name"])
    blocks = block_scopes(mg, fold_graph(mg)) if plan.recompute == "full" or deg["zero"] else []
    return emit(mg.gm, plan, mesh, batch, blocks)


def _plan_on_rank0(model, example_inputs, cluster, constraints, memory_limit, rank: int, world: int,
                   search: str = "ilp") -> Plan:
    """Rank 0 plans and broadcasts the plan JSON, or the error every rank then raises."""
    msg: list = [None]
    if rank == 0:
        try:
            cl = load_cluster(cluster if cluster is not None else "cpu", world)
            fix = {"pp": 1, **(constraints or {})}
            msg[0] = make_plan(model, example_inputs, cl, dtype="fp32", memory_limit=memory_limit, fix=fix,
                               name=type(model).__name__, search=search).to_json()
        except AutoparError as exc:
            msg[0] = exc
        except Exception as exc:
            msg[0] = RuntimeError(f"planning failed on rank 0: {type(exc).__name__}: {exc}")
            dist.broadcast_object_list(msg, src=0)
            raise
    dist.broadcast_object_list(msg, src=0)
    if isinstance(msg[0], Exception):
        raise msg[0]
    return Plan.from_json(msg[0])
