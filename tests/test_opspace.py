"""The per-op strategy space and its ILP (search/oprules.py, search/opspace.py): rules, reshard prices,
Megatron rediscovered from per-op choices, folded = unfolded, and the planner's bad-input messages.
Emission on real gloo ranks: tests/test_placements_emit.py."""
from __future__ import annotations

import math

import pytest
import torch

from examples.llama import Llama, LlamaConfig
from examples.zoo import build
from planner.api import make_plan
from planner.capture import capture
from search.cluster import get_cluster
from search.errors import BadInput
from search.fold import fold, no_fold
from search.opspace import RELATIVE_GAP, Pricer, reshard_steps, solve_ops, strategies, value_specs
from search.oprules import P, R, options, view_dims


def _llama(layers: int, hidden: int, seq: int, batch: int, ffn: int, vocab: int = 1024):
    cfg = LlamaConfig(vocab=vocab, seq=seq, hidden=hidden, layers=layers, heads=8, kv_heads=8, ffn=ffn)
    with torch.device("meta"):
        model = Llama(cfg)
    idx = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    return capture(model, (idx, idx), name=f"llama-{layers}")


def test_view_dims_keep_contiguous_blocks():
    assert view_dims((2, 32, 64), (2, 32, 4, 16)) == {0: 0, 1: 1, 2: 2}        # heads split off the hidden dim
    assert view_dims((2, 32, 4, 16), (2, 32, 64)) == {0: 0, 1: 1, 2: 2}
    assert view_dims((2, 32, 64), (64, 64)) == {0: 0, 2: 1}                    # batch leads the merged rows
    assert view_dims((2, 2, 1, 32, 16), (2, 2, 2, 32, 16)) == {0: 0, 1: 1, 3: 3, 4: 4}   # expand (GQA)
    assert view_dims((2, 2, 2, 32, 16), (2, 4, 32, 16)) == {0: 0, 1: 1, 3: 2, 4: 3}


def test_rules_cover_the_zoo_and_replicate_first():
    for name in ("gpt-tiny", "llama-tiny", "bert-tiny", "gpt-tiny-eager"):
        mg = capture(*build(name, batch=2), name=name)
        for n in mg.nodes():
            opts = options(n)
            if n.meta["autopar"].op in ("_assert_tensor_metadata", "arange", "ones", "triu", "outer"):
                continue   # asserts and constants (no input, no parameter): replicated, never searched
            assert opts is not None, f"{name}: no rule for {n.meta['autopar'].op}"
            assert opts[0].out == R and all(p == R for p in opts[0].ins) and not opts[0].split
    fc = next(n for n in capture(*build("gpt-tiny", batch=2)).nodes() if n.name == "linear_2")
    assert sorted(str(o) for o in options(fc)) == [
        "P <- (S2, S1, R)", "R <- (R, R, R)", "S0 <- (S0, R, R)", "S1 <- (S1, R, R)", "S2 <- (R, S0, S0)"]
    rowwise = next(o for o in options(fc) if o.out == P)
    assert rowwise.grad(2) == R and rowwise.grad(0) == 2   # the bias is added once: its gradient is whole


def test_strategies_divide_on_every_axis():
    fc = next(n for n in capture(*build("gpt-tiny", batch=2)).nodes() if n.name == "linear_2")   # [2, 32, 256]
    ss = strategies(options(fc), [(2, 32, 64), (256, 64), (256,)], (2, 32, 256), (4, 2))
    assert all(s.out[0] != 0 for s in ss)                  # the batch of 2 does not split 4 ways
    assert any(s.out == (1, 1) for s in ss)                # 32 tokens split 4 × 2 ways
    assert value_specs((2, 6), (2, 3)) == [(R, R), (R, 1), (0, R), (0, 1), (1, R), (1, 1)]   # dim 1 by 2 × 3


def test_reshard_prices_follow_the_ring_formulas():
    cl = get_cluster("a100-80g", 16)
    p, n = Pricer((2, 8), cl), 2.0**24
    t_ag, sent = p.reshard((R, 1), (R, R), n)
    assert sent == pytest.approx(7 / 8 * n)
    assert t_ag == pytest.approx(7 / 8 * n / cl.intra_bandwidth + 7 * cl.intra_latency)
    assert p.reshard((R, P), (R, R), n)[1] == pytest.approx(2 * 7 / 8 * n)        # all-reduce
    assert p.reshard((R, P), (R, 0), n)[1] == pytest.approx(7 / 8 * n)            # reduce-scatter
    assert p.reshard((R, 1), (R, 2), n)[1] == pytest.approx(7 / 8 * n / 8)        # all-to-all of the local shard
    assert p.reshard((R, R), (0, 1), n) == (0.0, 0.0)                            # slicing is free
    assert p.reshard((P, R), (R, R), n)[0] > p.reshard((R, P), (R, R), n)[0]      # the outer axis spans nodes
    # a dim sharded by both axes is nested outer to inner (DTensor's order): the outer axis moves it only
    # after the inner shard is gathered (the emission runs the same moves: tests/test_placements_emit.py)
    q = Pricer((2, 2), get_cluster("a100-80g", 4))
    assert reshard_steps((2, 2), (0, 2), (2, 2)) == [(1, 2, R), (0, 2, 0), (1, R, 2)]
    assert q.reshard((2, 2), (0, 2), n)[1] == pytest.approx(n / 4 + n / 4)         # all-gather, then all-to-all
    assert reshard_steps((0, R), (0, 0), (2, 2)) == [(1, R, 0)]                     # an inner slice: free
    assert reshard_steps((R, 0), (0, 0), (2, 2)) == [(1, 0, R), (0, R, 0), (1, R, 0)]


def test_ilp_rediscovers_megatron_on_a_tp_axis():
    """Enough memory pressure that every weight is sharded 8 ways: q/k/v and gate/up column-parallel,
    o_proj and down_proj row-parallel, and in each block exactly those two produce partial sums (one
    reduction after attention, one after the MLP: here reduce-scatters into a sequence-sharded residual
    stream, Megatron-SP, the same volume as the all-reduces)."""
    mg = _llama(2, 2048, 1024, 4, 5504, vocab=32000)
    sol = solve_ops(mg, fold(mg), (1, 8), get_cluster("a100-80g", 8), dtype="bf16", memory_limit=1.3 * 2**30)
    assert sol.feasible
    place = sol.param_placements
    for i in range(2):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert place[f"layers.{i}.{m}.weight"] == (R, 0), m
        for m in ("self_attn.o_proj", "mlp.down_proj"):
            assert place[f"layers.{i}.{m}.weight"] == (R, 1), m
    block = [n for n in mg.nodes() if n.meta["autopar"].scope.startswith("layers.0")]
    placed = [n for n in block if n.name in sol.strategies]   # asserts and constants are not placed
    partial = [n.meta["autopar"].scope for n in placed if P in sol.strategies[n.name].out]
    assert partial == ["layers.0.self_attn.o_proj", "layers.0.mlp.down_proj"]
    for n in placed:
        if P in sol.strategies[n.name].out:
            (reader,) = n.users
            assert P not in sol.strategies[reader.name].ins[0]   # resolved right after: one reduction


@pytest.mark.parametrize("layers", [4, 8])
def test_folded_search_equals_unfolded_without_a_binding_limit(layers):
    mg = _llama(layers, 256, 256, 8, 704)
    cl = get_cluster("a100-80g", 8)
    a = solve_ops(mg, fold(mg), (2, 4), cl, dtype="bf16")
    b = solve_ops(mg, no_fold(mg), (2, 4), cl, dtype="bf16")
    assert a.step_time_s == pytest.approx(b.step_time_s, rel=1e-9)
    assert a.solver["variables"] < b.solver["variables"]


def test_folded_search_mixes_blocks_like_unfolded_under_a_binding_limit():
    """Under a binding limit the unfolded ILP shards some blocks more than others to fill memory; the
    folded one splits a template's instances into runs of 1, 2, 1 (``binary_parts(4)``) with their own
    variables, so it finds the same mix (one strategy for every block was up to 6 % slower)."""
    mg = _llama(4, 256, 128, 8, 704)
    cl = get_cluster("a100-80g", 8)
    free = solve_ops(mg, fold(mg), (2, 4), cl, dtype="bf16", memory_limit=math.inf)
    limit = 0.55 * free.peak_memory
    a = solve_ops(mg, fold(mg), (2, 4), cl, dtype="bf16", memory_limit=limit)
    b = solve_ops(mg, no_fold(mg), (2, 4), cl, dtype="bf16", memory_limit=limit)
    assert a.feasible and b.feasible and a.peak_memory <= limit and b.peak_memory <= limit
    assert a.step_time_s == pytest.approx(b.step_time_s, rel=RELATIVE_GAP)
    assert a.solver["variables"] < b.solver["variables"]
    per_block: dict[str, set] = {}
    for fqn, spec in a.param_placements.items():
        if fqn.startswith("layers."):
            per_block.setdefault(fqn.split(".", 2)[2], set()).add(spec)
    assert any(len(specs) > 1 for specs in per_block.values())   # blocks take different placements


def test_tied_weights_are_one_parameter_with_one_gradient_sync():
    mg = capture(*build("gpt-tiny", batch=8), name="gpt-tiny")
    sol = solve_ops(mg, fold(mg), (8, 1), get_cluster("a100-80g", 8), dtype="bf16")
    assert sol.param_placements["wte.weight"] == sol.param_placements["lm_head.weight"]
    assert set(sol.param_placements) == {n for n, _ in mg.gm.named_parameters(remove_duplicate=False)}


def test_per_op_plan_json_is_deterministic_and_validated():
    model, args, kwargs = build("llama-tiny", batch=8)
    a = make_plan(model, (args, kwargs), "a100-80g", search="ops", fix={"dp": 1, "tp": 8}, memory_limit=2e6)
    b = make_plan(model, (args, kwargs), "a100-80g", search="ops", fix={"dp": 1, "tp": 8}, memory_limit=2e6)
    assert a.to_json() == b.to_json()
    d = a.to_dict()
    assert d["placements"]["params"] and d["tensor_parallel"] == {} and d["search"]["solver_status"] == "optimal"
    assert math.isclose(sum(d["predicted"]["breakdown"][k] for k in d["predicted"]["breakdown"] if k.startswith("time")),
                        d["predicted"]["step_time_s"], rel_tol=1e-5)
    from planner.plan import Plan
    bad = a.to_dict()
    bad["placements"]["params"]["lm_head.weight"] = "R,S0;import os"
    with pytest.raises(BadInput, match="placements.params.lm_head.weight"):
        Plan.from_dict(bad)
    bad = a.to_dict()
    first = next(iter(bad["placements"]["nodes"]))
    bad["placements"]["nodes"][first]["out"] = "R"
    with pytest.raises(BadInput, match="2 comma-separated"):
        Plan.from_dict(bad)


def test_per_op_search_refuses_what_it_cannot_plan():
    model, args, kwargs = build("llama-tiny", batch=8)
    with pytest.raises(BadInput, match="per-op search plans dp x tp meshes"):
        make_plan(model, (args, kwargs), "a100-80g", search="ops", fix={"pp": 2})
    with pytest.raises(BadInput, match="range plans"):
        make_plan(model, (args, kwargs), "a100-80g", search="ops", seq_len=(16, 32))
    with pytest.raises(BadInput, match="does not divide"):
        make_plan(model, (args, kwargs), "a100-80g", search="ops", fix={"tp": 3})
