"""Sequence/context-parallel attention over process groups: exact forward and backward, any layout.

Every sp rank holds the tokens ``positions(seq_len, P, r, layout)`` of q, k, v ([B, H|Hkv, s, D],
s = seq_len / P) and gets back its rows of softmax(q kᵀ · scale) v over the WHOLE sequence. Causal
masks are built from true token positions, so every layout is exact.

    out = sp_attention(q, k, v, variant="ring", group=sp, is_causal=True, layout="zigzag", seq_len=S)

Variants (r = flattened sp rank):

- ``ulysses``: all-to-all sequence→heads over `group` (P ranks), full-sequence attention on H/P heads
  (gathered tokens sorted into position order), all-to-all back. GQA: kv heads are split when
  P | Hkv; when Hkv | P every destination is sent only the one kv head its query heads use.
- ``ring``: blockwise attention with log-sum-exp merging; K/V blocks rotate around `group` with
  batched isend/irecv issued before computing on the current block. Causal pairs of position runs
  that are fully masked are skipped, so the zigzag layout gives every rank equal work; the others are
  fully visible or a run's causal diagonal, each one call of torch's fused flash-attention op on CPU
  (see "block-pair kernels"). Backward is FlashAttention-2 style (recompute from the merged out and
  lse); dK/dV sums travel the ring back to their owners.
- ``ring2d`` (double ring): P = inner × outer, r = outer_rank · inner + inner_rank. K/V rotate around
  `inner_group`; each phase's start block is forwarded one step along `group` (outer ring) while
  the inner cycle computes, so outer links carry O-1 of the P-1 block hops.
- ``usp`` (Ulysses × ring, arXiv 2405.07719): P = U · R, r = ring_rank · U + ulysses_rank. Ulysses
  all-to-all inside `inner_group` (U), giving each rank H/U heads of the union of its Ulysses group's
  tokens (sorted by position: a contiguous block of U·s tokens, or under zigzag exactly the zigzag
  shard of degree R), then ring attention over `group` (R) on those blocks.

Bytes one rank sends (comm_stats counts them; the cost model's `search.seqpar.traffic` predicts them). B batch, H / Hkv query / kv heads,
s = s_local, D head dim, e element size, a = max(e, 4) (dK/dV sums travel in fp32 or wider).
Independent of causal and layout (the ring passes every block even where it is fully masked).

    ulysses  hk = Hkv if P | Hkv else P (kv heads sent: one per destination when Hkv | P)
             fwd = bwd = (P-1)/P · B s D e (2H + 2hk)                 [all_to_all]
    ring     fwd = 2 (P-1) B Hkv s D e ;  bwd = 2 (P-1) B Hkv s D (e + a)          [p2p]
    ring2d   as ring with P = inner · outer; of the P-1 hops, outer·(inner-1) use inner links
             and outer-1 use outer links (for K/V and for the dK/dV sums alike)
    usp      hk = Hkv if U | Hkv else U
             fwd = (U-1)/U · B s D e (2H + 2hk)  +  2 (R-1) B hk s D e
             bwd = (U-1)/U · B s D e (2H + 2hk)  +  2 (R-1) B hk s D (e + a)
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F

from runtime.collectives import all_to_all, group_size, isend_irecv
from search.errors import BadInput

__all__ = ["LAYOUTS", "VARIANTS", "positions", "shard_sequence", "sp_attention"]

LAYOUTS = ("contiguous", "zigzag")
VARIANTS = ("ulysses", "ring", "ring2d", "usp")


# ---------------------------------------------------------------- layouts

def positions(seq_len: int, degree: int, rank: int, layout: str) -> torch.Tensor:
    """Global token positions (int64, local order) that sequence-parallel rank `rank` of `degree` holds.

    contiguous: block `rank` of `degree` equal blocks. zigzag: chunks `rank` and 2·degree-1-rank of
    2·degree equal chunks (balances causal work)."""
    if layout not in LAYOUTS:
        raise BadInput(f"unknown sequence layout {layout!r}; expected one of {LAYOUTS}")
    parts = degree if layout == "contiguous" else 2 * degree
    if seq_len % parts:
        need = "degree" if layout == "contiguous" else "2 × degree"
        raise BadInput(
            f"sequence length {seq_len} is not divisible by {parts} ({need}, degree {degree}) as the "
            f"{layout} layout requires; pad the sequence to a multiple of {parts}"
            + (" or use layout='contiguous'" if layout == "zigzag" else "")
        )
    c = seq_len // parts
    chunks = (rank,) if layout == "contiguous" else (rank, parts - 1 - rank)
    return torch.cat([torch.arange(i * c, (i + 1) * c) for i in chunks])


def shard_sequence(x: torch.Tensor, dim: int, degree: int, rank: int, layout: str) -> torch.Tensor:
    """This rank's tokens of x along dim (index_select with positions(...))."""
    return x.index_select(dim, positions(x.shape[dim], degree, rank, layout).to(x.device))


def _runs(pos: torch.Tensor) -> list[tuple[int, int, int]]:
    """Runs of consecutive positions within each half of a rank's tokens: (local start, local stop,
    first position). Halves keep a zigzag rank's two chunks apart even when adjacent (the middle
    rank), so every rank's diagonal block is three masked-or-full quarter blocks."""
    p, half = pos.tolist(), len(pos) // 2
    runs, start = [], 0
    for i in range(1, len(p) + 1):
        if i in (half, len(p)) or p[i] != p[i - 1] + 1:
            runs.append((start, i, p[start]))
            start = i
    return runs


def _pairs(qruns, kruns, causal: bool):
    """(query slice, key slice, diagonal) for every pair of runs with a visible key. A pair is either
    fully visible or, when causal, the diagonal: the run against itself (same start, same length), where
    query i sees keys 0..i (top-left aligned). Ranks and runs hold disjoint positions, so a key run can
    overlap a query run only by being the same run; no other partial mask exists under any layout."""
    if not causal:
        yield slice(None), slice(None), False
        return
    for qa, qb, qp in qruns:
        qlast = qp + qb - qa - 1
        for ka, kb, kp in kruns:
            klast = kp + kb - ka - 1
            if kp > qlast:
                continue
            diag = klast > qp
            if diag and (kp, klast) != (qp, qlast):
                raise AssertionError(f"key run {kp}..{klast} partly overlaps query run {qp}..{qlast}")
            yield slice(qa, qb), slice(ka, kb), diag


# ---------------------------------------------------------------- block-pair kernels
# q, dout, out: [B, H, s_q, D] and lse [B, H, s_q] in the accumulation dtype; k, v: [B, Hkv, s_k, D]
# (query head h uses kv head h // (H / Hkv)). `diag`: causal, top-left aligned (s_q == s_k).
#
# CPU: torch's fused flash-attention ops (forward returns the block's logsumexp; backward, given the
# query rows' GLOBAL out and lse, returns the block pair's exact share of dq, dk, dv: FlashAttention-2
# ring backward). They take GQA/MQA heads and strided slices as they are. Other devices keep the
# einsum path: CUDA's flash op rejects fp32 (the ring computes in fp32 or wider) and its efficient-
# attention op pads lse and needs philox state in backward, which cannot be tested here.

kernel_calls: Counter = Counter()
"""Block pairs computed per path ("fused" / "math", forward and backward alike); diagnostics for tests."""

_FUSED_DEVICES = ("cpu",)  # device types whose block pairs take the fused op (tests clear it to check the math path)
_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _block_forward(q, k, v, diag, scale):
    """(out, lse) of q over one key block."""
    if q.device.type in _FUSED_DEVICES:
        kernel_calls["fused"] += 1
        return _FLASH_CPU(q, k, v, 0.0, diag, scale=scale)
    kernel_calls["math"] += 1
    qg, s = _math_scores(q, k, diag, scale)
    lse = s.logsumexp(-1)
    o = torch.einsum("bhgqk,bhkd->bhgqd", torch.exp(s - lse.unsqueeze(-1)), v)
    return o.reshape(q.shape), lse.reshape(q.shape[:-1])


def _block_backward(dout, q, k, v, out, lse, diag, scale):
    """This key block's (dq, dk, dv), from the query rows' global out and lse."""
    if q.device.type in _FUSED_DEVICES:
        kernel_calls["fused"] += 1
        return _FLASH_CPU_BACKWARD(dout, q, k, v, out, lse, 0.0, diag, scale=scale)
    kernel_calls["math"] += 1
    qg, s = _math_scores(q, k, diag, scale)
    dout = dout.reshape(qg.shape)
    p = torch.exp(s - lse.reshape(s.shape[:-1]).unsqueeze(-1))
    delta = (dout * out.reshape(qg.shape)).sum(-1, keepdim=True)
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, dout)
    ds = p * (torch.einsum("bhgqd,bhkd->bhgqk", dout, v) - delta)
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, k) * scale
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, qg) * scale
    return dq.reshape(q.shape), dk, dv


def _math_scores(q, k, diag, scale):
    """(q grouped [B, Hkv, g, s_q, D], scaled scores [B, Hkv, g, s_q, s_k], diagonal masked)."""
    b, h, n, d = q.shape
    qg = q.reshape(b, k.shape[1], h // k.shape[1], n, d)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, k) * scale
    if diag:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return qg, s


def _attend(out, lse, q, kv, qruns, kruns, causal, scale):
    """Merge the attention of q over one K/V block into (out, lse), in place."""
    k, v = (t.to(q.dtype) for t in kv)
    for qs, ks, diag in _pairs(qruns, kruns, causal):
        o, l = _block_forward(q[:, :, qs], k[:, :, ks], v[:, :, ks], diag, scale)
        old = lse[:, :, qs]
        new = torch.logaddexp(old, l)  # finite: every pair gives each of its query rows a visible key
        keep, take = (torch.exp(x - new).unsqueeze(-1) for x in (old, l))
        out[:, :, qs] = out[:, :, qs] * keep + o * take
        lse[:, :, qs] = new


def _attend_backward(dq, q, kv, dout, out, lse, qruns, kruns, causal, scale):
    """Add one K/V block's share of dq into `dq` (in place); return that block's (dk, dv)."""
    k, v = (t.to(q.dtype) for t in kv)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for qs, ks, diag in _pairs(qruns, kruns, causal):
        a, b, c = _block_backward(dout[:, :, qs], q[:, :, qs], k[:, :, ks], v[:, :, ks], out[:, :, qs],
                                  lse[:, :, qs], diag, scale)
        dq[:, :, qs] += a
        dk[:, :, ks] += b
        dv[:, :, ks] += c
    return dk, dv


# ---------------------------------------------------------------- rings

_KV_TAG, _GRAD_TAG = 0, 1  # K/V blocks and travelling dK/dV sums may be in flight on one ring at once


def _size_rank(group) -> tuple[int, int]:
    """(size, rank) of `group`; None (or torch.distributed not initialised) is a group of one."""
    n = 1 if group is None else group_size(group)
    return n, (dist.get_rank(group) if n > 1 else 0)


class _Topology:
    """Concentric rings: blocks rotate around `inner`; after every inner cycle the block set moves
    one step along `outer` (either may be None = size 1). Flattened rank = outer_rank · inner + inner_rank."""

    def __init__(self, inner, outer):
        self.inner, self.outer = inner, outer
        (self.ni, self.ii), (self.no, self.oi) = _size_rank(inner), _size_rank(outer)

    @property
    def rank(self) -> int:
        return self.oi * self.ni + self.ii

    def source(self, phase: int, step: int) -> int:
        """Flattened rank whose K/V block this rank holds at inner `step` of outer `phase`."""
        return ((self.oi - phase) % self.no) * self.ni + (self.ii - step) % self.ni


class _Shift:
    """Send `tensors` to the next rank of `group`'s ring and receive the previous rank's (in flight)."""

    def __init__(self, tensors, group, tag: int):
        n, r = _size_rank(group)
        self.sent = [t.contiguous() for t in tensors]
        self.bufs = [torch.empty_like(t) for t in self.sent]
        self.works = isend_irecv([(t, (r + 1) % n) for t in self.sent], [(b, (r - 1) % n) for b in self.bufs],
                                 group, tag)

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        return self.bufs


class _RingSum:
    """Sum per-step contributions to the block each rank holds, for blocks rotating around `group`:
    the first contribution (this rank's own block) stays; later ones travel on, each rank adding its
    part, until they reach the owner (n-1 hops)."""

    def __init__(self, group):
        self.group, self.own, self.pending = group, None, None

    def add(self, part):
        if self.own is None:
            self.own = part
            return
        if self.pending is not None:
            part = [a + b for a, b in zip(part, self.pending.wait())]
        self.pending = _Shift(part, self.group, _GRAD_TAG)

    def total(self):
        if self.pending is None:
            return self.own
        return [a + b for a, b in zip(self.own, self.pending.wait())]


def _ring_forward(topo, runs, q, kv, causal, scale):
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
    for phase in range(topo.no):
        outer = _Shift(kv, topo.outer, _KV_TAG) if phase < topo.no - 1 else None
        cur = kv
        for step in range(topo.ni):
            nxt = _Shift(cur, topo.inner, _KV_TAG) if step < topo.ni - 1 else None
            _attend(out, lse, q, cur, runs[topo.rank], runs[topo.source(phase, step)], causal, scale)
            cur = nxt.wait() if nxt else cur
        kv = outer.wait() if outer else kv
    return out, lse


def _ring_backward(topo, runs, q, kv, out, lse, dout, causal, scale):
    dq = torch.zeros_like(q)
    outer_sum = _RingSum(topo.outer)
    for phase in range(topo.no):
        outer = _Shift(kv, topo.outer, _KV_TAG) if phase < topo.no - 1 else None
        cur, inner_sum = kv, _RingSum(topo.inner)
        for step in range(topo.ni):
            nxt = _Shift(cur, topo.inner, _KV_TAG) if step < topo.ni - 1 else None
            inner_sum.add(_attend_backward(dq, q, cur, dout, out, lse, runs[topo.rank],
                                           runs[topo.source(phase, step)], causal, scale))
            cur = nxt.wait() if nxt else cur
        outer_sum.add(inner_sum.total())
        kv = outer.wait() if outer else kv
    return dq, outer_sum.total()


def _accumulation(t: torch.Tensor) -> torch.Tensor:
    """t in the accumulation dtype (fp32 or wider), contiguous."""
    return t.to(torch.promote_types(t.dtype, torch.float32)).contiguous()


class _RingAttention(torch.autograd.Function):
    """Ring attention of local q over every rank's K/V (`runs[i]`: position runs of flattened rank i)."""

    @staticmethod
    def forward(ctx, q, k, v, topo, runs, causal, scale):
        kv = [k.contiguous(), v.contiguous()]
        out, lse = _ring_forward(topo, runs, _accumulation(q), kv, causal, scale)
        ctx.save_for_backward(q, *kv, out, lse)
        ctx.args = (topo, runs, causal, scale)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        topo, runs, causal, scale = ctx.args
        dout = dout.to(out.dtype).contiguous()
        dq, (dk, dv) = _ring_backward(topo, runs, _accumulation(q), [k, v], out, lse, dout, causal, scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


# ---------------------------------------------------------------- Ulysses

class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.args = (group, gather_dim, scatter_dim)
        return all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, *ctx.args), None, None, None


def _kv_heads_sent(h: int, hkv: int, n: int, what: str) -> int:
    """kv heads entering a Ulysses all-to-all over `n` ranks (Hkv split, or one head per destination)."""
    if h % n:
        raise BadInput(f"{what}={n} must divide the H={h} query heads; use ring or usp")
    if hkv % n == 0:
        return hkv
    if n % hkv == 0:
        return n
    raise BadInput(f"{what}={n} and the Hkv={hkv} kv heads do not divide one another, so kv heads can be "
                   f"neither split nor replicated evenly across the Ulysses ranks; use ring, or a Ulysses "
                   f"degree that divides or is a multiple of {hkv}")


def _ulysses(q, k, v, group, gathered, core):
    """All-to-all sequence→heads over `group`, `core(q, k, v)` on the position-sorted gathered tokens
    (`gathered`: their positions in rank order), all-to-all back."""
    n = group_size(group)
    if k.shape[1] % n:  # Hkv | n: each destination gets the one kv head its query heads use
        idx = torch.arange(n, device=k.device) // (n // k.shape[1])
        k, v = k.index_select(1, idx), v.index_select(1, idx)
    q, k, v = (_AllToAll.apply(t, group, 1, 2) for t in (q, k, v))
    order = torch.argsort(gathered)
    if torch.equal(order, torch.arange(len(order))):
        return _AllToAll.apply(core(q, k, v), group, 2, 1)
    back, order = torch.argsort(order).to(q.device), order.to(q.device)
    q, k, v = (t.index_select(2, order) for t in (q, k, v))
    return _AllToAll.apply(core(q, k, v).index_select(2, back), group, 2, 1)


# ---------------------------------------------------------------- public entry points

def _check(q, k, v, variant, layout, group, inner_group, seq_len) -> int:
    """Validate arguments (before any communication); return the total sp degree P."""
    if variant not in VARIANTS:
        raise BadInput(f"unknown sequence-parallel variant {variant!r}; expected one of {VARIANTS}")
    if variant in ("ring2d", "usp") and inner_group is None:
        raise BadInput(f"variant {variant!r} needs inner_group (the {variant} inner ring / Ulysses group)")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or any(k.shape[i] != q.shape[i] for i in (0, 2, 3)):
        raise BadInput(f"expected q [B, H, s, D] and k, v [B, Hkv, s, D]; got {tuple(q.shape)}, "
                       f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise BadInput(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    p = group_size(group) * (group_size(inner_group) if variant in ("ring2d", "usp") else 1)
    positions(seq_len, p, 0, layout)
    if q.shape[2] * p != seq_len:
        raise BadInput(f"local sequence {q.shape[2]} × sp degree {p} != seq_len {seq_len}")
    if variant == "ulysses":
        _kv_heads_sent(q.shape[1], k.shape[1], p, "Ulysses degree P")
    if variant == "usp":
        _kv_heads_sent(q.shape[1], k.shape[1], group_size(inner_group), "Ulysses degree U")
    return p


def sp_attention(q, k, v, *, variant: str, group, inner_group=None, is_causal: bool, layout: str, seq_len: int,
                 scale: float | None = None) -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence (see the module docstring).

    q: [B, H, s_local, D]; k, v: [B, Hkv, s_local, D], H % Hkv == 0. This rank holds the tokens
    positions(seq_len, P, r, layout). Returns [B, H, s_local, D]; differentiable in q, k, v."""
    p = _check(q, k, v, variant, layout, group, inner_group, seq_len)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = dist.group.WORLD if group is None else group

    if variant in ("ring", "ring2d"):
        topo = _Topology(group, None) if variant == "ring" else _Topology(inner_group, group)
        runs = [_runs(positions(seq_len, p, i, layout)) for i in range(p)]
        return _RingAttention.apply(q, k, v, topo, runs, is_causal, scale)
    u = p if variant == "ulysses" else group_size(inner_group)
    # tokens of each Ulysses group (sp ranks i·U .. i·U+U-1), in rank order
    held = [torch.cat([positions(seq_len, p, i * u + j, layout) for j in range(u)]) for i in range(p // u)]
    if variant == "ulysses":
        def core(q, k, v):  # the whole sequence, in position order
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=True)

        return _ulysses(q, k, v, group, held[0], core)
    runs = [_runs(t.sort().values) for t in held]

    def core(q, k, v):  # ring over `group` on the position-sorted Ulysses-group blocks
        return _RingAttention.apply(q, k, v, _Topology(group, None), runs, is_causal, scale)

    return _ulysses(q, k, v, inner_group, held[dist.get_rank(group)], core)
