"""A priced candidate plan, and the step-time pieces every pricing path shares (DESIGN §4)."""
from __future__ import annotations

from dataclasses import dataclass, field

from search import cost
from search.cluster import Cluster
from search.seqpar import SPChoice
from search.space import TPStats, Work

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LOSS_BYTES = 4


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
    pp: int = 1
    schedule: str = "none"
    stages: list = field(default_factory=list)     # search.pipeline.Stage per pipeline stage
    bubble_s: float = 0.0
    solver: dict = field(default_factory=dict)     # how the layout was chosen: status, gap, variables
    sp: SPChoice | None = None                     # sequence parallelism (None: sp = 1)
    sp_options: list = field(default_factory=list)  # (SPChoice, exposed s, bytes) of every variant priced
    chunking: list = field(default_factory=list)    # chunked regions: {kind, scope, dim, chunks}
    chunk_freed: float = 0.0                        # activation bytes the chunking frees per device
    chunk_options: dict = field(default_factory=dict)  # other chunkings a range search asked about:
                                                    # chunk_key -> (step time s, peak bytes, fits)
    megatron_sp: bool = False                       # tp regions between cones hold 1/tp of the sequence
    chunk_scales: tuple = (0.0, 0.0, 0.0)           # (bytes per captured activation byte, work share, bytes per
                                                    # captured parameter byte) the chunking prices with
    placements: dict = field(default_factory=dict)  # per-op placements (``search.opspace``), {} for cone layouts
    warnings: list = field(default_factory=list)    # what the plan should say (ops without a sharding rule)

    @property
    def sp_degree(self) -> int:
        return self.sp.degree if self.sp is not None else 1

    @property
    def styles(self) -> dict[str, tuple[str, int]]:
        """Module FQN -> (style, groups) of this tp layout."""
        return self.layout.styles if self.layout is not None else {}

    @property
    def peak_memory(self) -> float:
        return sum(self.memory.values())

    def key(self):
        return (self.pp, self.dp, self.sp_degree, self.tp, self.zero, self.microbatch_size, self.recompute,
                self.schedule)

    def config(self) -> tuple:
        """The configuration a range search bounds (``search.range.Bounds``): the key without the
        schedule, tier (pipeline stages) first."""
        return self.key()[:7]

    def chunk_key(self) -> tuple:
        """What is chunked, how many ways: ((kind, scope, chunks), ...) of ``chunking``."""
        return tuple((r["kind"], r["scope"], r["chunks"]) for r in self.chunking)


def work_time(w: Work, cl: Cluster, dtype: str, scale: float, tp: int, tp_spans: bool, share: float,
              samples_scale: float, repeats: int, recompute: str, sequence: bool = False) -> tuple[float, float, float]:
    """(compute s, tp all-reduce s, tp bytes sent) of ``w`` for ``share`` of the captured batch, with
    the forward work ``recompute`` reruns (blocks under "full", attention cores under "selective");
    each all-reduce runs ``repeats`` times (once per microbatch) on its captured size ×
    ``samples_scale`` bytes (microbatch size / captured batch, dtype-scaled). Under Megatron-SP
    (``sequence``) each all-reduce runs as a reduce-scatter and an all-gather (the same bytes)."""
    again_flops, again_bytes = {"none": (0.0, 0.0), "full": (w.block_fwd_flops, w.block_fwd_bytes),
                                "selective": (w.core_fwd_flops, w.core_fwd_bytes)}[recompute]
    flops = (w.fwd_flops + w.bwd_flops + again_flops) * share
    moved = (w.mem_bytes + again_bytes) * share * scale
    compute = cost.compute_time(flops, dtype, cl) + cost.memory_time(moved, cl)
    tp_time = tp_bytes = 0.0
    for nbytes, count in w.allreduces:
        b = nbytes * samples_scale
        kinds = ("reduce_scatter", "all_gather") if sequence else ("all_reduce",)
        tp_time += count * repeats * sum(cost.collective_time(k, b, tp, cl, spans_nodes=tp_spans) for k in kinds)
        tp_bytes += count * repeats * cost.bytes_sent_per_rank("all_reduce", b, tp)
    return compute, tp_time, tp_bytes


def dp_sync(params: int, cl: Cluster, dtype: str, dp: int, zero: int, m: int, dp_spans: bool,
            units: int = 1) -> tuple[float, float]:
    """(seconds, bytes sent) of data-parallel traffic per step: gradients under ZeRO ``zero`` and the
    fp32 loss all-reduce of each of ``m`` microbatches (the module reports the dp-mean loss). ZeRO
    moves each of its ``units`` (FSDP units: one per repeated block, plus the rest) in its own
    collective: the same bytes, ``units`` latencies."""
    grad_bytes = params * DTYPE_BYTES[dtype]
    if zero == 0:
        kinds = [("all_reduce", grad_bytes, 1)]
    elif zero == 1:  # parameters gathered once, gradients accumulated whole and reduce-scattered once
        kinds = [("reduce_scatter", grad_bytes, 1), ("all_gather", grad_bytes, 1)]
    elif zero == 2:  # sharded gradients: reduce-scattered after every microbatch
        kinds = [("reduce_scatter", grad_bytes, m), ("all_gather", grad_bytes, 1)]
    else:  # ZeRO-3 also gathers parameters for forward and backward of every microbatch
        kinds = [("reduce_scatter", grad_bytes, m), ("all_gather", grad_bytes, 2 * m)]
    # ZeRO packs every gathered parameter and reduce-scattered gradient through a flat buffer: one read
    # and one write of the whole tensor per collective (memory bound; what FSDP2 copies in and out)
    packing = sum(2 * b * n for k, b, n in kinds) / cl.memory_bandwidth if zero and dp > 1 else 0.0
    t = sum(n * cost.collective_time(k, b, dp, cl, spans_nodes=dp_spans, calls=units if zero else 1)
            for k, b, n in kinds)
    sent = sum(n * cost.bytes_sent_per_rank(k, b, dp) for k, b, n in kinds)
    if dp > 1:
        t += m * cost.collective_time("all_reduce", LOSS_BYTES, dp, cl, spans_nodes=dp_spans)
        sent += m * cost.bytes_sent_per_rank("all_reduce", LOSS_BYTES, dp)
    return t + packing, sent


