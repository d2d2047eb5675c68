"""The ILP strategy search (search.space + search.strategy) against the enumerator oracle.

Megatron rediscovered under memory pressure, never slower than the enumerator, a cone the
enumerator must shard but the ILP leaves replicated, and folded == unfolded objectives.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from planner.capture import capture
from search.baseline import enumerate_candidates, shard_all
from search.cluster import get_cluster
from search.fold import fold, no_fold
from search.placement import propagate
from search.ilp import binary_parts
from search.strategy import ilp_select


def _gpt(layers: int, hidden: int = 64, heads: int = 4, batch: int = 2, seq: int = 32):
    from examples.gpt import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab=256, seq=seq, hidden=hidden, layers=layers, heads=heads))
    ids = torch.empty(batch, seq, dtype=torch.long, device="meta")
    return capture(model, (ids, ids), name=f"gpt-{layers}")


def _best(mg, cluster, *, select, folded=True, **kw):
    folding = fold(mg) if folded else no_fold(mg)
    return enumerate_candidates(mg, cluster, dtype="bf16", select=select, folding=folding, **kw)[0]


def test_ilp_rediscovers_megatron_under_memory_pressure():
    mg = _gpt(2, hidden=256, heads=8, batch=8, seq=128)
    cl = get_cluster("a100-80g", 2)
    fix = {"tp": 2, "zero": 0, "microbatches": 1, "recompute": "none"}
    free = _best(mg, cl, select=ilp_select, global_batch=8, fix=fix)
    replicated = enumerate_candidates(mg, cl, dtype="bf16", global_batch=8, fix=fix,
                                      select=lambda space, price, limit: price({}))[0]
    sharded = _best(mg, cl, select=shard_all, global_batch=8, fix=fix)
    assert sharded.peak_memory < replicated.peak_memory
    # a limit only the full Megatron layout meets
    win = _best(mg, cl, select=ilp_select, global_batch=8, fix=fix, memory_limit=sharded.peak_memory * 1.0001)
    # the full layout's Megatron-SP savings are not linear in the cones: ilp_select compares with it
    assert win.feasible and win.solver["status"] in ("optimal", "full-layout")
    expected = {}
    for i in range(2):
        expected[f"blocks.{i}.attn.qkv"] = ("colwise", 3)
        expected[f"blocks.{i}.attn.proj"] = ("rowwise", 1)
        expected[f"blocks.{i}.mlp.fc"] = ("colwise", 1)
        expected[f"blocks.{i}.mlp.proj"] = ("rowwise", 1)
    assert win.styles == expected
    layout = propagate(mg.gm, win.styles, 2)
    # forward: one all-reduce after attention and one after the MLP in every block
    scopes = sorted(mg.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default), key=str)
    reduced = {n.meta["autopar"].scope for n in scopes if n.name in layout.reduce_after}
    assert reduced == {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.proj", "mlp.proj")}
    assert len(layout.reduce_after) == 4
    assert free.step_time_s <= win.step_time_s


class _TwoMLPs(torch.nn.Module):
    """A narrow MLP (little work per all-reduce) and a wide one, each with a residual."""

    def __init__(self, h=64, narrow=64, wide=16384):
        super().__init__()
        self.small = torch.nn.Sequential(torch.nn.Linear(h, narrow), torch.nn.ReLU(), torch.nn.Linear(narrow, h))
        self.big = torch.nn.Sequential(torch.nn.Linear(h, wide), torch.nn.ReLU(), torch.nn.Linear(wide, h))

    def forward(self, x):
        x = x + self.small(x)
        return (x + self.big(x)).square().mean()


def test_ilp_shards_only_the_cones_that_pay_off():
    with torch.device("meta"):
        mg = capture(_TwoMLPs(), (torch.empty(4096, 64),), name="two-mlps")
    cl = get_cluster("a100-80g", 2)
    fix = {"tp": 2, "zero": 0, "microbatches": 1, "recompute": "none"}
    enum = _best(mg, cl, select=shard_all, global_batch=4096, fix=fix)
    ilp = _best(mg, cl, select=ilp_select, global_batch=4096, fix=fix)
    assert set(enum.styles) == {"small.0", "small.2", "big.0", "big.2"}
    assert set(ilp.styles) == {"big.0", "big.2"}  # the narrow MLP's all-reduces cost more than they save
    assert ilp.step_time_s < enum.step_time_s
    propagate(mg.gm, ilp.styles, 2)  # a subset of cones is a valid layout


@pytest.mark.parametrize("name,devices,batch", [("gpt-tiny", 8, 8), ("llama-tiny", 4, 8), ("bert-tiny", 8, 16),
                                                 ("gpt2-small", 16, 32)])
def test_ilp_never_slower_than_the_enumerator(name, devices, batch):
    from examples.zoo import build

    model, args, kwargs = build(name, batch=batch)
    mg = capture(model, args, kwargs, name=name)
    cl = get_cluster("a100-80g", devices)
    for limit in (None, 2**30):
        enum = enumerate_candidates(mg, cl, dtype="bf16", global_batch=batch, memory_limit=limit)
        ilp = _best(mg, cl, select=ilp_select, global_batch=batch, memory_limit=limit)
        if enum[0].feasible:
            assert ilp.feasible and ilp.step_time_s <= enum[0].step_time_s * (1 + 1e-12)


@pytest.mark.parametrize("layers", [4, 8, 12])
def test_folded_and_unfolded_searches_agree(layers):
    mg = _gpt(layers, hidden=128, heads=4, batch=8, seq=64)
    cl = get_cluster("a100-80g", 8)
    f = fold(mg)
    assert len(f.templates) == 1 and len(f.templates[0].instances) == layers
    # full recompute keeps the largest block's activations, a max the per-instance ILP sees only
    # through the exact final pricing; without recompute every term is additive
    tp2 = {"recompute": "none", "tp": 2, "zero": 0, "pp": 1}
    lean = min(c.peak_memory for c in enumerate_candidates(mg, cl, dtype="bf16", global_batch=8, fix=tp2))
    fat = min(c.peak_memory for c in enumerate_candidates(mg, cl, dtype="bf16", global_batch=8, fix=tp2,
                                                          select=lambda space, price, limit: price({})))
    for fix in ({"recompute": "none", "pp": 1}, tp2):
        for limit in (None, (lean + fat) / 2):  # halfway: tp=2 must shard some of its cones, not all
            folded = _best(mg, cl, select=ilp_select, global_batch=8, memory_limit=limit, fix=fix)
            flat = _best(mg, cl, select=ilp_select, folded=False, global_batch=8, memory_limit=limit, fix=fix)
            assert folded.feasible and flat.feasible
            assert folded.step_time_s == pytest.approx(flat.step_time_s, rel=1e-9)
            assert folded.key() == flat.key()
            if fix is tp2 and limit is not None:  # only some instances sharded: counts, not all-or-none
                assert 0 < len(folded.styles) < 4 * layers
            if folded.tp > 1:  # a binary-coded count per template cone vs a 0/1 per instance cone
                cones = folded.solver["variables"] // (2 * len(binary_parts(layers)))
                assert flat.solver["variables"] == 2 * layers * cones > 0


@pytest.mark.parametrize("k", range(1, 70))
def test_binary_parts_cover_every_count_once(k):
    parts = binary_parts(k)
    sums = {sum(c) for r in range(len(parts) + 1) for c in itertools.combinations(parts, r)}
    assert sums == set(range(k + 1)) and len(parts) <= k.bit_length()


def test_a_layout_that_fits_only_chunked_says_so():
    """No tensor-parallel layout fits unchunked (the ILP is infeasible), so the leanest is taken; when
    activation chunking then makes it fit, the plan's solver status says "leanest-chunked", not
    "infeasible"; a limit it misses even chunked stays "infeasible"."""
    from examples.zoo import build

    mg = capture(*build("gpt-tiny", batch=2, seq=1024), name="gpt-tiny")
    fix = {"recompute": "none", "sp": 1, "tp": 2, "microbatches": 1}
    fits, misses = (enumerate_candidates(mg, get_cluster("a100-80g", 2), global_batch=2, dtype="bf16",
                                         select=ilp_select, folding=fold(mg), memory_limit=mib * 2**20, fix=fix)[0]
                    for mib in (8, 3))
    assert fits.feasible and fits.chunking and fits.solver["status"] == "leanest-chunked"
    assert not misses.feasible and misses.solver["status"] == "infeasible"
