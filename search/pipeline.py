"""Pipeline search: stage cuts over the folding's regions, microbatches and schedule (DESIGN §3–4).

The mesh is ``pp × dp × tp`` (tp innermost, inside a node; pp outermost). Each region (a block, or
a run of nodes outside blocks) is priced per microbatch at the tp degree with its full Megatron
layout (``Space.region_sharded``). Cuts balance predicted time, not layer count: for a stage count
p, bisection finds the smallest bottleneck whose greedy left-to-right partition fits in p stages
and in memory, so embedding and LM-head stages come out uneven, as they should. Prefix sums make
every stage's time and memory O(1).

Per step, with per-microbatch stage times t_s = F_s + B_s + W_s (forward, input-gradient,
weight-gradient, split in proportion to their FLOPs: a weight's gradient costs one forward matmul,
attention's backward is all input-gradient), bottleneck t = max t_s and
m microbatches: ideal time m·t plus the bubble of the schedule (DESIGN §4):

=============  ====================================  =====================================
schedule       bubble (time)                         activations held by stage s (0-based)
=============  ====================================  =====================================
gpipe          (p−1)·t                               m microbatches
1f1b           (p−1)·t                               min(m, p−s)
interleaved    (p−1)·t / v            (v = 2)        min(m, p−s) · (1 + (p−1)/(p·v))
zb-h1          (p−1)·(F + B − W)                     min(m, p−s)
zbv            max(0, (p−1)·(F + B − 2W))            min(m, p−s)
wave           (p−1)·t / (2·w)        (w = 1 wave)   min(m, p−s)
=============  ====================================  =====================================

(F, B, W of the bottleneck stage; every schedule needs m ≥ p microbatches.) The wave (Hanayo) row is a model: each wave sweeps down and up
the stages, so a device holds 2w chunks and fills the pipeline like interleaving with v = 2w at
1F1B memory; it is still to be checked against measured idle time on CPU ranks. Under full
recompute a stage keeps each block's input per microbatch in flight plus one block's activations
(the largest region of the model: a conservative bound). Stage-to-stage traffic is one p2p send of
the cut's activations forward and one of their gradients backward per microbatch; data-parallel
gradient traffic runs per stage in parallel (the slowest stage counts).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Callable

from search import cost
from search.candidate import Candidate, dp_sync, work_time
from search.cluster import Cluster
from search.memory import model_state_bytes
from search.space import Space, TPStats

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zbv", "wave")
INTERLEAVE_V = 2
WAVES = 1


@dataclass
class Stage:
    regions: tuple[int, int]      # [first, last) region indices
    time_s: float                 # forward + backward of one microbatch, incl. tp all-reduces and p2p
    fwd_s: float
    wgrad_s: float
    params: int                   # parameters one device holds (after tp, before ZeRO)
    memory: dict = field(default_factory=dict)  # bytes per device, by component


@dataclass
class Regions:
    """Per-microbatch prefix sums over the regions (index i covers regions [0, i))."""

    time: list[float]
    fwd: list[float]
    wgrad: list[float]
    params: list[int]
    act: list[float]          # activations held per microbatch without recompute
    kept: list[float]         # ... with full recompute (block inputs, activations outside blocks)
    largest: float            # one region's activations at most (recomputed one block at a time)
    send: list[float]         # bytes a cut before region i sends (per microbatch, each direction)

    @classmethod
    def build(cls, rows: list[tuple[float, float, int, float, float, float, float]]) -> "Regions":
        """``rows``: (time, fwd time, wgrad time, params, act, kept, region act, input bytes) per region."""
        cols = list(zip(*rows))
        pre = [list(accumulate(c, initial=0)) for c in cols[:6]]
        return cls(*pre, max(cols[6], default=0.0), list(cols[7]))

    def __len__(self) -> int:
        return len(self.time) - 1


def inflight(schedule: str, p: int, s: int, m: int) -> float:
    """Microbatches of activations stage ``s`` of ``p`` holds at its peak."""
    if schedule == "gpipe":
        return m
    held = min(m, p - s)
    return held * (1 + (p - 1) / (p * INTERLEAVE_V)) if schedule == "interleaved" else held


def bubble(schedule: str, p: int, t: float, fwd: float, w: float) -> float:
    """Idle time per step of the bottleneck stage (per-microbatch time ``t``: forward ``fwd``,
    weight-gradient ``w``, input-gradient the rest)."""
    if p == 1:
        return 0.0
    b = t - fwd - w
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) * t
    if schedule == "interleaved":
        return (p - 1) * t / INTERLEAVE_V
    if schedule == "zb-h1":
        return (p - 1) * (fwd + b - w)
    if schedule == "zbv":
        return max(0.0, (p - 1) * (fwd + b - 2 * w))
    return (p - 1) * t / (2 * WAVES)


def stage_memory(rg: Regions, a: int, b: int, *, s: int, p: int, m: int, schedule: str, dtype: str, zero: int,
                 dp: int, full: bool) -> dict:
    """Bytes per device of the stage holding regions [a, b) at position ``s``."""
    states = model_state_bytes(rg.params[b] - rg.params[a], dtype=dtype, zero_stage=zero, dp=dp)
    held = inflight(schedule, p, s, m)
    act = held * (rg.kept[b] - rg.kept[a]) + rg.largest if full else held * (rg.act[b] - rg.act[a])
    return {**states, "activations": act}


def partition(rg: Regions, p: int, fits: Callable[[int, int, int], bool]) -> list[tuple[int, int]] | None:
    """Cut the regions into ``p`` contiguous stages minimizing the slowest one; ``fits(s, a, b)`` says
    whether stage ``s`` may hold regions [a, b). None when no cut fits."""
    n = len(rg)
    if p > n:
        return None
    lo = max(rg.time[i + 1] - rg.time[i] for i in range(n))
    hi = rg.time[n]
    best = _greedy(rg, p, hi, fits)
    if best is None:
        return None
    for _ in range(40):
        if hi - lo <= 1e-6 * hi:
            break
        mid = (lo + hi) / 2
        cut = _greedy(rg, p, mid, fits)
        if cut is None:
            lo = mid
        else:
            hi, best = mid, cut
    return best


def _greedy(rg: Regions, p: int, limit: float, fits) -> list[tuple[int, int]] | None:
    """Each stage takes as many regions as ``limit`` seconds and memory allow, leaving one region
    for each later stage; exactly ``p`` stages or None."""
    n = len(rg)
    stages, a = [], 0
    for s in range(p):
        last = n - (p - 1 - s)
        if s == p - 1:
            e = n
        else:  # the furthest end within the time limit, then back off while memory does not fit
            e = min(last, bisect.bisect_right(rg.time, rg.time[a] + limit, lo=a + 1) - 1)
        if e <= a:
            return None
        lo, hi = a, e  # largest end in (a, e] that fits: fits is monotone in the end
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(s, a, mid):
                lo = mid
            else:
                hi = mid - 1
        if lo == a or (s == p - 1 and (lo < n or rg.time[n] - rg.time[a] > limit)):
            return None
        stages.append((a, lo))
        a = lo
    return stages


def regions_for(space: Space, cl: Cluster, dtype: str, scale: float, *, micro: int, graph_batch: int,
                tp_spans: bool, full: bool) -> Regions:
    """Prefix sums of every region's per-microbatch time, parameters and activations."""
    per_sample = scale / graph_batch * micro
    rows = []
    for r in space.regions:
        w = space.region_sharded(r)
        comp, tp_s, _ = work_time(w, cl, dtype, scale, space.tp, tp_spans, micro / graph_batch, per_sample, 1, full)
        t = comp + tp_s
        flops = w.fwd_flops + w.bwd_flops
        fwd, wgrad = (t * w.fwd_flops / flops, t * w.wgrad_flops / flops) if flops else (t / 3, t / 3)
        act = w.act_bytes * per_sample
        kept = act if r.template is None else r.input_bytes * per_sample
        rows.append((t, fwd, wgrad, w.params, act, kept, act, r.input_bytes * per_sample))
    return Regions.build(rows)


def pipeline_candidates(rg: Regions, cl: Cluster, dtype: str, *, layout: TPStats, pp: int, dp: int, zero: int,
                        micro: int, m: int, recompute: str, schedules, limit: float, mesh: tuple[int, int, int],
                        cache: dict) -> list[Candidate]:
    """One priced candidate per schedule for ``pp`` stages; ``cache`` keeps the time-balanced cuts of
    this ``rg`` (memory is checked per schedule; a cut that does not fit is re-balanced under memory)."""
    if m < pp:
        return []
    spans = [cost.group_spans_nodes(mesh, axis, cl.devices_per_node) for axis in range(3)]
    full = recompute == "full"
    if (id(rg), pp) not in cache:
        cache[(id(rg), pp)] = partition(rg, pp, lambda s, a, b: True)
    out = []
    for schedule in schedules:
        def mem(s, a, b):
            return stage_memory(rg, a, b, s=s, p=pp, m=m, schedule=schedule, dtype=dtype, zero=zero, dp=dp,
                                full=full)

        def fits(s, a, b):
            return sum(mem(s, a, b).values()) <= limit

        cuts = cache[(id(rg), pp)]
        if cuts is not None and not all(fits(s, a, b) for s, (a, b) in enumerate(cuts)):
            cuts = partition(rg, pp, fits)
        c = Candidate(dp, mesh[2], zero, micro, m, recompute, layout=layout, pp=pp, schedule=schedule)
        if cuts is None:  # nothing fits: price the time-balanced cut to report its memory
            cuts = cache[(id(rg), pp)]
            c.feasible = False
        if cuts is None:
            c.reason = f"pp={pp} needs at least {pp} regions"
            out.append(c)
            continue
        stages, sent = [], 0.0
        for s, (a, b) in enumerate(cuts):
            send = rg.send[b] if b < len(rg) else 0.0
            hop = cost.collective_time("p2p", send, 2, cl, spans_nodes=spans[0]) if send else 0.0
            t = rg.time[b] - rg.time[a] + 2 * hop
            sync_s, sync_b = dp_sync(rg.params[b] - rg.params[a], cl, dtype, dp, zero, m, spans[1])
            stages.append((Stage((a, b), t, rg.fwd[b] - rg.fwd[a] + hop, rg.wgrad[b] - rg.wgrad[a],
                                 rg.params[b] - rg.params[a], mem(s, a, b)), sync_s, sync_b))
            sent += 2 * m * cost.bytes_sent_per_rank("p2p", send, 2)
        slow = max((st for st, _, _ in stages), key=lambda st: st.time_s)
        c.stages = [st for st, _, _ in stages]
        c.bubble_s = bubble(schedule, pp, slow.time_s, slow.fwd_s, slow.wgrad_s)
        dp_s = max(sync for _, sync, _ in stages)
        c.breakdown = {"pipeline_work": m * slow.time_s, "dp_gradients": dp_s}  # + the bubble
        c.step_time_s = sum(c.breakdown.values()) + c.bubble_s
        c.comm_bytes = sent + max(b for _, _, b in stages)
        c.memory = max((st.memory for st in c.stages), key=lambda d: sum(d.values()))
        if c.feasible and c.peak_memory > limit:
            c.feasible = False
        if not c.feasible:
            c.reason = f"pp={pp} {schedule}: the leanest stage cut needs {c.peak_memory / 2**30:.3g} GiB per device"
        out.append(c)
    return out
