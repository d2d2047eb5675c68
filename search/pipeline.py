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

(F, B, W of the bottleneck rank; every schedule needs m ≥ p microbatches.) Interleaved, zbv and wave
cut the model into v = 2 chunks per rank, placed as torch places them (a loop k mod p, or a V); a
rank's time and memory are its chunks' sums. The wave (Hanayo) row is a model: each wave sweeps down and up
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
CHUNKS = {"gpipe": 1, "1f1b": 1, "zb-h1": 1, "interleaved": INTERLEAVE_V, "zbv": 2, "wave": 2 * WAVES}  # per rank


@dataclass
class Stage:
    """One model chunk of a pipeline (a rank holds one, or v of them)."""

    regions: tuple[int, int]      # [first, last) region indices
    rank: int                     # pipeline rank that runs it
    time_s: float                 # forward + backward of one microbatch, incl. tp all-reduces and p2p
    fwd_s: float
    wgrad_s: float
    params: int                   # parameters (after tp, before ZeRO)
    memory: dict = field(default_factory=dict)  # bytes per device of its rank, by component
    p2p_s: float = 0.0            # of time_s: its output sent forward and its gradient sent back


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
    blocks: list[int]         # repeated blocks (ZeRO shards each as its own FSDP unit)

    @classmethod
    def build(cls, rows: list[tuple[float, float, float, int, float, float, float, float, bool]]) -> "Regions":
        """``rows``: (time, fwd time, wgrad time, params, act, kept, region act, input bytes, is a block)
        per region."""
        cols = list(zip(*rows))
        pre = [list(accumulate(c, initial=0)) for c in cols[:6]]
        return cls(*pre, max(cols[6], default=0.0), list(cols[7]), list(accumulate(map(int, cols[8]), initial=0)))

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


def stage_memory(rg: Regions, ranges: list[tuple[int, int]], *, s: int, p: int, m: int, schedule: str, dtype: str,
                 zero: int, dp: int, full: bool) -> dict:
    """Bytes per device of pipeline rank ``s`` holding the regions ``ranges`` ([a, b) each)."""
    span = lambda pre: sum(pre[b] - pre[a] for a, b in ranges)  # noqa: E731
    states = model_state_bytes(span(rg.params), dtype=dtype, zero_stage=zero, dp=dp)
    held = inflight(schedule, p, s, m)
    act = held * span(rg.kept) + rg.largest if full else held * span(rg.act)
    return {**states, "activations": act}


def partition(rg: Regions, p: int, fits: Callable[[int, int, int], bool],
              owner: list[int] | None = None) -> list[tuple[int, int]] | None:
    """Cut the regions into ``p`` contiguous stages minimizing the slowest rank, where ``owner[s]`` is
    the rank running stage s (default: one stage per rank); ``fits(s, a, b)`` says whether stage ``s``
    may hold regions [a, b). None when no cut fits."""
    owner = owner or list(range(p))
    n = len(rg)
    if p > n:
        return None
    lo = max(rg.time[i + 1] - rg.time[i] for i in range(n))
    hi = rg.time[n]
    best = _greedy(rg, p, hi, fits, owner)
    if best is None:
        return None
    for _ in range(40):
        if hi - lo <= 1e-6 * hi:
            break
        mid = (lo + hi) / 2
        cut = _greedy(rg, p, mid, fits, owner)
        if cut is None:
            lo = mid
        else:
            hi, best = mid, cut
    return best


def _greedy(rg: Regions, p: int, limit: float, fits, owner: list[int]) -> list[tuple[int, int]] | None:
    """Each stage takes as many regions as its rank's remaining ``limit`` seconds and memory allow,
    leaving one region for each later stage; exactly ``p`` stages or None."""
    n = len(rg)
    stages, a = [], 0
    used = dict.fromkeys(owner, 0.0)
    for s in range(p):
        last = n - (p - 1 - s)
        budget = limit - used[owner[s]]
        if s == p - 1:
            e = n
        else:  # the furthest end within the time budget, then back off while memory does not fit
            e = min(last, bisect.bisect_right(rg.time, rg.time[a] + budget, lo=a + 1) - 1)
        if e <= a:
            return None
        lo, hi = a, e  # largest end in (a, e] that fits: fits is monotone in the end
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(s, a, mid):
                lo = mid
            else:
                hi = mid - 1
        if lo == a or (s == p - 1 and (lo < n or rg.time[n] - rg.time[a] > budget)):
            return None
        used[owner[s]] += rg.time[lo] - rg.time[a]
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
        comp, tp_s, _ = work_time(w, cl, dtype, scale, space.tp, tp_spans, micro / graph_batch, per_sample, 1,
                                  "full" if full else "none")
        t = comp + tp_s
        flops = w.fwd_flops + w.bwd_flops
        fwd, wgrad = (t * w.fwd_flops / flops, t * w.wgrad_flops / flops) if flops else (t / 3, t / 3)
        act = w.act_bytes * per_sample
        kept = act if r.template is None else r.input_bytes * per_sample
        rows.append((t, fwd, wgrad, w.params, act, kept, act, r.input_bytes * per_sample, r.template is not None))
    return Regions.build(rows)


def _slowest_rank(rg: Regions, cuts: list[tuple[int, int]], ranks: list[int]) -> float:
    load = dict.fromkeys(ranks, 0.0)
    for (a, b), r in zip(cuts, ranks):
        load[r] += rg.time[b] - rg.time[a]
    return max(load.values())


def chunk_ranks(schedule: str, p: int) -> list[int]:
    """The pipeline rank of each model chunk (torch's placement): one chunk per rank, a loop of v
    chunks (interleaved: chunk k on rank k mod p), or a V (zbv, wave: down the ranks, then back up)."""
    v = CHUNKS[schedule]
    if v == 1:
        return list(range(p))
    if schedule == "interleaved":
        return [k % p for k in range(v * p)]
    return [k if k < p else 2 * p - 1 - k for k in range(2 * p)]


def pipeline_candidates(rg: Regions, cl: Cluster, dtype: str, *, layout: TPStats, pp: int, dp: int, zero: int,
                        micro: int, m: int, recompute: str, schedules, limit: float, mesh: tuple[int, int, int],
                        cache: dict) -> list[Candidate]:
    """One priced candidate per schedule for ``pp`` pipeline ranks. The model is cut into v chunks per
    rank (``CHUNKS``), balanced by time; ``cache`` keeps the time-balanced cuts of this ``rg``, and a
    cut whose ranks do not fit memory is re-balanced with each chunk held to its share of the limit."""
    if m < pp:
        return []
    spans = [cost.group_spans_nodes(mesh, axis, cl.devices_per_node) for axis in range(3)]
    full = recompute == "full"
    out = []
    for schedule in schedules:
        ranks = chunk_ranks(schedule, pp)
        v, n = CHUNKS[schedule], len(ranks)
        if (id(rg), schedule) not in cache:  # the better of chunk-balanced and rank-budgeted cuts
            cuts = [c for c in (partition(rg, n, lambda k, a, b: True),
                                partition(rg, n, lambda k, a, b: True, ranks)) if c is not None]
            cache[(id(rg), schedule)] = min(cuts, key=lambda c: _slowest_rank(rg, c, ranks), default=None)

        def mem(d, ranges):
            return stage_memory(rg, ranges, s=d, p=pp, m=m, schedule=schedule, dtype=dtype, zero=zero, dp=dp,
                                full=full)

        def fits(cuts):
            return all(sum(mem(d, [c for c, r in zip(cuts, ranks) if r == d]).values()) <= limit for d in range(pp))

        cuts = cache[(id(rg), schedule)]
        if cuts is not None and not fits(cuts):
            cuts = partition(rg, n, lambda k, a, b: sum(mem(ranks[k], [(a, b)]).values()) <= limit / v, ranks)
        c = Candidate(dp, mesh[2], zero, micro, m, recompute, layout=layout, pp=pp, schedule=schedule)
        if cuts is None or not fits(cuts):  # nothing fits: price the time-balanced cut to report its memory
            cuts = cache[(id(rg), schedule)]
            c.feasible = False
        if cuts is None:
            c.reason = f"pp={pp} {schedule} needs at least {n} regions"
            out.append(c)
            continue
        chunks, sent = [], 0.0
        for k, (a, b) in enumerate(cuts):
            send = rg.send[b] if b < len(rg) else 0.0
            hop = cost.collective_time("p2p", send, 2, cl, spans_nodes=spans[0]) if send else 0.0
            chunks.append(Stage((a, b), ranks[k], rg.time[b] - rg.time[a] + 2 * hop, rg.fwd[b] - rg.fwd[a] + hop,
                                rg.wgrad[b] - rg.wgrad[a], rg.params[b] - rg.params[a], p2p_s=2 * hop))
            sent += 2 * m * cost.bytes_sent_per_rank("p2p", send, 2) / v  # per rank, averaged over its chunks
        devices = []
        for d in range(pp):
            own = [ch for ch in chunks if ch.rank == d]
            params = sum(ch.params for ch in own)
            # as emitted (passes.zero): each chunk an FSDP root unit, each block in it a unit of its own
            units = sum(1 + rg.blocks[b] - rg.blocks[a] for a, b in (ch.regions for ch in own))
            devices.append((sum(ch.time_s for ch in own), sum(ch.fwd_s for ch in own), sum(ch.wgrad_s for ch in own),
                            mem(d, [ch.regions for ch in own]),
                            dp_sync(params, cl, dtype, dp, zero, m, spans[1], units=units)))
        for ch in chunks:
            ch.memory = devices[ch.rank][3]
        t, fwd, wgrad, _, _ = max(devices, key=lambda x: x[0])
        c.stages = chunks
        c.bubble_s = bubble(schedule, pp, t, fwd, wgrad)
        dp_s = max(x[4][0] for x in devices)
        c.breakdown = {"pipeline_work": m * t, "dp_gradients": dp_s}  # + the bubble
        c.step_time_s = sum(c.breakdown.values()) + c.bubble_s
        c.comm_bytes = sent + max(x[4][1] for x in devices)
        c.memory = max((x[3] for x in devices), key=lambda d: sum(d.values()))
        if c.feasible and c.peak_memory > limit:
            c.feasible = False
        if not c.feasible:
            c.reason = f"pp={pp} {schedule}: the leanest stage cut needs {c.peak_memory / 2**30:.3g} GiB per device"
        out.append(c)
    return out


def simulate(schedule: str, ranks: list[int], times: list[tuple[float, float, float]], m: int
             ) -> list[tuple[int, str, int, int, float, float]]:
    """A timeline of ``m`` microbatches through the chunks (``ranks[k]`` runs chunk k; ``times[k]`` =
    its forward, input-gradient and weight-gradient seconds): (rank, "F"|"B"|"W", chunk, microbatch,
    start, end) by list scheduling — each step starts the action that can start first, ties to the
    schedule's preference. GPipe runs all forwards first; the others keep at most v·(p − rank)
    microbatches in flight per rank and prefer backward; the zero-bubble schedules (zb-h1, zbv) run
    weight gradients separately, last in preference, so they fill the gaps. For pictures and checks
    of the bubble formulas, not for pricing."""
    n, p = len(ranks), max(ranks) + 1
    split_w = schedule in ("zb-h1", "zbv")
    limit = [_cap(schedule, p, r) for r in range(p)]
    first = [min(c for c in range(n) if ranks[c] == r) for r in range(p)]  # a microbatch enters a rank here
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * p
    inflight_mb = [0] * p
    left = {(kind, k, i) for k in range(n) for i in range(m) for kind in ("FBW" if split_w else "FB")}
    out = []
    order = {"F": 1, "B": 0, "W": 2} if schedule != "gpipe" else {"F": 0, "B": 1, "W": 2}
    while left:
        best = None
        for kind, k, i in left:
            r = ranks[k]
            dep = {"F": ("F", k - 1, i) if k else None, "B": ("B", k + 1, i) if k < n - 1 else ("F", k, i),
                   "W": ("B", k, i)}[kind]
            if dep is not None and dep not in done:
                continue
            if kind == "F" and k == first[r] and inflight_mb[r] >= limit[r] and schedule != "gpipe":
                continue
            if kind == "B" and schedule == "gpipe" and any(("F", k, j) not in done for j in range(m)):
                continue
            start = max(free[r], done[dep] if dep is not None else 0.0)
            key = (start, order[kind], i, k)
            if best is None or key < best[0]:
                best = (key, kind, k, i)
        (start, _, _, _), kind, k, i = best
        r = ranks[k]
        f, b, w = times[k]
        end = start + {"F": f, "B": b if split_w else b + w, "W": w}[kind]
        out.append((r, kind, k, i, start, end))
        done[(kind, k, i)] = end
        free[r] = end
        left.discard((kind, k, i))
        if k == first[r] and kind in "FB":
            inflight_mb[r] += 1 if kind == "F" else -1
    return sorted(out, key=lambda a: (a[0], a[4]))


def _cap(schedule: str, p: int, r: int) -> int:
    """Microbatches rank ``r`` lets in before its first backward (1F1B's warm-up, v chunks deep)."""
    return CHUNKS[schedule] * p - r
