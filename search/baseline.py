"""The dp × tp × ZeRO enumerator: every factorization priced on the captured graph, cheapest that fits wins.

It is the baseline planner and the oracle the ILP search is tested against. For each tensor-parallel
degree the Megatron layout is derived from the graph (``search.placement``), so FLOPs, collective
bytes and activation memory come from the nodes that are really sharded, not from a formula.

Choices per candidate: tp (inside a node), dp = devices / tp, ZeRO stage 0-3, microbatch size
(gradient accumulation over the per-replica batch) and recompute (none / full).
Step time = compute + tensor-parallel all-reduces + data-parallel gradient traffic, with no overlap
assumed (an upper bound; DESIGN §4 formulas in ``search.cost``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from search import cost
from search.cluster import Cluster, normalize_dtype
from search.errors import BadInput, Infeasible
from search.graph import ModelGraph
from search.memory import model_state_bytes
from search.fold import Folding
from search.space import Space, TPStats, build_space

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_LOSS_BYTES = 4


@dataclass
class Candidate:
    dp: int
    tp: int
    zero: int
    microbatch_size: int
    microbatches: int
    recompute: str
    step_time_s: float = 0.0
    breakdown: dict = field(default_factory=dict)    # seconds per component
    memory: dict = field(default_factory=dict)       # bytes per component, per device
    comm_bytes: float = 0.0                          # bytes one device sends per step
    feasible: bool = True
    reason: str = ""
    layout: TPStats | None = None                  # the tensor-parallel layout priced
    solver: dict = field(default_factory=dict)     # how the layout was chosen: status, gap, variables

    @property
    def styles(self) -> dict[str, tuple[str, int]]:
        """Module FQN -> (style, groups) of this tp layout."""
        return self.layout.styles if self.layout is not None else {}

    @property
    def peak_memory(self) -> float:
        return sum(self.memory.values())

    def key(self):
        return (self.dp, self.tp, self.zero, self.microbatch_size, self.recompute)


def tp_stats(mg: ModelGraph, tp: int) -> TPStats:
    """The full Megatron layout for ``tp``: every cone sharded."""
    space = build_space(mg, tp)
    return space.layout(space.all_sharded())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def shard_all(space: Space, price: Callable[[dict[str, int]], Candidate], limit: float) -> Candidate:
    """The enumerator's layout: the full Megatron pattern (every cone sharded)."""
    return price(space.all_sharded())


def enumerate_candidates(mg: ModelGraph, cluster: Cluster, *, global_batch: int, dtype: str,
                         memory_limit: float | None = None, fix: dict | None = None,
                         select=shard_all, folding: Folding | None = None) -> list[Candidate]:
    """Price every (dp, tp, zero, microbatch size, recompute); sorted best first, infeasible last.

    For each of them ``select(space, price, limit)`` picks the tensor-parallel cones and returns the
    priced candidate: :func:`shard_all` (this module, the oracle) or ``search.strategy.ilp_select``."""
    fix = dict(fix or {})
    dtype = normalize_dtype(dtype)
    for key in ("pp", "sp"):
        if fix.pop(key, 1) != 1:
            raise BadInput(f"--fix {key}>1 is not supported yet: this planner emits data and tensor parallelism only")
    unknown = set(fix) - {"dp", "tp", "zero", "microbatches", "microbatch_size", "recompute", "schedule"}
    if unknown:
        raise BadInput(f"unknown --fix keys {sorted(unknown)}; use dp, tp, zero, microbatches, recompute")
    if fix.get("schedule", "none") != "none":
        raise BadInput("--fix schedule is for pipeline parallelism, which this planner does not emit yet")
    devices = cluster.devices
    limit = memory_limit if memory_limit is not None else cluster.memory_bytes
    tps = [t for t in _divisors(devices) if t <= cluster.devices_per_node]
    for key in ("dp", "tp"):
        if key in fix and (not isinstance(fix[key], int) or devices % fix[key]):
            raise BadInput(f"--fix {key}={fix[key]} does not divide the {devices} devices; "
                           f"valid degrees: {_divisors(devices)}")
    if "dp" in fix and "tp" in fix and fix["dp"] * fix["tp"] != devices:
        raise BadInput(f"dp={fix['dp']} × tp={fix['tp']} = {fix['dp'] * fix['tp']} but the cluster has {devices} devices")
    if "dp" in fix:
        tps = [devices // fix["dp"]]
    if "tp" in fix:
        tps = [fix["tp"]]
    scale = _DTYPE_BYTES[dtype] / _DTYPE_BYTES[normalize_dtype(_graph_dtype(mg))]
    out: list[Candidate] = []
    for tp in tps:
        dp = devices // tp
        space = build_space(mg, tp, folding)
        if tp > 1 and not space.choices:
            out.append(Candidate(dp, tp, 0, 0, 0, "none", feasible=False,
                                 reason=f"tp={tp}: no linear layer can be split {tp} ways (check head counts)"))
            continue
        if tp > cluster.devices_per_node:
            continue
        if global_batch % dp:
            out.append(Candidate(dp, tp, 0, 0, 0, "none", feasible=False,
                                 reason=f"global batch {global_batch} does not split over dp={dp}"))
            continue
        local = global_batch // dp
        for zero in (0, 1, 2, 3) if dp > 1 else (0,):
            if "zero" in fix and fix["zero"] != zero:
                continue
            for micro in _divisors(local):
                m = local // micro
                if "microbatches" in fix and fix["microbatches"] != m:
                    continue
                if "microbatch_size" in fix and fix["microbatch_size"] != micro:
                    continue
                for recompute in ("none", "full"):
                    if "recompute" in fix and fix["recompute"] != recompute:
                        continue
                    price = partial(_price_layout, space, cluster, dtype, scale, dp, zero, micro, m, recompute,
                                    global_batch, mg.batch_size, limit)
                    out.append(select(space, price, limit))
    if not out:
        raise BadInput(f"no dp × tp factorization of {devices} devices matches --fix {fix}")
    out.sort(key=lambda c: (not c.feasible, c.step_time_s if c.feasible else 0.0, c.peak_memory, c.tp, c.zero,
                            -c.microbatch_size, c.recompute))
    return out


def best(cands: list[Candidate], limit: float) -> Candidate:
    """The winner, or :class:`Infeasible` saying how much memory the leanest plan needs."""
    if cands[0].feasible:
        return cands[0]
    priced = [c for c in cands if c.memory]
    if not priced:
        raise Infeasible("no candidate plan is valid: " + "; ".join(sorted({c.reason for c in cands})))
    lean = min(priced, key=lambda c: c.peak_memory)
    raise Infeasible(
        f"no plan fits {_gib(limit)} GiB per device; the leanest (dp={lean.dp}, tp={lean.tp}, "
        f"zero={lean.zero}, microbatch={lean.microbatch_size}, recompute={lean.recompute}) needs "
        f"{_gib(lean.peak_memory)} GiB. Use more devices, a larger --memory-limit, or a smaller model/batch "
        "(pipeline parallelism is not emitted yet)")


def _gib(nbytes: float) -> str:
    """GiB with one decimal, or three significant digits below 1 GiB (a tiny limit must not read "0.0")."""
    g = nbytes / 2**30
    return f"{g:.1f}" if g >= 1 else f"{g:.3g}"


def _graph_dtype(mg: ModelGraph) -> str:
    dtypes = sorted(set(mg.param_dtypes.values()))
    return "fp32" if not dtypes or "float32" in dtypes else normalize_dtype(dtypes[0])


def _price_layout(space: Space, cl: Cluster, dtype: str, scale: float, dp: int, zero: int, micro: int, m: int,
                  recompute: str, global_batch: int, graph_batch: int, limit: float, picks: dict[str, int]) -> Candidate:
    return _price(space.layout(picks), cl, dtype, scale, dp, zero, micro, m, recompute, global_batch, graph_batch,
                  limit)


def _price(st: TPStats, cl: Cluster, dtype: str, scale: float, dp: int, zero: int, micro: int, m: int,
           recompute: str, global_batch: int, graph_batch: int, limit: float) -> Candidate:
    """Price one candidate; the graph was captured at ``graph_batch`` samples, the step has ``global_batch``."""
    c = Candidate(dp, st.tp, zero, micro, m, recompute, layout=st)
    mesh = (dp, st.tp)
    dp_spans = cost.group_spans_nodes(mesh, 0, cl.devices_per_node)
    tp_spans = cost.group_spans_nodes(mesh, 1, cl.devices_per_node)
    full = recompute == "full"
    w = st.work
    share = global_batch / graph_batch / dp  # this device's part of the captured batch's work
    flops = (w.fwd_flops + w.bwd_flops + (w.block_fwd_flops if full else 0.0)) * share
    moved = (w.mem_bytes + (w.block_fwd_bytes if full else 0.0)) * share * scale
    compute = cost.compute_time(flops, dtype, cl) + cost.memory_time(moved, cl)
    tp_time = tp_bytes = 0.0
    per_sample = scale / graph_batch * micro
    for nbytes, count in w.allreduces:  # logical size for the captured batch; once per microbatch
        b = nbytes * per_sample
        tp_time += count * m * cost.collective_time("all_reduce", b, st.tp, cl, spans_nodes=tp_spans)
        tp_bytes += count * m * cost.bytes_sent_per_rank("all_reduce", b, st.tp)
    grad_bytes = w.params * _DTYPE_BYTES[dtype]
    if zero <= 1:
        dp_kinds = [("all_reduce", grad_bytes, 1)]
    elif zero == 2:
        dp_kinds = [("reduce_scatter", grad_bytes, 1), ("all_gather", grad_bytes, 1)]
    else:  # ZeRO-3 gathers parameters for forward and backward of every microbatch
        dp_kinds = [("reduce_scatter", grad_bytes, 1), ("all_gather", grad_bytes, 2 * m)]
    dp_time = dp_bytes = 0.0
    for kind, nbytes, times in dp_kinds:
        dp_time += times * cost.collective_time(kind, nbytes, dp, cl, spans_nodes=dp_spans)
        dp_bytes += times * cost.bytes_sent_per_rank(kind, nbytes, dp)
    if dp > 1:  # the module reports the dp-mean loss: one fp32 scalar all-reduce per forward
        dp_time += m * cost.collective_time("all_reduce", _LOSS_BYTES, dp, cl, spans_nodes=dp_spans)
        dp_bytes += m * cost.bytes_sent_per_rank("all_reduce", _LOSS_BYTES, dp)
    c.breakdown = {"compute": compute, "tp_all_reduce": tp_time, "dp_gradients": dp_time}
    c.step_time_s = compute + tp_time + dp_time
    c.comm_bytes = tp_bytes + dp_bytes
    states = model_state_bytes(w.params, dtype=dtype, zero_stage=zero, dp=dp)
    if recompute == "full":
        act = (st.block_inputs + st.act_max_block + w.act_outside) * per_sample
    else:
        act = w.act_bytes * per_sample
    c.memory = {**states, "activations": act}
    if c.peak_memory > limit:
        c.feasible = False
        c.reason = f"needs {_gib(c.peak_memory)} GiB > {_gib(limit)} GiB per device"
    return c
