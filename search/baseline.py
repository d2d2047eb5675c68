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

import re
from dataclasses import dataclass, field

from search import cost
from search.cluster import Cluster, normalize_dtype
from search.errors import BadInput, Infeasible
from search.graph import ModelGraph
from search.memory import model_state_bytes
from search.placement import Unsupported, choose_styles, op_name, propagate

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_LOSS_BYTES = 4
_COMPUTE_BOUND = {"linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "scaled_dot_product_attention", "convolution"}
_NO_ACTIVATION = {"view", "reshape", "_unsafe_view", "transpose", "permute", "expand", "unsqueeze", "squeeze",
                  "slice", "select", "split", "chunk", "getitem", "t", "alias", "detach", "_assert_tensor_metadata",
                  "arange", "zeros", "ones", "full", "empty", "new_ones", "lift_fresh_copy"}
_LAYER = re.compile(r"^(.*?)\.(\d+)(\.|$)")


@dataclass
class TPStats:
    """What one tensor-parallel degree does to the graph, for the global batch."""

    tp: int
    styles: dict[str, tuple[str, int]]
    fwd_flops: float          # matmul/attention FLOPs per tp rank, captured batch (divide by dp for one device)
    bwd_flops: float
    mem_bytes: float          # bytes moved by memory-bound ops, forward + backward (roofline: bytes / bandwidth)
    block_fwd_flops: float    # forward work inside repeated blocks (recomputed under full recompute)
    block_fwd_bytes: float
    params: int               # parameters one tp rank holds
    act_bytes: float          # saved activations per tp rank, whole global batch, captured dtype
    act_block_inputs: float   # bytes of each block's input summed over blocks (what full recompute keeps)
    act_max_block: float      # largest single block's activations
    act_outside: float        # activations outside repeated blocks
    tp_allreduce_bytes: list[float] = field(default_factory=list)  # logical bytes of each all-reduce


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
    styles: dict = field(default_factory=dict)     # module FQN -> (style, groups) of this tp layout

    @property
    def peak_memory(self) -> float:
        return sum(self.memory.values())

    def key(self):
        return (self.dp, self.tp, self.zero, self.microbatch_size, self.recompute)


def tp_stats(mg: ModelGraph, tp: int) -> TPStats:
    """Derive the Megatron layout for ``tp`` and account per-rank FLOPs, params and activations."""
    gm = mg.gm
    styles = choose_styles(gm, tp)
    layout = propagate(gm, styles, tp)
    sharded_nodes = {name for name, p in layout.placement.items() if p is not None}
    sharded_nodes.update(layout.reduce_after)
    fwd = bwd = mem = block_fwd = block_bytes = act = outside = 0.0
    per_block: dict[str, float] = {}
    block_inputs: dict[str, float] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for node in mg.nodes():
        info = node.meta["autopar"]
        div = tp if node.name in sharded_nodes else 1
        compute_bound = op_name(node) in _COMPUTE_BOUND
        moved = 0.0 if compute_bound or op_name(node) in _NO_ACTIVATION else (info.bytes_read + info.bytes_written) / div
        if compute_bound:
            fwd += info.fwd_flops / div
            bwd += info.bwd_flops / div
        mem += moved * (3 if info.bwd_flops else 1)  # backward of an element-wise op reads and writes ~2x
        m = _LAYER.match(info.scope)
        block = f"{m.group(1)}.{m.group(2)}" if m else None
        if block:
            block_fwd += info.fwd_flops / div if compute_bound else 0.0
            block_bytes += moved
            if block not in block_inputs:
                block_inputs[block] = max((_val_bytes(a) for a in node.all_input_nodes if a.op != "get_attr"), default=0)
        if info.bwd_flops and op_name(node) not in _NO_ACTIVATION:
            b = info.output_bytes / div
            act += b
            if block:
                per_block[block] = per_block.get(block, 0.0) + b
            else:
                outside += b
    allreduces = [_val_bytes(nodes[n]) for n in layout.reduce_after] + [_val_bytes(nodes[n]) for n in layout.copy_before]
    params = 0
    for fqn, shape in mg.param_shapes.items():
        n = 1
        for d in shape:
            n *= d
        params += n // tp if fqn in layout.param_shards else n
    return TPStats(tp=tp, styles=styles, fwd_flops=fwd, bwd_flops=bwd, mem_bytes=mem, block_fwd_flops=block_fwd,
                   block_fwd_bytes=block_bytes, params=params,
                   act_bytes=act, act_block_inputs=sum(block_inputs.values()),
                   act_max_block=max(per_block.values(), default=0.0), act_outside=outside,
                   tp_allreduce_bytes=allreduces)


def _val_bytes(node) -> float:
    info = node.meta.get("autopar")
    if info is not None:
        return float(info.output_bytes)
    v = node.meta.get("val")
    return float(v.numel() * v.element_size()) if hasattr(v, "numel") else 0.0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_candidates(mg: ModelGraph, cluster: Cluster, *, global_batch: int, dtype: str,
                         memory_limit: float | None = None, fix: dict | None = None) -> list[Candidate]:
    """Price every (dp, tp, zero, microbatch size, recompute); sorted best first, infeasible last."""
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
        try:
            stats = tp_stats(mg, tp)
        except Unsupported as exc:
            out.append(Candidate(dp, tp, 0, 0, 0, "none", feasible=False, reason=f"tp={tp}: {exc}"))
            continue
        if tp > 1 and not stats.styles:
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
                    out.append(_price(stats, cluster, dtype, scale, dp, zero, micro, m, recompute,
                                      global_batch, mg.batch_size, limit))
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


def _price(st: TPStats, cl: Cluster, dtype: str, scale: float, dp: int, zero: int, micro: int, m: int,
           recompute: str, global_batch: int, graph_batch: int, limit: float) -> Candidate:
    """Price one candidate; the graph was captured at ``graph_batch`` samples, the step has ``global_batch``."""
    c = Candidate(dp, st.tp, zero, micro, m, recompute, styles=st.styles)
    mesh = (dp, st.tp)
    dp_spans = cost.group_spans_nodes(mesh, 0, cl.devices_per_node)
    tp_spans = cost.group_spans_nodes(mesh, 1, cl.devices_per_node)
    full = recompute == "full"
    share = global_batch / graph_batch / dp  # this device's part of the captured batch's work
    flops = (st.fwd_flops + st.bwd_flops + (st.block_fwd_flops if full else 0.0)) * share
    moved = (st.mem_bytes + (st.block_fwd_bytes if full else 0.0)) * share * scale
    compute = cost.compute_time(flops, dtype, cl) + cost.memory_time(moved, cl)
    tp_time = tp_bytes = 0.0
    per_sample = scale / graph_batch * micro
    for nbytes in st.tp_allreduce_bytes:  # logical size for the captured batch; one per microbatch
        b = nbytes * per_sample
        tp_time += m * cost.collective_time("all_reduce", b, st.tp, cl, spans_nodes=tp_spans)
        tp_bytes += m * cost.bytes_sent_per_rank("all_reduce", b, st.tp)
    grad_bytes = st.params * _DTYPE_BYTES[dtype]
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
    states = model_state_bytes(st.params, dtype=dtype, zero_stage=zero, dp=dp)
    if recompute == "full":
        act = (st.act_block_inputs + st.act_max_block + st.act_outside) * per_sample
    else:
        act = st.act_bytes * per_sample
    c.memory = {**states, "activations": act}
    if c.peak_memory > limit:
        c.feasible = False
        c.reason = f"needs {_gib(c.peak_memory)} GiB > {_gib(limit)} GiB per device"
    return c
