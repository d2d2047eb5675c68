"""Sequence (context) parallelism: the attention variants, their constraints and their cost.

Under sequence parallelism of degree ``P`` every rank holds ``S/P`` tokens; token-wise work and
activations fall ``P``-fold (``search.seqshard`` checks the graph allows it) and each attention
layer communicates (bytes per rank and call: :func:`traffic`, which ``runtime.attention`` matches
exactly; P ranks, H / Hkv query / kv heads):

=========  ======================================================  ==============================
variant    communication                                            constraint
=========  ======================================================  ==============================
ulysses    all-to-all of q, k, v in and the output back (and their  P divides the heads
           gradients): sequence ↔ heads
ring       K/V blocks passed P − 1 hops (backward: K/V and dK/dV)   S divisible by 2P (causal)
ring2d     the ring on an inner (fast) × outer (slow) grid: outer   inner, outer > 1
           links carry outer − 1 of the P − 1 hops
usp        Ulysses over ``inner`` ranks, then a ring over the rest  inner divides the heads
=========  ======================================================  ==============================

Ring traffic overlaps with the blockwise attention compute (the next block is sent while the
current one is computed), so only ``max(0, comm − compute)`` is exposed (DESIGN §4: hidden when
the block is large enough); all-to-alls are exposed. Causal variants with a ring use the zig-zag
layout (equal work per rank), Ulysses the contiguous one.
"""
from __future__ import annotations

from dataclasses import dataclass

from search import cost
from search.cluster import Cluster

VARIANTS = ("ulysses", "ring", "ring2d", "usp", "dsp")  # dsp: spatial-temporal models (search.dsp)
# The search offers sequence parallelism only while every rank keeps at least this many tokens: a
# ring hides its traffic only behind large enough blocks (DESIGN §4, c ≥ F/B) and smaller attention
# kernels run below the modelled efficiency, which the cost model does not capture. ``--fix sp=``
# prices any degree.
MIN_TOKENS = 512


@dataclass(frozen=True)
class SPChoice:
    """One way to run attention over ``degree`` ranks: ``inner`` is the ring2d inner ring or the usp
    Ulysses group (consecutive ranks, the fast links); ``layout`` is how tokens are dealt out."""

    degree: int
    variant: str
    inner: int = 1
    layout: str = "contiguous"

    @property
    def outer(self) -> int:
        return self.degree // self.inner

    def describe(self) -> str:
        if self.variant == "ring2d":
            return f"ring2d {self.inner}x{self.outer}"
        if self.variant == "usp":
            return f"usp ulysses {self.inner} x ring {self.outer}"
        return self.variant


@dataclass(frozen=True, order=True)
class Attn:
    """One attention call of the captured graph, per tensor-parallel rank, for the captured batch."""

    q_bytes: float
    kv_bytes: float
    heads: int
    kv_heads: int
    fwd_flops: float
    bwd_flops: float
    causal: bool


def choices(degree: int, attn: list[Attn], seq_len: int) -> tuple[list[SPChoice], list[str]]:
    """Every valid variant for ``degree`` (and why the others are not)."""
    if degree == 1 or not attn:
        return [], []
    heads, kv = min(a.heads for a in attn), min(a.kv_heads for a in attn)
    causal = any(a.causal for a in attn)
    ring_layout = "zigzag" if causal else "contiguous"

    def ulysses_ok(n: int) -> str:
        if heads % n:
            return f"{n} does not divide the {heads} attention heads per tp rank"
        if kv % n and n % kv:
            return f"{n} and the {kv} kv heads do not divide one another"
        return ""

    ok, why = [], []
    if ulysses_ok(degree):
        why.append(f"ulysses: sp={degree}: {ulysses_ok(degree)}")
    elif seq_len % degree:
        why.append(f"ulysses: sequence {seq_len} does not split {degree} ways")
    else:
        ok.append(SPChoice(degree, "ulysses"))
    block = 2 * degree if causal else degree
    if seq_len % block:
        why.append(f"ring: sequence {seq_len} does not split into {block} blocks")
        return ok, why
    ok.append(SPChoice(degree, "ring", layout=ring_layout))
    for inner in range(2, degree):
        if degree % inner:
            continue
        ok.append(SPChoice(degree, "ring2d", inner, ring_layout))
        if not ulysses_ok(inner):
            ok.append(SPChoice(degree, "usp", inner, ring_layout))
    return ok, why


def preference(option: tuple) -> tuple:
    """Sort key of priced options (SPChoice, exposed s, bytes): fastest, fewest bytes, then the
    simplest variant (in ``VARIANTS`` order: a flat ring before a 2-D one), then the larger inner
    group (fewer hops on the slow links)."""
    ch, exposed, sent = option
    return exposed, sent, VARIANTS.index(ch.variant), -ch.inner


@dataclass(frozen=True)
class Traffic:
    """What one attention call sends per rank, forward and backward: an all-to-all part over
    ``a2a_group`` ranks and a ring part over ``ring_inner`` × ``ring_outer`` ranks (bytes)."""

    a2a_group: int = 1
    a2a: tuple[float, float] = (0.0, 0.0)
    ring_inner: int = 1
    ring_outer: int = 1
    ring: tuple[float, float] = (0.0, 0.0)

    @property
    def total(self) -> tuple[float, float]:
        return self.a2a[0] + self.ring[0], self.a2a[1] + self.ring[1]


def traffic(variant: str, *, head_bytes: float, heads: int, kv_heads: int, elem: int, degree: int,
            inner: int = 1) -> Traffic:
    """Bytes one rank sends in one attention call (``runtime.attention`` sends exactly these).
    ``head_bytes``: one head of this rank's tokens (B·s·D·e); ``inner``: the ring2d inner ring or the
    usp Ulysses degree. dK/dV sums travel in a = max(e, 4) bytes per element.

        ulysses  hk = Hkv if P | Hkv else P;  fwd = bwd = (P−1)/P · head · (2H + 2hk)   (all-to-all)
        ring     fwd = 2 (P−1) Hkv head;  bwd = fwd · (e + a)/e                          (p2p)
        ring2d   as ring (P = inner · outer)
        usp      Ulysses on U = inner (hk kv heads after it), then ring on R = P/U with hk kv heads
    """
    ratio = (elem + max(elem, 4)) / elem

    def ulysses(n: int) -> tuple[float, int]:
        hk = kv_heads if kv_heads % n == 0 else n
        return (n - 1) / n * head_bytes * (2 * heads + 2 * hk), hk

    def ring(n: int, hk: int) -> tuple[float, float]:
        f = 2 * (n - 1) * hk * head_bytes
        return f, f * ratio

    if variant == "ulysses":
        b, _ = ulysses(degree)
        return Traffic(a2a_group=degree, a2a=(b, b))
    if variant == "ring":
        return Traffic(ring_inner=degree, ring=ring(degree, kv_heads))
    if variant == "ring2d":
        return Traffic(ring_inner=inner, ring_outer=degree // inner, ring=ring(degree, kv_heads))
    b, hk = ulysses(inner)
    return Traffic(a2a_group=inner, a2a=(b, b), ring_inner=degree // inner, ring=ring(degree // inner, hk))


def comm(choice: SPChoice, attn, cl: Cluster, *, scale: float, flops_scale: float, dtype: str, elem: int,
         mesh_inner: int) -> tuple[float, float]:
    """(exposed seconds, bytes one rank sends) of every attention call of one microbatch: ``attn``
    pairs an :class:`Attn` with how many times it runs; its bytes are multiplied by ``scale`` and its
    FLOPs by ``flops_scale`` (this rank's share of one microbatch); ``elem`` is the element size of
    the plan's dtype; ``mesh_inner`` is the product of the mesh axes inside the sp axis (tp): groups
    of the sp axis have that stride, which decides which of them span nodes."""
    t = sent = 0.0
    for a, count in attn:
        tr = traffic(choice.variant, head_bytes=a.q_bytes * scale / a.heads, heads=a.heads, kv_heads=a.kv_heads,
                     elem=elem, degree=choice.degree, inner=choice.inner)
        compute = (cost.compute_time(a.fwd_flops * flops_scale, dtype, cl),
                   cost.compute_time(a.bwd_flops * flops_scale, dtype, cl))
        t += count * _exposed(tr, compute, cl, mesh_inner)
        sent += count * sum(tr.total)
    return t, sent


def _exposed(tr: Traffic, compute: tuple[float, float], cl: Cluster, stride: int) -> float:
    """Seconds of communication not hidden, forward plus backward: all-to-alls are exposed; ring hops
    overlap the blockwise attention compute of their pass. Of a ring's P − 1 hops, outer·(inner − 1)
    use the inner links and outer − 1 the outer ones. A group spans nodes when its ranks (stride
    ``stride``) do not fit in one."""
    def spans(group: int) -> bool:
        return group > 1 and group * stride > cl.devices_per_node

    n = tr.a2a_group
    out = sum(cost.collective_time("all_to_all", b * n / (n - 1), n, cl, spans_nodes=spans(n))
              for b in tr.a2a) if n > 1 else 0.0
    inner, outer = tr.ring_inner, tr.ring_outer
    hops = inner * outer - 1
    if hops == 0:
        return out
    for b, comp in zip(tr.ring, compute):
        t_in = cost.collective_time("p2p", b / hops, 2, cl, spans_nodes=spans(inner))
        t_out = cost.collective_time("p2p", b / hops, 2, cl, spans_nodes=spans(inner * outer))
        out += max(0.0, outer * (inner - 1) * t_in + (outer - 1) * t_out - comp)
    return out


def dsp_comm(traffic: tuple[float, float], degree: int, cl: Cluster, *, scale: float, mesh_inner: int) -> tuple[float, float]:
    """(exposed seconds, bytes one rank sends) of DSP's switches (``search.dsp.dsp_traffic`` of the
    captured graph: forward, backward) for one microbatch, ``scale`` × the captured bytes. Every
    switch is an all-to-all, exposed."""
    sent = (traffic[0] + traffic[1]) * scale
    spans = degree * mesh_inner > cl.devices_per_node
    return cost.collective_time("all_to_all", sent * degree / (degree - 1), degree, cl, spans_nodes=spans), sent
