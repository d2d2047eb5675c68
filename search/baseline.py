"""The degree loop: every pp × dp × tp factorization priced on the captured graph, cheapest that fits wins.

With the :func:`shard_all` selector (the full Megatron layout of ``search.space``) it is the baseline
planner and the oracle the ILP selector (``search.strategy``) is tested against; FLOPs, collective
bytes and activation memory come from the nodes that are really sharded, not from a formula.

Choices per candidate: tp (inside a node), pp (only while nothing fits, ``search.pipeline``),
dp = devices / (tp · pp), ZeRO stage 0-3, microbatch size (gradient accumulation over the
per-replica batch), recompute (none / selective / full; selective without pp or sp) and, for
pipelines, the schedule.
Step time = compute + tensor-parallel all-reduces + data-parallel gradient traffic, with no overlap
assumed (an upper bound; DESIGN §4 formulas in ``search.cost``).
"""
from __future__ import annotations

from dataclasses import replace
from functools import cache, lru_cache, partial
from typing import Callable

from search import cost
from search.cluster import Cluster, normalize_dtype
from search.errors import BadInput, Infeasible
from search.graph import ModelGraph
from search.candidate import DTYPE_BYTES, Candidate, dp_sync, work_time
from search import chunking
from search.chunking import ChunkRegion, chunk_regions
from search.fold import Folding, excerpt, fold
from search.memory import model_state_bytes
from search import seqpar
from search.pipeline import SCHEDULES, pipeline_candidates, regions_for
from search.recompute import RECOMPUTE
from search.saved import annotate_saved
from search.seqpar import VARIANTS, SPChoice
from search.dsp import dsp_layout, dsp_traffic
from search.seqshard import Unsupported, propagate_seq
from search.space import MegatronSP, Space, build_space


CHUNKS = (2, 4, 8, 16, 32, 64)  # chunk counts the search tries (the pass takes any, dividing or not)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_degrees(fix: dict, devices: int, keys: tuple[str, ...]) -> None:
    """BadInput unless every pinned degree of ``keys`` in ``fix`` is a positive integer dividing ``devices``."""
    for key in keys:
        if key in fix and (isinstance(fix[key], bool) or not isinstance(fix[key], int) or fix[key] < 1
                           or devices % fix[key]):
            raise BadInput(f"--fix {key}={fix[key]} does not divide the {devices} devices; "
                           f"valid degrees: {divisors(devices)}")


def dtype_scale(mg: ModelGraph, dtype: str) -> float:
    """Bytes of ``dtype`` per byte of the dtype the graph was captured in (its parameters')."""
    dtypes = sorted(set(mg.param_dtypes.values()))
    captured = "fp32" if not dtypes or "float32" in dtypes else normalize_dtype(dtypes[0])
    return DTYPE_BYTES[dtype] / DTYPE_BYTES[captured]


def shard_all(space: Space, price: Callable[[dict[str, int]], Candidate], limit: float) -> Candidate:
    """The enumerator's layout: the full Megatron pattern (every cone sharded)."""
    return price(space.all_sharded())


def enumerate_candidates(mg: ModelGraph, cluster: Cluster, *, global_batch: int, dtype: str,
                         memory_limit: float | None = None, fix: dict | None = None,
                         select=shard_all, folding: Folding | None = None, bounds=None) -> list[Candidate]:
    """Price every (pp, dp, tp, zero, microbatch size, recompute, schedule); sorted best first,
    infeasible last. ``bounds`` (a range search's ``search.range.Bounds``) skips the configurations it
    rules out (the list is then empty when it rules out all).

    Without pipelining, ``select(space, price, limit)`` picks the tensor-parallel cones and returns
    the priced candidate: :func:`shard_all` (this module, the oracle) or ``search.strategy.ilp_select``.
    Pipelined candidates (``search.pipeline``) shard every cone of their stages. Like the experts,
    the search uses the fewest pipeline stages that fit: pp grows only while no plan fits memory
    (``--fix pp=`` or ``schedule=`` prices a given pipeline). ZeRO-2/3 shard gradients that pipelined
    microbatches accumulate, so pipelines use ZeRO 0 or 1 (as Megatron does)."""
    fix = dict(fix or {})
    dtype = normalize_dtype(dtype)
    unknown = set(fix) - {"dp", "tp", "pp", "sp", "attention", "zero", "microbatches", "microbatch_size",
                          "recompute", "schedule"}
    if unknown:
        raise BadInput(f"unknown --fix keys {sorted(unknown)}; use dp, tp, pp, sp, attention, zero, microbatches, "
                       "recompute, schedule")
    if "attention" in fix and fix["attention"] not in VARIANTS:
        raise BadInput(f"unknown attention variant {fix['attention']!r}; known: {', '.join(VARIANTS)}")
    if "schedule" in fix and fix["schedule"] not in SCHEDULES + ("none",):
        raise BadInput(f"unknown schedule {fix['schedule']!r}; known: {', '.join(SCHEDULES)}")
    if fix.get("schedule", "none") != "none" and fix.get("pp") == 1:
        raise BadInput(f"--fix schedule={fix['schedule']} needs pp>1")
    devices = cluster.devices
    limit = memory_limit if memory_limit is not None else cluster.memory_bytes
    check_degrees(fix, devices, ("dp", "tp", "pp", "sp"))
    pinned = [fix[k] for k in ("dp", "tp", "pp", "sp") if k in fix]
    product = 1
    for d in pinned:
        product *= d
    if devices % product or (len(pinned) == 4 and product != devices):
        got = " × ".join(f"{k}={fix[k]}" for k in ("pp", "dp", "sp", "tp") if k in fix)
        raise BadInput(f"{got} does not factor the cluster's {devices} devices")
    scale = dtype_scale(mg, dtype)
    tps = [fix["tp"]] if "tp" in fix else [t for t in divisors(devices) if t <= cluster.devices_per_node]
    pipelined = fix.get("schedule", "none") != "none" or fix.get("pp", 1) > 1
    pps = [fix["pp"]] if "pp" in fix else [1] if fix.get("sp", 1) > 1 else \
        [p for p in divisors(devices) if p > 1 or not pipelined]
    folding = folding if folding is not None else fold(mg)
    sps, dsp = _sequence_degrees(mg, excerpt(mg.gm, folding).gm, fix, devices, pipelined)
    annotate_saved(mg.gm, folding=folding)  # the saved-activation census, executing one instance per template
    # probed only if some candidate's memory binds; grouped by the blocks also under --no-fold
    regions = cache(partial(chunk_regions, mg, folding.unrolled or folding))
    peaks: dict = {}  # the chunk selections' peak timelines, per scale (chunking.select)
    spaces: dict[int, Space] = {}

    def mesh(pp: int, tp: int, sp: int, sweep) -> list[Candidate]:
        """The candidates of one mesh (an invalid mesh: one unpriced candidate saying why)."""
        if devices % (pp * tp * sp) or tp > cluster.devices_per_node:
            return []
        dp = devices // tp // pp // sp
        if "dp" in fix and fix["dp"] != dp:
            return []
        if sweep is not None and sweep.only is not None and not any(k[:4] == (pp, dp, sp, tp) for k in sweep.only):
            return []
        if tp not in spaces:
            spaces[tp] = build_space(mg, tp, folding)
        space = spaces[tp]
        bad = dict(feasible=False, pp=pp, sp=SPChoice(sp, "none") if sp > 1 else None)
        if tp > 1 and not space.choices:
            return [Candidate(dp, tp, 0, 0, 0, "none", **bad,
                              reason=f"tp={tp}: no linear layer can be split {tp} ways (check head counts)")]
        if pp > len(space.regions):
            return []
        if global_batch % dp:
            return [Candidate(dp, tp, 0, 0, 0, "none", **bad,
                              reason=f"global batch {global_batch} does not split over dp={dp}")]
        sequence = (sp, mg.seq_len, fix.get("attention"), None)
        if sp > 1 and dsp:
            why = _dsp_unusable(mg, sp, tp, fix.get("attention"))
            sequence = (sp, mg.seq_len, "dsp", None if why else dsp_traffic(dsp_layout(mg.gm, sp), sp))
        elif sp > 1:  # heads as captured; the layout's own (split by tp) are checked when priced
            ok, why = _sp_choices(sp, space.base.attention, mg.seq_len, fix.get("attention"))
            why = "" if ok else why
        if sp > 1 and why:
            return [Candidate(dp, tp, 0, 0, 0, "none", **bad, reason=why)]
        return _candidates(mg, space, cluster, dtype, scale, fix, pp, dp, tp, sequence, global_batch, limit,
                           select, regions, peaks, sweep)

    out: list[Candidate] = []
    for pp in pps:  # fewest stages first: more only while nothing fits (unless pp is pinned)
        # a range search prices the configurations it keeps first (its bounds are tightest then)
        for sweep in bounds.passes() if bounds is not None else [None]:
            for tp in tps:
                for sp in sps if pp == 1 else [1]:
                    got = mesh(pp, tp, sp, sweep)
                    out += [c for c in got if c.memory] if sweep is not bounds else got
        if any(c.feasible for c in out):
            break
    if not out and (bounds is None or (bounds.only is None and not bounds.skipped)):
        raise BadInput(f"no pp × dp × sp × tp factorization of {devices} devices matches --fix {fix}")
    out.sort(key=lambda c: (not c.feasible, c.step_time_s if c.feasible else 0.0, c.peak_memory, c.pp,
                            c.sp_degree, c.tp, c.zero, -c.microbatch_size, c.recompute, c.schedule))
    return out


def _sequence_degrees(mg: ModelGraph, gm, fix: dict, devices: int, pipelined: bool) -> tuple[list[int], bool]:
    """The sequence-parallel degrees to price — the divisors of the devices that leave every rank at
    least ``seqpar.MIN_TOKENS`` tokens (a pinned sp is always priced) — and whether the graph shards
    by DSP (a spatial-temporal model, ``search.dsp``) instead of token sharding (``search.seqshard``).
    [1] when it can do neither (a pinned sp > 1 then says why). ``gm``: the graph whose token
    sharding is tried (the folding's excerpt of ``mg.gm``: a check whose cost does not grow with depth)."""
    want = fix.get("sp")
    if want == 1 or (pipelined and want is None):
        return [1], False
    if pipelined:
        raise BadInput("--fix sp>1 with a pipeline: autopar plans sequence parallelism without pipelining "
                       "so far; use --fix pp=1 or sp=1")
    dsp, tokens = False, mg.seq_len
    try:
        propagate_seq(gm, seq_len=mg.seq_len, sp=2)
    except Unsupported as exc:
        try:
            one = dsp_layout(mg.gm, 1)
        except Unsupported:
            if want is not None:
                raise BadInput(f"--fix sp={want}: this model cannot be sharded on its sequence: {exc}") from None
            return [1], False
        dsp, tokens = True, one.frames * one.tokens
    if want is not None:
        return [want], dsp
    return [d for d in divisors(devices) if d == 1 or tokens // d >= seqpar.MIN_TOKENS], dsp


def _dsp_unusable(mg: ModelGraph, sp: int, tp: int, variant: str | None) -> str:
    """Why DSP on ``sp`` ranks does not apply to this mesh ("" when it does)."""
    if variant not in (None, "dsp"):
        return f"attention={variant}: this spatial-temporal model shards by DSP (--fix attention=dsp)"
    if tp > 1:
        return f"DSP with tp={tp}: autopar composes DSP with dp only so far"
    try:
        dsp_layout(mg.gm, sp)
    except Unsupported as exc:
        return str(exc)
    return ""


@lru_cache(maxsize=4096)
def _sp_options(cl: Cluster, dtype: str, attention, sequence, per_sample: float, flops_scale: float,
                tp: int) -> tuple[list, str]:
    """Every attention variant for ``sequence`` = (sp, sequence length, pinned variant, DSP traffic of
    the captured graph or None) priced as (SPChoice, exposed s, bytes) per microbatch, or why there is
    none. Cached: layouts, ZeRO stages and recompute choices of one mesh share it."""
    sp, _, variant, dsp = sequence
    if variant == "dsp":
        return [(SPChoice(sp, "dsp"), *seqpar.dsp_comm(dsp, sp, cl, scale=per_sample * sp, mesh_inner=tp))], ""
    ok, why = _sp_choices(sp, attention, sequence[1], variant)
    return [(ch, *seqpar.comm(ch, attention, cl, scale=per_sample, flops_scale=flops_scale, dtype=dtype,
                              elem=DTYPE_BYTES[dtype], mesh_inner=tp)) for ch in ok], why


def _sp_choices(sp: int, attention, seq_len: int, variant: str | None) -> tuple[list[SPChoice], str]:
    """The attention variants for ``sp`` (only ``variant`` if pinned), or why there are none."""
    ok, why = seqpar.choices(sp, [a for a, _ in attention], seq_len)
    ok = [c for c in ok if variant in (None, c.variant)]
    return ok, "; ".join(why) or f"sp={sp}: no {variant} attention for this model"


def _candidates(mg, space, cluster, dtype, scale, fix, pp, dp, tp, sequence, global_batch, limit,
                select, regions, peaks, bounds) -> list[Candidate]:
    """Every (zero, microbatch size, recompute[, schedule]) of one mesh (``sequence``: see ``_price``;
    ``regions()``: the chunkable regions, used when memory binds) that ``bounds`` does not skip."""
    local = global_batch // dp
    out, cache, msp = [], {}, space.megatron_sp
    tp_spans = cost.group_spans_nodes((pp, dp, tp), 2, cluster.devices_per_node)
    zeros = (0,) if dp * sequence[0] == 1 else (0, 1) if pp > 1 else (0, 1, 2, 3)  # ZeRO shards over dp × sp
    for zero in zeros:
        if "zero" in fix and fix["zero"] != zero:
            continue
        for micro in divisors(local):
            m = local // micro
            if ("microbatches" in fix and fix["microbatches"] != m) or \
                    ("microbatch_size" in fix and fix["microbatch_size"] != micro):
                continue
            for recompute in RECOMPUTE:
                if "recompute" in fix and fix["recompute"] != recompute:
                    continue
                if recompute == "selective" and not space.base.act_core and fix.get("recompute") == "selective":
                    raise BadInput("recompute=selective frees nothing in this model: no attention core saves "
                                   "s² scores (a fused scaled_dot_product_attention saves none; selective "
                                   "recompute is for eager matmul-softmax attention); use --fix recompute=full")
                if recompute == "selective" and (pp > 1 or sequence[0] > 1 or not space.base.act_core):
                    continue  # attention cores: not in pipeline stages yet, replaced by the sp kernel
                config = (pp, dp, sequence[0], tp, zero, micro, recompute)  # Candidate.config()
                if bounds is not None and bounds.skip(config):
                    continue
                if pp == 1:
                    price = partial(_price, space, cluster, dtype, scale, dp, zero, micro, m, recompute,
                                    global_batch, mg.batch_size, limit, sequence, msp(mg) if sequence[0] == 1 else None)
                    asked = bounds.inner.get(config, ()) if bounds else ()
                    priced = [_chunked(select(space, price, limit), regions, cluster, dtype, limit, peaks, asked)]
                else:
                    key = ("regions", micro, recompute)
                    if key not in cache:
                        cache[key] = regions_for(space, cluster, dtype, scale, micro=micro, graph_batch=mg.batch_size,
                                                 tp_spans=tp_spans, full=recompute == "full")
                    schedules = [fix["schedule"]] if "schedule" in fix else SCHEDULES
                    priced = pipeline_candidates(cache[key], cluster, dtype, layout=space.layout(space.all_sharded()),
                                                 pp=pp, dp=dp, zero=zero, micro=micro, m=m, recompute=recompute,
                                                 schedules=schedules, limit=limit, mesh=(pp, dp, tp), cache=cache)
                for c in priced:
                    if bounds is not None:
                        bounds.saw(c.config(), c.step_time_s, c.feasible)
                out += priced
    return out


def best(cands: list[Candidate], limit: float) -> Candidate:
    """The winner, or :class:`Infeasible` saying how much memory the leanest plan needs."""
    if cands[0].feasible:
        return cands[0]
    priced = [c for c in cands if c.memory]
    if not priced:
        raise Infeasible("no candidate plan is valid: " + "; ".join(sorted({c.reason for c in cands})))
    lean = min(priced, key=lambda c: c.peak_memory)
    pipe = f"pp={lean.pp} ({lean.schedule}), " if lean.pp > 1 else "pp=1, "
    raise Infeasible(
        f"no plan fits {_gib(limit)} GiB per device; the leanest ({pipe}dp={lean.dp}, tp={lean.tp}, "
        f"zero={lean.zero}, microbatch={lean.microbatch_size}, recompute={lean.recompute}) needs "
        f"{_gib(lean.peak_memory)} GiB. Use more devices, a larger --memory-limit, or a smaller model/batch")


def _gib(nbytes: float) -> str:
    """GiB with one decimal, or three significant digits below 1 GiB (a tiny limit must not read "0.0")."""
    g = nbytes / 2**30
    return f"{g:.1f}" if g >= 1 else f"{g:.3g}"


def _chunked(c: Candidate, regions: Callable[[], list[ChunkRegion]], cl: Cluster, dtype: str,
             limit: float, peaks: dict, asked=()) -> Candidate:
    """``c`` with activation chunking (AutoChunk) when its memory binds and nothing is recomputed yet:
    ``search.chunking.select`` chunks regions, best bytes freed per second of recompute and kernel launches
    (the cluster's ``kernel_launch_s``) first, each on the fewest first instances and chunks that close
    the remaining gap at least cost; the drop is ``chunking.chunk_drop`` (saved bytes freed, backward
    transient cut), floored so that activations stay >= 0 (``search.space`` does not count what ops
    save internally or the backward transient: its activations can be below the drop). ``asked``: other
    chunkings (``Candidate.chunk_key``) a range search wants priced too (``Candidate.chunk_options``)."""
    need = c.peak_memory - limit
    if c.recompute != "none" or not c.memory or (need <= 0 and not asked) or not regions():
        return c
    per_sample, share, dtype_scale = c.chunk_scales
    # the sequence-parallel kernel replaces the attention; block regions run tp-sharded (approx.)
    usable = [r for r in regions() if not (r.kind == "attention" and c.sp_degree > 1)]
    scale = chunking.Scale(per_sample, dtype_scale, c.tp)
    fits_chunked = c.feasible or c.reason.startswith("needs")

    def seconds(r, k):
        return chunking.chunk_seconds(r, k, cl, dtype, r.instances * share / scale.div(r), c.microbatches)

    def priced(chunks: dict[ChunkRegion, int]) -> tuple[float, float, float, bool]:
        """(extra seconds, activation bytes freed, step time, fits) of ``c`` with ``chunks``."""
        extra = sum(seconds(r, k) for r, k in chunks.items())
        freed = min(chunking.chunk_drop(usable, chunks, scale, peaks), c.memory["activations"])
        return extra, freed, c.step_time_s + extra, c.peak_memory - freed <= limit and fits_chunked

    options = {}
    for key in asked:
        if (chunks := chunking.parts_of(usable, key)) is not None:
            _, freed, step_time, fits = priced(chunks)
            options[key] = (step_time, c.peak_memory - freed, fits)
    chosen = chunking.select(usable, need, CHUNKS, seconds, scale, peaks)[0] if need > 0 else {}
    if not chosen:
        return replace(c, chunk_options=options) if options else c
    plan = [r.entry(k) for r, k in chosen.items()]
    extra, freed, step_time, fits = priced(chosen)
    out = replace(c, chunking=plan, chunk_freed=freed, breakdown={**c.breakdown, "chunk_recompute": extra},
                  memory={**c.memory, "activations": c.memory["activations"] - freed}, chunk_options=options)
    out.step_time_s, out.feasible = step_time, fits
    if out.feasible and c.solver.get("status") == "infeasible":  # no layout fitted unchunked: the leanest did
        out.solver = {**c.solver, "status": "leanest-chunked"}
    out.reason = "" if out.feasible else f"needs {_gib(out.peak_memory)} GiB > {_gib(limit)} GiB per device " \
                                          f"even with activation chunking"
    return out


def _price(space: Space, cl: Cluster, dtype: str, scale: float, dp: int, zero: int, micro: int, m: int,
           recompute: str, global_batch: int, graph_batch: int, limit: float, sequence: tuple,
           msp: MegatronSP | None, picks: dict[str, int]) -> Candidate:
    """Price the layout ``picks`` of ``space``, with the fastest attention variant for its heads when
    ``sequence`` = (sp degree, sequence length, pinned variant or None, DSP traffic or None) has
    sp > 1, and with Megatron sequence parallelism (``msp``) when ``picks`` is the full Megatron
    layout; the graph was captured at ``graph_batch`` samples, the step has ``global_batch``."""
    st = space.layout(picks)
    sp = sequence[0]
    c = Candidate(dp, st.tp, zero, micro, m, recompute, layout=st)
    if msp is not None and picks == space.all_sharded():
        c.megatron_sp = True
        st = replace(st, work=st.work + msp.delta)
    mesh = (dp, sp, st.tp)
    dp_spans = cost.group_spans_nodes((dp * sp, st.tp), 0, cl.devices_per_node)
    tp_spans = cost.group_spans_nodes(mesh, 2, cl.devices_per_node)
    w = st.work
    share = global_batch / graph_batch / dp / sp  # this device's part of the captured batch's work
    per_sample = scale / graph_batch * micro / sp
    compute, tp_time, tp_bytes = work_time(w, cl, dtype, scale, st.tp, tp_spans, share, per_sample, m, recompute,
                                           sequence=c.megatron_sp)
    # the gradients of sequence-parallel ranks sum like data-parallel ones (ZeRO shards over both)
    dp_time, dp_bytes = dp_sync(w.params, cl, dtype, dp * sp, zero, m, dp_spans, units=st.space.units[2] + 1)
    c.breakdown = {"compute": compute, "tp_all_reduce": tp_time, "dp_gradients": dp_time}
    c.comm_bytes = tp_bytes + dp_bytes
    if c.megatron_sp:  # boundary all-gathers per microbatch, one all-reduce per norm weight's gradient per step
        grads = msp.grad_sums * DTYPE_BYTES[dtype]
        c.breakdown["tp_all_reduce"] += m * sum(cost.collective_time("all_gather", b * per_sample * sp, st.tp, cl,
                                                                     spans_nodes=tp_spans) for b in msp.gathers) \
            + cost.collective_time("all_reduce", grads, st.tp, cl, spans_nodes=tp_spans,
                                   calls=max(msp.grad_sum_count, 1))
        c.comm_bytes += m * sum(cost.bytes_sent_per_rank("all_gather", b * per_sample * sp, st.tp) for b in msp.gathers) \
            + cost.bytes_sent_per_rank("all_reduce", grads, st.tp)
    if sp > 1:
        c.sp_options, why = _sp_options(cl, dtype, w.attention, sequence, per_sample, micro / graph_batch / sp, st.tp)
        c.sp, sp_time, sp_bytes = min(c.sp_options, key=seqpar.preference, default=(SPChoice(sp, "none"), 0.0, 0.0))
        c.breakdown["sp_attention"] = sp_time * m
        c.comm_bytes += sp_bytes * m
    c.step_time_s = sum(c.breakdown.values())
    # as emitted on FSDP (passes.zero): ZeRO-1 reduce-scatters the gradients at a step's last microbatch,
    # so with one microbatch they are sharded as under ZeRO-2; ZeRO-3 holds gathered at once the root
    # unit (kept from forward to backward) and two blocks (the one running and the one prefetched)
    states = model_state_bytes(w.params, dtype=dtype, zero_stage=2 if (zero, m) == (1, 1) else zero, dp=dp * sp)
    if zero == 3:
        root, block, _ = st.space.units
        gathered = (root + 2 * block) * w.params / st.space.base.params if st.space.base.params else 0.0
        states["params"] += model_state_bytes(round(gathered), dtype=dtype, zero_stage=0, dp=1)["params"]
    # + the backward's largest transient (the LM head's, typically: before any block is rematerialized)
    if recompute == "full":
        act = (st.block_inputs + w.act_outside + max(st.act_max_block, st.space.transient)) * per_sample
    elif recompute == "selective":  # the cores are rematerialized one block at a time in backward
        act = (w.act_bytes - w.act_core + max(st.core_max_block, st.space.transient)) * per_sample
    else:
        act = (w.act_bytes + st.space.transient) * per_sample
    c.memory = {**states, "activations": act}
    c.chunk_scales = (per_sample, share, scale)
    if c.peak_memory > limit:
        c.feasible = False
        c.reason = f"needs {_gib(c.peak_memory)} GiB > {_gib(limit)} GiB per device"
    if sp > 1 and not c.sp_options:  # the pinned variant does not suit this layout's heads
        c.feasible, c.reason = False, why
    return c
