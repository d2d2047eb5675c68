"""Sequence-parallel attention (runtime.attention) on real gloo ranks vs F.scaled_dot_product_attention
on the full sequence in one process: output and q/k/v gradients through a random upstream gradient
(fp32 to 1e-5, plus a few bf16 cases), the bytes comm_stats counts vs the cost model's `search.seqpar.traffic` (exact), and
BadInput for unusable shapes.

Launch budget: one 2-rank and one 4-rank launch run every case; pytest then asserts per case.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from runtime.attention import positions, shard_sequence
from search.seqpar import traffic
from search.errors import BadInput
from tests.distributed import launch_once

TOL = 1e-5
B, S, D = 2, 16, 8
HEADS = ((4, 4), (4, 2), (4, 1))  # MHA, GQA, MQA
LAYOUTS = ("contiguous", "zigzag")
BF16_CASES = [(v, i, "zigzag", True, 4, 2) for v, i in (("ulysses", 0), ("ring", 0), ("ring2d", 2), ("usp", 2))]


def _cases(world: int) -> list[tuple]:
    """(variant, inner, layout, causal, H, Hkv); inner = inner ring / Ulysses degree (0: none)."""
    shapes = [("ulysses", 0), ("ring", 0)]
    shapes += [("ring2d", 2), ("usp", 2)] if world == 4 else [("ring2d", 1), ("usp", 2), ("usp", 1)]
    heads = HEADS + ((8, 4),) if world == 4 else HEADS  # (8, 4) on 4 ranks: Ulysses splits kv heads
    return [(v, i, lay, c, h, hkv) for v, i in shapes for lay in LAYOUTS for c in (True, False)
            for h, hkv in heads]


def _key(case) -> str:
    v, inner, lay, causal, h, hkv = case
    return f"{v}{f'[{inner}]' if inner else ''}/{lay}/{'causal' if causal else 'full'}/H{h}kv{hkv}"


def _groups(world: int) -> dict:
    """inner groups of `inner` consecutive ranks and outer groups of strided ranks, for inner in 1, 2."""
    import torch.distributed as dist

    rank, out = dist.get_rank(), {}
    for inner in (1, 2):
        for name, sets in (("inner", [list(range(o * inner, (o + 1) * inner)) for o in range(world // inner)]),
                           ("outer", [list(range(i, world, inner)) for i in range(inner)])):
            for ranks in sets:
                g = dist.new_group(ranks)
                if rank in ranks:
                    out[name, inner] = g
    return out


def _run_case(case, groups, rank: int, world: int, dtype) -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F

    from runtime.attention import kernel_calls, sp_attention
    from runtime.collectives import comm_stats

    variant, inner, layout, causal, h, hkv = case
    torch.manual_seed(zlib.crc32(_key(case).encode()))
    q, k, v, dout = (torch.randn(B, n, S, D).to(dtype) for n in (h, hkv, hkv, h))
    full = [t.detach().float().requires_grad_() for t in (q, k, v)]  # the reference runs in fp32
    ref = F.scaled_dot_product_attention(*full, is_causal=causal, enable_gqa=True)
    ref.backward(dout.float())

    def shard(t):
        return shard_sequence(t, 2, world, rank, layout)

    local = [shard(t).requires_grad_() for t in (q, k, v)]
    group, inner_group = dist.group.WORLD, None
    if inner:
        group, inner_group = groups["outer", inner], groups["inner", inner]
    comm_stats.reset()
    kernel_calls.clear()
    out = sp_attention(*local, variant=variant, group=group, inner_group=inner_group, is_causal=causal,
                       layout=layout, seq_len=S)
    fwd = comm_stats.total_bytes()
    comm_stats.reset()
    out.backward(shard(dout))
    res = {"out": (out.float() - shard(ref)).abs().max().item(), "bytes": (fwd, comm_stats.total_bytes()),
           "kernels": dict(kernel_calls)}
    for name, a, b in zip("qkv", local, full):
        res["d" + name] = (a.grad.float() - shard(b.grad)).abs().max().item()
    return res


def _bad_input(world: int) -> dict:
    """BadInput messages (raised on every rank before any communication)."""
    import torch.distributed as dist

    from runtime.attention import sp_attention

    def msg(h, hkv, s_local, seq_len, variant, layout):
        q, k = torch.zeros(1, h, s_local, 4), torch.zeros(1, hkv, s_local, 4)
        try:
            sp_attention(q, k, k, variant=variant, group=dist.group.WORLD, is_causal=True, layout=layout,
                         seq_len=seq_len)
        except BadInput as exc:
            return str(exc)
        return None

    return {
        "zigzag_len": msg(4, 4, 3, 3 * world, "ring", "zigzag"),
        "contiguous_len": msg(4, 4, 3, 3 * world + 1, "ring", "contiguous"),
        "ulysses_heads": msg(3, 3, 4, 4 * world, "ulysses", "contiguous"),
        "ulysses_kv_heads": msg(12, 6, 4, 4 * world, "ulysses", "contiguous") if world == 4 else "n/a",
    }


def _all_cases(rank: int, world: int) -> dict:
    groups = _groups(world)
    runs = [(torch.float32, c) for c in _cases(world)] + [(torch.bfloat16, c) for c in BF16_CASES if world == 4]
    return {"cases": {(str(dt), _key(c)): _run_case(c, groups, rank, world, dt) for dt, c in runs},
            "bad": _bad_input(world)}


_RESULTS: dict = {}


def _results(world: int) -> list:
    return launch_once(_RESULTS, world, _all_cases, timeout=120, label="attention")


def _check_case(world, case, dtype, tol):
    variant, inner, layout, causal, h, hkv = case
    expect = _expected(variant, h, hkv, S // world, dtype.itemsize, world, inner or 1)
    for rank, res in enumerate(_results(world)):
        got = res["cases"][str(dtype), _key(case)]
        assert max(got[n] for n in ("out", "dq", "dk", "dv")) <= tol, (rank, got)
        assert tuple(got["bytes"]) == pytest.approx(expect, rel=1e-12, abs=0), (rank, got["bytes"], expect)
        # every ring block pair takes the fused CPU op (Ulysses runs one fused SDPA, no block pairs)
        assert "math" not in got["kernels"] and (variant == "ulysses") != ("fused" in got["kernels"]), got


def _ids(x):
    return _key(x) if isinstance(x, tuple) else f"{x}ranks"


@pytest.mark.parametrize("world,case", [(w, c) for w in (2, 4) for c in _cases(w)], ids=_ids)
def test_sp_attention_matches_full_sequence(world, case):
    _check_case(world, case, torch.float32, TOL)


@pytest.mark.parametrize("case", BF16_CASES, ids=_ids)
def test_sp_attention_bf16(case):
    """bf16 K/V travel in bf16 and dK/dV sums in fp32 (the byte formulas' e = 2, a = 4)."""
    _check_case(4, case, torch.bfloat16, 5e-2)  # bf16 rounding of O(1) values; a bug is O(1)


@pytest.mark.parametrize("world", (2, 4))
def test_bad_inputs_raise(world):
    for res in _results(world):
        bad = res["bad"]
        assert "not divisible by" in bad["zigzag_len"] and "zigzag" in bad["zigzag_len"], bad
        assert "not divisible by" in bad["contiguous_len"] and "contiguous" in bad["contiguous_len"], bad
        assert f"P={world} must divide the H=3 query heads; use ring or usp" in bad["ulysses_heads"], bad
        if world == 4:
            assert "Hkv=6 kv heads do not divide one another" in bad["ulysses_kv_heads"], bad


def test_positions_layouts():
    assert positions(8, 2, 1, "contiguous").tolist() == [4, 5, 6, 7]
    assert positions(8, 2, 0, "zigzag").tolist() == [0, 1, 6, 7]
    assert positions(8, 2, 1, "zigzag").tolist() == [2, 3, 4, 5]
    assert positions(8, 1, 0, "zigzag").tolist() == list(range(8))
    for layout in LAYOUTS:
        held = torch.cat([positions(24, 3, r, layout) for r in range(3)])
        assert sorted(held.tolist()) == list(range(24)) and held.dtype == torch.int64


def test_positions_bad_input():
    with pytest.raises(BadInput, match="not divisible by 6 .*zigzag.*pad the sequence"):
        positions(9, 3, 0, "zigzag")
    with pytest.raises(BadInput, match="not divisible by 3 .*contiguous"):
        positions(10, 3, 0, "contiguous")
    with pytest.raises(BadInput, match="unknown sequence layout"):
        positions(8, 2, 0, "striped")


def test_shard_sequence():
    x = torch.arange(2 * 8).reshape(2, 8)
    assert shard_sequence(x, 1, 2, 0, "zigzag").tolist() == [[0, 1, 6, 7], [8, 9, 14, 15]]
    assert shard_sequence(x, 0, 2, 1, "contiguous").tolist() == [list(range(8, 16))]


@pytest.mark.parametrize("layout,balanced", [("zigzag", True), ("contiguous", False)])
def test_ring_causal_work_per_rank(layout, balanced):
    """Score entries each rank computes over a causal ring (skipped pairs excluded): equal under zigzag."""
    from runtime.attention import _pairs, _runs

    p, seq = 4, 32
    runs = [_runs(positions(seq, p, r, layout)) for r in range(p)]

    def area(qruns, kruns):
        return sum((qs.stop - qs.start) * (ks.stop - ks.start) for qs, ks, _ in _pairs(qruns, kruns, True))

    work = [sum(area(runs[r], runs[j]) for j in range(p)) for r in range(p)]
    assert (len(set(work)) == 1) == balanced, work


def _expected(variant, h, hkv, s_local, e, degree, inner=1):
    """(forward, backward) bytes the cost model (search.seqpar.traffic) predicts for one call."""
    return traffic(variant, head_bytes=B * s_local * D * e, heads=h, kv_heads=hkv, elem=e, degree=degree,
                   inner=inner).total


def test_traffic_formulas_by_hand():
    # one head of one rank's tokens = 8 elements (B=1, s=4, D=2), fp16 (e=2, dK/dV sums fp32)
    def total(variant, **kw):
        return traffic(variant, head_bytes=16, heads=8, kv_heads=2, elem=2, **kw).total

    assert total("ulysses", degree=4) == (3 * 8 * 2 * (16 + 8) / 4,) * 2  # Hkv | P: one kv head per rank
    assert total("ring", degree=4) == (2 * 3 * 2 * 8 * 2, 2 * 3 * 2 * 8 * 6)
    assert total("usp", degree=4, inner=2) == (8 * 2 * 20 / 2 + 2 * 2 * 8 * 2, 8 * 2 * 20 / 2 + 2 * 2 * 8 * 6)


@pytest.mark.parametrize("variant", ("ring", "ulysses"))
def test_single_process_degree_one(variant):
    """Without torch.distributed, degree 1: plain attention (the ring's blockwise kernels, exact)."""
    import torch.nn.functional as F

    from runtime.attention import sp_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, n, 8, 4, requires_grad=True) for n in (4, 2, 2))
    out = sp_attention(q, k, v, variant=variant, group=None, is_causal=True, layout="zigzag", seq_len=8)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    assert (out - ref).abs().max() <= TOL
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) <= TOL
    with pytest.raises(BadInput, match="needs inner_group"):
        sp_attention(q, k, v, variant="usp", group=None, is_causal=True, layout="zigzag", seq_len=8)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_block_pairs_full_or_diagonal(layout):
    """Causal pairs of runs (any two ranks, usp's Ulysses-group blocks too) are skipped, fully visible or
    a run against itself: the fused op's top-left causal mask is exact on every pair that takes it."""
    from runtime.attention import _pairs, _runs

    p, seq = 4, 32
    for blocks in ([positions(seq, p, r, layout) for r in range(p)],
                   [torch.cat([positions(seq, p, 2 * i + j, layout) for j in (0, 1)]).sort().values
                    for i in range(p // 2)]):
        runs = [_runs(b) for b in blocks]
        for r, j in ((r, j) for r in range(len(runs)) for j in range(len(runs))):
            for qs, ks, diag in _pairs(runs[r], runs[j], True):
                qpos, kpos = blocks[r][qs], blocks[j][ks]
                if diag:
                    assert r == j and torch.equal(qpos, kpos), (r, j, qs, ks)
                else:
                    assert kpos.max() < qpos.min(), (r, j, qs, ks)


def _degree_one(variant, causal, layout):
    """(out, (dq, dk, dv)) errors vs full SDPA of single-process sp_attention at degree 1, GQA, fp32."""
    import torch.nn.functional as F

    from runtime.attention import sp_attention

    torch.manual_seed(1)
    q, k, v = (torch.randn(2, n, 16, 8, requires_grad=True) for n in (4, 2, 2))
    out = sp_attention(q, k, v, variant=variant, group=None, is_causal=causal, layout=layout, seq_len=16)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    return (out - ref).abs().max().item(), max((a - b).abs().max().item() for a, b in zip(got, want))


def test_ring_takes_fused_op_zigzag_causal():
    """Degree 1, zigzag causal: both halves' diagonals and the second half over the first (3 pairs) run on
    torch's fused flash-attention op, forward and backward; the einsum path is never taken."""
    from runtime.attention import kernel_calls

    kernel_calls.clear()
    errs = _degree_one("ring", True, "zigzag")
    assert dict(kernel_calls) == {"fused": 3 + 3}, kernel_calls
    assert max(errs) <= TOL, errs


@pytest.mark.parametrize("causal", (True, False))
def test_ring_math_path_exact(monkeypatch, causal):
    """The einsum block kernels (non-CPU devices) stay exact: forced on CPU by clearing _FUSED_DEVICES."""
    import runtime.attention as attention

    monkeypatch.setattr(attention, "_FUSED_DEVICES", ())
    attention.kernel_calls.clear()
    errs = _degree_one("ring", causal, "zigzag")
    assert dict(attention.kernel_calls) == {"math": 6 if causal else 2}, attention.kernel_calls
    assert max(errs) <= TOL, errs
