"""Range planning (issue 8): one symbolic capture, specialised per value, gives the plans a fresh
concrete plan gives; breakpoints are exact on the grid; piecewise JSON is deterministic; the emitted
module of each piece matches one process on real gloo ranks."""
from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sympy
import torch

from examples.zoo import build
from planner.api import load_cluster, make_plan, make_plan_from_spec
from planner.capture import capture, capture_symbolic
from planner.cli import main
from planner.models import resolve_model
from planner.plan import Plan, decision
from search.baseline import enumerate_candidates
from search.chunking import chunk_regions
from search.errors import BadInput
from search.fold import fold
from search.symbolic import S
from search.saved import annotate_saved
from search.specialize import Specializer
from search.strategy import ilp_select
from tests.distributed import loss_of, run_ranks

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
# gpt-tiny on two a100s with 10 MiB per device over S = 16..2048 (grid 16): five pieces, memory and
# time breakpoints (ZeRO-3, selective and full recompute, then Ulysses sequence parallelism)
SPEC = dict(cluster="a100-80g", devices=2, global_batch=2, seq_len=(16, 2048), memory_limit_gib=10 / 1024)
@pytest.fixture(scope="module")
def ranged() -> Plan:
    return make_plan_from_spec("gpt-tiny", **SPEC)


def _fresh(s: int) -> Plan:
    """A concrete capture and plan of the same model (position table for 2048) at S = s."""
    model, args, kwargs = build("gpt-tiny", batch=2, seq=2048)
    return make_plan(model, (tuple(a[:, :s] for a in args), kwargs), load_cluster("a100-80g", 2), global_batch=2,
                     memory_limit=SPEC["memory_limit_gib"] * 2**30, name="gpt-tiny")


HF_GPT2 = "hf:gpt2:n_layer=2,n_embd=64,n_head=4,vocab_size=128"
HF_LLAMA = ("hf:llama:num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,"
            "num_key_value_heads=2,vocab_size=128")


def _cut(v, s: int):
    return v[:, :s] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "bert-tiny", "gpt-tiny-eager", HF_GPT2, HF_LLAMA])
def test_specialized_symbolic_graph_is_the_concrete_capture(name):
    """Facts, saved bytes and the whole search agree with a capture traced at that point (the zoo at
    two symbols, Hugging Face models with the sequence only, as an S range captures them)."""
    hf = name.startswith("hf:")
    loaded = resolve_model(name, batch=2, seq=64 if hf else 8)  # the zoo keeps its default position table
    at = Specializer(capture_symbolic(loaded.model, loaded.args, loaded.kwargs, name=name,
                                      batch_dim=None if hf else 0))
    cl = load_cluster("a100-80g", 8)
    for b, s in ([(2, 16), (2, 40)] if hf else [(8, 16), (16, 32), (8, 5)]):
        point = at(b, s)
        model, args, kwargs = (loaded.model, tuple(_cut(a, s) for a in loaded.args),
                               {k: _cut(v, s) for k, v in loaded.kwargs.items()}) if hf else build(name, batch=b, seq=s)
        traced = capture(model, args, kwargs, name=name)
        annotate_saved(traced.gm, folding=fold(traced))
        assert (point.batch_size, point.seq_len) == (b, s)
        assert [n.meta["autopar"] for n in point.nodes()] == [n.meta["autopar"] for n in traced.nodes()]
        assert [n.meta["saved_bytes"] for n in point.nodes()] == [n.meta["saved_bytes"] for n in traced.nodes()]
        wins = [enumerate_candidates(m, cl, global_batch=b, dtype="bf16", select=ilp_select, memory_limit=3e6,
                                     folding=fold(m))[0] for m in (point, traced)]
        assert [(w.key(), w.step_time_s, w.peak_memory, w.chunking) for w in wins][0] == \
               [(w.key(), w.step_time_s, w.peak_memory, w.chunking) for w in wins][1], (b, s)
        _check_chunk_regions(point, traced)


def _check_chunk_regions(point, traced):
    """The point's chunk regions, evaluated from the symbolic probe, equal probing the point itself and
    (but for node names, which the symbolic capture numbers its own way) probing a fresh capture."""
    regions = chunk_regions(point, fold(point))
    del point.gm.meta["chunk_regions"]
    assert regions == chunk_regions(point, fold(point))
    unnamed = [[dataclasses.replace(r, nodes=len(r.nodes)) for r in rs] for rs in (regions, chunk_regions(traced))]
    assert unnamed[0] == unnamed[1] and regions


def test_evoformer_chunk_regions_are_symbolic_in_batch_and_residues():
    """Pair regions (triangle updates, masked 5-D attention on the math kernel) over B and N = S."""
    at = Specializer(capture_symbolic(*build("evoformer-tiny", batch=2, seq=16), name="evo", seq_dims=(1, 2)))
    for b, n in ((2, 16), (3, 24), (2, 40)):
        _check_chunk_regions(at(b, n), capture(*build("evoformer-tiny", batch=b, seq=n), name="evo"))


def test_pieces_tile_the_grid_with_exact_breakpoints(ranged):
    r = ranged.range
    assert (r["symbol"], r["lo"], r["hi"], r["step"]) == ("S", 16, 2048, 16)
    assert len(r["pieces"]) >= 3 and {b["cause"] for b in r["breakpoints"]} >= {"memory", "time"}
    for b in r["breakpoints"]:
        left, right = b["left"], b["right"]
        if b["cause"] == "memory":  # the lower plan no longer fits at S = at
            assert not left["feasible"] and left["peak_memory_bytes"] > SPEC["memory_limit_gib"] * 2**30
        else:  # both fit at S = at and the upper plan is faster there
            assert left["feasible"] and right["step_time_s"] < left["step_time_s"]
        assert right["feasible"]
    # far fewer searches than grid values: probes, then two per boundary and a few misses
    assert len(r["samples"]) <= 4 * len(r["pieces"]) + 8 < (2048 - 16) // 16


def test_piecewise_plan_equals_fresh_concrete_plans(ranged):
    """20 grid values incl. both sides of every breakpoint: the piece's plan is the fresh plan, and where
    the range search evaluated a value its predicted step time is the fresh one."""
    r = ranged.range
    points = sorted({v for b in r["breakpoints"] for v in (b["at"] - 16, b["at"])} | {16, 2048})
    spread = [v for v in range(32, 2048, 96) if v not in points]
    points = sorted(points + spread[:: max(1, len(spread) // (20 - len(points)))])[:20]
    assert len(points) == 20
    samples = {s["at"]: s for s in r["samples"]}
    for s in points:
        fresh = _fresh(s)
        assert ranged.piece_for(s).decision() == fresh.decision(), s
        if s in samples:
            assert samples[s]["step_time_s"] == pytest.approx(fresh.predicted["step_time_s"], rel=1e-5)
            assert samples[s]["peak_memory_bytes"] == pytest.approx(fresh.predicted["peak_memory_bytes"], rel=1e-5)


def test_piece_expressions_reproduce_the_samples(ranged):
    r = ranged.range
    S = sympy.Symbol("S")
    checked = 0
    for i, pc in enumerate(r["pieces"]):
        if not pc["step_time_s"]:
            continue
        time_expr, mem_expr = (sympy.sympify(pc[k], locals={"S": S}) for k in ("step_time_s", "peak_memory_bytes"))
        for s in r["samples"]:
            if s["piece"] == i:
                assert float(time_expr.subs(S, s["at"])) == pytest.approx(s["step_time_s"], rel=1e-5)
                assert float(mem_expr.subs(S, s["at"])) == pytest.approx(s["peak_memory_bytes"], rel=1e-5)
                checked += 1
    assert checked >= 4


def test_range_json_is_byte_identical_across_runs_and_processes(ranged):
    again = make_plan_from_spec("gpt-tiny", **SPEC)
    assert again.to_json() == ranged.to_json()
    cli = subprocess.run([sys.executable, "-m", "planner", "plan", "gpt-tiny", "--cluster", "a100-80g", "--devices",
                          "2", "--global-batch", "2", "--seq", "16..2048", "--memory-limit", str(10 / 1024),
                          "--format", "json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert cli.stdout == ranged.to_json()


def test_recorded_range_case_replans_and_diffs(ranged):
    """A range case records its range (a list), re-plans to the same bytes, and a changed range is named."""
    from planner.check import make_case, plan_case, with_case

    case = make_case("gpt-tiny", cluster="a100-80g", devices=2, global_batch=2, seq=(16, 2048),
                     memory_limit_gib=SPEC["memory_limit_gib"])
    recorded = with_case(ranged, case)
    assert recorded.to_dict()["case"]["seq"] == [16, 2048]
    assert plan_case(recorded.to_dict()["case"]).to_json() == recorded.to_json()
    lines = recorded.diff(with_case(ranged.piece_for(16), case))
    assert any(line.startswith("range pieces: 16..") and " | " in line and line.endswith("-> point plan") for line in lines)


def test_batch_range_equals_fresh_plans():
    """--global-batch LO..HI: the batch is the symbol; each piece is the fresh plan at that batch."""
    model, args, kwargs = build("gpt-tiny", batch=2, seq=64)
    cl = load_cluster("a100-80g", 2)
    plan = make_plan(model, (args, kwargs), cl, global_batch=(2, 64, 2), memory_limit=4 * MIB, name="gpt-tiny")
    r = plan.range
    assert r["symbol"] == "B" and len(r["pieces"]) >= 2
    for b in sorted({2, 64} | {x for bp in r["breakpoints"] for x in (bp["at"] - 2, bp["at"])}):
        m, a, k = build("gpt-tiny", batch=b, seq=64)
        fresh = make_plan(m, (a, k), cl, global_batch=b, memory_limit=4 * MIB, name="gpt-tiny")
        assert plan.piece_for(b).decision() == fresh.decision(), b


@pytest.mark.parametrize("argv,needle", [
    (["--seq", "2048..16"], "need 1 <= LO <= HI"),
    (["--seq", "16..2048:7"], "STEP dividing HI - LO"),
    (["--seq", "1..64"], "start at 2 or more"),
    (["--seq", "16..x"], "LO..HI or LO..HI:STEP"),
    (["--seq", "16..64", "--global-batch", "2..8"], "not both at once"),
])
def test_bad_ranges_are_bad_input(argv, needle, capsys):
    code = main(["plan", "gpt-tiny", "--devices", "2", *argv])
    assert code == 2
    assert needle in capsys.readouterr().err


def test_make_plan_seq_len_takes_a_range_only():
    model, args, kwargs = build("gpt-tiny", batch=2, seq=16)
    with pytest.raises(BadInput, match="takes a range"):
        make_plan(model, (args, kwargs), "a100-80g", seq_len=16)


# --- the emitted module of each piece on real gloo ranks -----------------------------------------------

GLOO_POINTS = (64, 150, 216)  # three pieces of the plan below: dp=2; dp=2 + full recompute; tp=2 + full


def _gloo_plan() -> Plan:
    model, args, kwargs = build("gpt-tiny", batch=2, seq=256)
    return make_plan(model, (args, kwargs), load_cluster("a100-80g", 2), dtype="fp32", seq_len=(8, 256),
                     memory_limit=3 * MIB, fix={"zero": 0, "microbatches": 1}, name="gpt-tiny")


def _run_pieces(rank, world, plan_json):
    """Each input length through ``auto_parallelize(plan=range plan)``: loss and every gradient (a tp
    shard against the matching shard of the reference) vs the single-process model."""
    from passes.tp import shard_tensor
    from planner.api import auto_parallelize

    plan = Plan.from_json(plan_json)
    out = {}
    for s in GLOO_POINTS + (240,):
        model, args, kwargs = build("gpt-tiny", batch=2, seq=256, device="cpu")
        args = tuple(a[:, :s] for a in args)
        ref = copy.deepcopy(model)
        try:
            dmodel = auto_parallelize(model, (args, kwargs), plan=plan)
        except BadInput as exc:
            out[s] = {"error": str(exc)}
            continue
        loss = loss_of(dmodel(*args, **kwargs))
        loss.backward()
        ref_loss = loss_of(ref(*args, **kwargs))
        ref_loss.backward()
        ref_params = dict(ref.named_parameters(remove_duplicate=False))
        tp, tp_rank = dmodel.mesh.size("tp"), dmodel.mesh.local_rank("tp")
        worst, compared = 0.0, 0
        for name, p in dmodel.named_parameters():
            rg = ref_params[name].grad
            if name in dmodel.param_shards and tp > 1:
                dim, groups = dmodel.param_shards[name]
                rg = shard_tensor(rg, dim, groups, tp, tp_rank)
            worst = max(worst, (p.grad - rg).abs().max().item())
            compared += 1
        out[s] = {"degrees": dict(dmodel.plan.degrees), "recompute": dmodel.plan.recompute,
                  "seq_len": dmodel.plan.seq_len, "loss": abs(loss.item() - ref_loss.item()), "grad": worst,
                  "compared": compared, "params": len(ref_params)}
    return out


def test_auto_parallelize_runs_the_piece_for_the_input_length():
    plan = _gloo_plan()
    expect = {s: plan.piece_for(s) for s in GLOO_POINTS}
    assert len({json.dumps(p.decision(), sort_keys=True) for p in expect.values()}) == 3
    results = run_ranks(_run_pieces, 2, plan.to_json(), timeout=240)
    for rank_out in results:
        for s in GLOO_POINTS:
            got = rank_out[s]
            assert "error" not in got, got
            assert got["degrees"] == expect[s].degrees and got["recompute"] == expect[s].recompute
            assert got["seq_len"] == s
            assert got["loss"] <= 1e-5 and got["grad"] <= 1e-5 and got["compared"] >= got["params"] - 1  # tied head
        assert "no plan" in rank_out[240]["error"] and "S = 232..256" in rank_out[240]["error"]


def _toy_search(v: int, bounds, priced: list | None = None):
    """A toy planner over three configurations of one tier whose step time and memory grow with v:
    ``quad`` is fast at small v, then ``lin``, then ``late``: fastest, but only valid from v = 4000
    on (an attention variant that needs enough tokens per rank: priced, invalid, its memory fits)."""
    from search.range import Outcome

    costs = {("1", "quad"): (1e-3 * v * v, 10.0 * v, True), ("1", "lin"): (2.0 * v, 5.0 * v, True),
             ("1", "late"): (1.5 * v, 4.0 * v, v >= 4000)}
    got = {}
    for sweep in bounds.passes() if bounds is not None else [None]:
        for config, (t, mem, valid) in costs.items():
            if sweep is not None and sweep.skip(config):
                continue
            got[config] = (t, mem, valid and mem <= 40_000)
            if priced is not None:
                priced.append((v, config))
            if sweep is not None:
                sweep.saw(config, t, got[config][2])
    feasible = sorted((t, c) for c, (t, _, f) in got.items() if f)
    win = feasible[0][1] if feasible else None
    return Outcome(win, win, got, configs={c: (t, m <= 40_000) for c, (t, m, _) in got.items()}, config=win,
                   skipped=bounds.skipped if bounds is not None else 0)


def test_bounded_range_search_equals_the_full_one():
    """``search.range.Bounds`` only skips what cannot win: the pieces of a toy range (a time crossing, a
    configuration that becomes valid part-way, memory limits) are those of unbounded searches, every
    value searched has the full search's winner, and the bounded searches price fewer configurations."""
    from search.range import plan_range

    priced_full, priced_bounded = [], []
    full = plan_range(lambda v, b: _toy_search(v, None, priced_full), 16, 12000, 16, 40_000, S)
    bounded = plan_range(lambda v, b: _toy_search(v, b, priced_bounded), 16, 12000, 16, 40_000, S)
    pieces = [(p.lo, p.outcome.decision) for p in full.pieces]
    assert pieces == [(16, ("1", "quad")), (2000, ("1", "lin")), (4000, ("1", "late")), (10016, None)]
    assert [(p.lo, p.outcome.decision) for p in bounded.pieces] == pieces
    for v, o in bounded.evaluated.items():
        assert o.decision == _toy_search(v, None).decision, v
    assert len(priced_bounded) < len(priced_full)


def test_pipeline_range_pieces_are_cut_changes():
    """A range with a pinned pipeline: a piece per stage layout (not per length: stage predictions are
    not part of a plan's decision), each the fresh plan on both sides of every breakpoint."""
    kw = dict(cluster="a100-80g", devices=4, global_batch=4, fix={"pp": 2}, memory_limit_gib=10 / 1024)
    r = make_plan_from_spec("gpt-tiny", seq_len=(16, 2048), **kw).range
    assert 2 <= len(r["pieces"]) <= 8 and len(r["samples"]) < 40
    model, args, kwargs = build("gpt-tiny", batch=4, seq=2048)
    cl = load_cluster("a100-80g", 4)
    for v in sorted({x for b in r["breakpoints"] for x in (b["at"] - r["step"], b["at"])}):
        fresh = make_plan(model, (tuple(a[:, :v] for a in args), kwargs), cl, global_batch=4, fix={"pp": 2},
                          memory_limit=kw["memory_limit_gib"] * 2**30, name="gpt-tiny")
        piece = next(p for p in r["pieces"] if p["lo"] <= v <= p["hi"])
        assert decision(fresh.to_dict()) == decision(piece["plan"]), v


def test_root_of_the_parabola_or_line_in_the_bracket():
    """search.range._root: exact for a quadratic (bracketed or extrapolated past the known values) and a
    line; None when no root falls in (x, y]."""
    from search.range import _root

    def f(u):
        return 2e-3 * (u - 7000) * (u + 500)

    assert _root([(u, f(u)) for u in (5000, 6000, 9000)], 6000, 9000) == pytest.approx(7000, abs=1e-6)
    assert _root([(u, f(u)) for u in (5000, 6000, 6500)], 6500, 9000) == pytest.approx(7000, abs=1e-6)
    assert _root([(u, u - 7300.0) for u in (5000, 6000)], 6000, 9000) == pytest.approx(7300, abs=1e-6)
    assert _root([(u, f(u)) for u in (5000, 6000, 9000)], 7500, 9000) is None
    assert _root([(5000, -1.0)], 5000, 9000) is None


def test_a_search_prices_the_chunking_its_neighbours_asked_for():
    """Bounds.inner: a configuration priced with a chunking a neighbouring value chose gets the step
    time, memory and fit it would have had if the selection had chosen that chunking itself."""
    from search.range import Bounds

    model, args, kwargs = build("gpt-tiny", batch=2, seq=512)
    mg = capture(model, args, kwargs, name="gpt-tiny")
    cl = load_cluster("a100-80g", 2)
    kw = dict(global_batch=2, dtype="fp32", select=ilp_select, folding=fold(mg))
    lean = min(enumerate_candidates(mg, cl, memory_limit=1e12, **kw), key=lambda c: c.peak_memory)
    chunked = [c for c in enumerate_candidates(mg, cl, memory_limit=lean.peak_memory * 0.98, **kw) if c.chunking]
    assert chunked
    asked = {c.config(): {c.chunk_key()} for c in chunked}
    again = {c.key(): c for c in enumerate_candidates(mg, cl, memory_limit=lean.peak_memory * 0.98,
                                                      bounds=Bounds(inner=asked), **kw)}
    for c in chunked:
        assert again[c.key()].chunk_options[c.chunk_key()] == (c.step_time_s, c.peak_memory, c.feasible)
