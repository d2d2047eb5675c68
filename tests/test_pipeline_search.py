"""Pipeline search (search.pipeline): stage cuts balanced by time, bubble and in-flight memory per
schedule (DESIGN §4), and the planner's choice of the fewest stages that fit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.api import make_plan_from_spec
from search.errors import BadInput, Infeasible

GOLDEN = Path(__file__).resolve().parent / "golden"
from search.pipeline import SCHEDULES, Regions, bubble, chunk_ranks, inflight, partition, simulate


def _regions(times, params=None, act=None):
    n = len(times)
    params = params or [0] * n
    act = act or [0.0] * n
    rows = [(t, t / 3, t / 3, p, a, a, a, 0.0, True) for t, p, a in zip(times, params, act)]
    return Regions.build(rows)


def test_partition_balances_time_not_region_count():
    rg = _regions([5, 1, 1, 1, 1, 1])  # a heavy first region (embedding-like)
    assert partition(rg, 2, lambda s, a, b: True) == [(0, 1), (1, 6)]
    rg = _regions([1, 1, 1, 1, 1, 1, 1, 4])  # a heavy last region (LM-head-like)
    assert partition(rg, 3, lambda s, a, b: True) == [(0, 4), (4, 7), (7, 8)]


def test_partition_respects_memory_and_reports_no_fit():
    rg = _regions([1] * 6, act=[1.0] * 6)
    # stage s may hold at most 3 - s regions' activations: forces the cut off the time optimum
    fits = lambda s, a, b: (rg.act[b] - rg.act[a]) <= 3 - s  # noqa: E731
    assert partition(rg, 3, fits) == [(0, 3), (3, 5), (5, 6)]
    assert partition(rg, 2, lambda s, a, b: b - a <= 2) is None
    assert partition(rg, 7, lambda s, a, b: True) is None  # more stages than regions


@pytest.mark.parametrize("p,m", [(2, 8), (4, 8), (4, 16), (8, 32)])
def test_bubble_fractions_match_design_formulas(p, m):
    t, fwd, w = 3.0, 1.0, 1.0  # F = B = W
    ideal = m * t
    assert bubble("gpipe", p, t, fwd, w) / ideal == pytest.approx((p - 1) / m)
    assert bubble("1f1b", p, t, fwd, w) / ideal == pytest.approx((p - 1) / m)
    assert bubble("interleaved", p, t, fwd, w) / ideal == pytest.approx((p - 1) / (2 * m))
    assert bubble("zb-h1", p, t, fwd, w) == pytest.approx((p - 1) * (fwd + (t - fwd - w) - w))
    assert bubble("zbv", p, t, fwd, w) == 0.0
    assert 0 < bubble("wave", p, t, fwd, w) < bubble("1f1b", p, t, fwd, w)
    assert all(bubble(s, 1, t, fwd, w) == 0 for s in SCHEDULES)


def test_inflight_activations_per_schedule():
    p, m = 4, 16
    assert [inflight("gpipe", p, s, m) for s in range(p)] == [16] * 4
    assert [inflight("1f1b", p, s, m) for s in range(p)] == [4, 3, 2, 1]
    assert inflight("interleaved", p, 0, m) == pytest.approx(4 * (1 + 3 / 8))
    assert inflight("1f1b", 8, 0, 2) == 2  # never more than the microbatches there are


def test_fixed_pipeline_plan_lists_stages_that_cover_the_model():
    plan = json.loads(make_plan_from_spec("gpt2-small", cluster="a100-80g", devices=8, global_batch=32,
                                          fix={"pp": 4, "tp": 2, "schedule": "1f1b"}).to_json())
    assert plan["degrees"]["pp"] == 4 and plan["mesh"] == {"shape": [4, 1, 2], "axes": ["pp", "dp", "tp"]}
    stages = plan["pipeline"]["stages"]
    assert plan["pipeline"]["schedule"] == "1f1b" and len(stages) == 4
    assert stages[0]["regions"][0] == 0 and all(a["regions"][1] == b["regions"][0] for a, b in zip(stages, stages[1:]))
    assert stages[0]["blocks"].startswith("blocks.0") and any(st["blocks"].endswith("blocks.11") for st in stages)
    assert stages[-1]["regions"][1] == 14  # embeddings, 12 blocks, final norm + LM head
    # balanced by time, not by blocks: the LM head (V=50257) is worth several blocks
    times = [st["time_per_microbatch_s"] for st in stages]
    assert max(times) < 1.5 * min(times)
    assert plan["pipeline"]["microbatches"] >= 4
    assert 0 < plan["predicted"]["bubble_fraction"] < 1
    assert max(s["peak_memory_bytes"] for s in stages) == plan["predicted"]["peak_memory_bytes"]


@pytest.mark.parametrize("schedule,ranks", [("interleaved", [0, 1, 0, 1]), ("zbv", [0, 1, 1, 0]),
                                            ("wave", [0, 1, 1, 0]), ("zb-h1", [0, 1])])
def test_multi_chunk_schedules_place_chunks_like_torch(schedule, ranks):
    plan = json.loads(make_plan_from_spec("gpt2-small", cluster="a100-80g", devices=2, global_batch=8,
                                          fix={"pp": 2, "schedule": schedule}).to_json())
    stages = plan["pipeline"]["stages"]
    assert [st["rank"] for st in stages] == ranks
    assert stages[-1]["regions"][1] == 14 and all(a["regions"][1] == b["regions"][0]
                                                  for a, b in zip(stages, stages[1:]))


def test_gpipe_holds_more_activations_than_1f1b():
    def peak(schedule):
        return json.loads(make_plan_from_spec(
            "gpt2-small", cluster="a100-80g", devices=4, global_batch=64,
            fix={"pp": 4, "tp": 1, "schedule": schedule, "microbatches": 16, "recompute": "none"}).to_json())
    g, f = peak("gpipe"), peak("1f1b")
    act = lambda d: d["predicted"]["breakdown"]["memory_activations_bytes"]  # noqa: E731
    assert act(g) > 2 * act(f)
    assert g["predicted"]["step_time_s"] == pytest.approx(f["predicted"]["step_time_s"])


def test_pipeline_only_when_nothing_else_fits():
    fits = json.loads(make_plan_from_spec("gpt2-small", cluster="a100-80g", devices=8).to_json())
    assert fits["degrees"]["pp"] == 1
    # gpt2-xl (1.6B) in 5 GiB per device without ZeRO-2/3: no dp × tp plan holds it
    spec = dict(cluster="a100-80g", devices=8, global_batch=16, memory_limit_gib=5)
    big = json.loads(make_plan_from_spec("gpt2-xl", fix={"zero": 1}, **spec).to_json())
    pp = big["degrees"]["pp"]
    assert pp > 1 and big["predicted"]["peak_memory_bytes"] <= 5 * 2**30
    assert {st["rank"] for st in big["pipeline"]["stages"]} == set(range(pp))
    assert big["pipeline"]["schedule"] != "none"
    for fewer in [p for p in (1, 2, 4) if p < pp]:  # the fewest stages that fit
        with pytest.raises(Infeasible, match=f"pp={fewer}"):
            make_plan_from_spec("gpt2-xl", fix={"zero": 1, "pp": fewer}, **spec)


def test_bad_pipeline_fixes():
    with pytest.raises(BadInput, match="unknown schedule"):
        make_plan_from_spec("gpt-tiny", cluster="a100-80g", devices=8, fix={"pp": 2, "schedule": "zigzag"})
    with pytest.raises(BadInput, match="needs pp>1"):
        make_plan_from_spec("gpt-tiny", cluster="a100-80g", devices=8, fix={"pp": 1, "schedule": "1f1b"})
    with pytest.raises(BadInput, match="does not factor"):
        make_plan_from_spec("gpt-tiny", cluster="a100-80g", devices=8, fix={"pp": 4, "dp": 4})


def _makespan(schedule, p, m):
    ranks = chunk_ranks(schedule, p)
    v = len(ranks) // p
    events = simulate(schedule, ranks, [(1 / v, 1 / v, 1 / v)] * len(ranks), m)  # F = B = W, t = 3 per rank
    assert len(events) == len(ranks) * m * (3 if schedule in ("zb-h1", "zbv") else 2)
    return max(e[5] for e in events)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16)])
def test_simulated_timeline_matches_bubble_formulas(p, m):
    t = 3.0
    assert _makespan("gpipe", p, m) == pytest.approx((m + p - 1) * t)
    assert _makespan("1f1b", p, m) == pytest.approx(m * t + bubble("1f1b", p, t, 1.0, 1.0))
    assert _makespan("zb-h1", p, m) < _makespan("1f1b", p, m)
    assert _makespan("zbv", p, m) <= m * t * 1.12  # near zero bubble when F = B = W


def test_explain_timeline_picture(tmp_path, capsys):
    from planner.cli import main

    golden = GOLDEN / "gpt2-xl_a100_8_mem5_zero1.json"
    out = tmp_path / "timeline.png"
    assert main(["explain", str(golden), "--timeline", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "simulated idle" in capsys.readouterr().out
    assert main(["explain", str(GOLDEN / "gpt-tiny_a100_8.json"), "--timeline", str(tmp_path / "x.png")]) == 2
    assert "not pipelined" in capsys.readouterr().err


@pytest.mark.parametrize("schedule, units", [("1f1b", [2, 2]), ("interleaved", [3, 3])])
def test_pipeline_zero_prices_one_collective_per_fsdp_unit(schedule, units):
    """ZeRO-1 in a pipeline moves each rank's gradients per FSDP unit, as ``passes.zero`` emits them: each
    model chunk a root unit and each block in it its own (gpt-tiny: embedding, 2 blocks, head)."""
    from examples.zoo import build
    from planner.capture import capture
    from search.baseline import enumerate_candidates
    from search.candidate import dp_sync
    from search.cluster import get_cluster

    model, args, _ = build("gpt-tiny", batch=8)
    mg = capture(model, args)
    cl = get_cluster("a100-80g", 4)
    (c,) = enumerate_candidates(mg, cl, global_batch=8, dtype="bf16",
                                fix={"pp": 2, "dp": 2, "zero": 1, "schedule": schedule, "microbatches": 4,
                                     "recompute": "none"})
    per_rank = [[s for s in c.stages if s.rank == r] for r in range(2)]
    blocks = [sum(1 + sum(1 <= i <= 2 for i in range(*s.regions)) for s in own) for own in per_rank]
    assert blocks == units
    expect = max(dp_sync(sum(s.params for s in own), cl, "bf16", 2, 1, 4, False, units=u)[0]
                 for own, u in zip(per_rank, units))
    assert c.breakdown["dp_gradients"] == pytest.approx(expect, rel=1e-12)
    one_unit = max(dp_sync(sum(s.params for s in own), cl, "bf16", 2, 1, 4, False)[0] for own in per_rank)
    assert c.breakdown["dp_gradients"] > one_unit  # more latencies than one collective per kind


def test_stage_p2p_is_the_two_sends_its_time_includes():
    """A chunk's ``p2p_s``: its output sent forward and its gradient sent back (the last sends nothing)."""
    from examples.zoo import build
    from planner.capture import capture
    from search import cost
    from search.baseline import enumerate_candidates
    from search.cluster import get_cluster

    model, args, _ = build("gpt-tiny", batch=8)
    mg = capture(model, args)
    cl = get_cluster("a100-80g", 2)
    (c,) = enumerate_candidates(mg, cl, global_batch=8, dtype="bf16",
                                fix={"pp": 2, "schedule": "1f1b", "microbatches": 4, "recompute": "none"})
    first, last = c.stages
    hidden = 2 * 32 * 64 * 2  # a microbatch of 2 samples: [2, 32, 64] in bf16
    assert first.p2p_s == pytest.approx(2 * cost.collective_time("p2p", hidden, 2, cl, spans_nodes=False))
    assert last.p2p_s == 0.0 and first.time_s > first.p2p_s > 0
