"""Plan JSON v1: validation, determinism, explain, diff."""
from __future__ import annotations

import copy
import json
import pickle

import pytest

from planner.plan import Plan
from search.errors import BadInput


def example_plan_dict(**over) -> dict:
    """A valid GPT-2-ish plan on 8 devices (dp=2, tp=2, pp=2). Keyword args override top-level keys."""
    tp = {}
    for i in range(3):
        tp[f"h.{i}.attn.c_attn"] = {"style": "colwise", "groups": 3}
        tp[f"h.{i}.attn.c_proj"] = {"style": "rowwise", "groups": 1}
        tp[f"h.{i}.mlp.c_fc"] = {"style": "colwise", "groups": 1}
        tp[f"h.{i}.mlp.c_proj"] = {"style": "rowwise", "groups": 1}
    d = {
        "version": 1,
        "model": {"name": "gpt2-small", "params": 124439808, "layers": 3},
        "cluster": {"name": "a100-80g", "devices": 8, "devices_per_node": 8},
        "global_batch": 32,
        "seq_len": 1024,
        "dtype": "bf16",
        "mesh": {"shape": [2, 2, 2], "axes": ["pp", "dp", "tp"]},
        "degrees": {"dp": 2, "tp": 2, "pp": 2, "sp": 1, "zero": 1},
        "pipeline": {"schedule": "1f1b", "microbatches": 4, "microbatch_size": 4,
                     "stages": [{"layers": [0, 1]}, {"layers": [2]}]},
        "tensor_parallel": tp,
        "templates": [{"name": "block", "count": 3}],
        "chunking": [],
        "recompute": "selective",
        "predicted": {
            "step_time_s": 0.123456789, "peak_memory_bytes": 21474836480, "comm_bytes": 987654321,
            "bubble_fraction": 0.2, "tflops_per_device": 151.23456789, "mfu": 0.48471337,
            "breakdown": {"compute_s": 0.1, "allreduce_s": 0.01, "allgather_s": 0.005,
                          "memory": {"params_bytes": 1000000000, "activations_bytes": 5000000000}},
        },
        "search": {"seconds": None, "folded": True, "unique_blocks": 1, "ilp_variables": 42,
                   "solver_status": "OPTIMAL", "candidates": 17},
        "alternatives": [
            {"degrees": {"dp": 8, "tp": 1, "pp": 1, "sp": 1}, "zero": 0, "microbatch_size": 4,
             "recompute": "none", "step_time_s": 0.2, "peak_memory_bytes": 90 * 2**30,
             "feasible": False, "why": "peak memory 90.00 GiB > 80 GiB"},
            {"degrees": {"dp": 4, "tp": 2, "pp": 1, "sp": 1}, "zero": 1, "microbatch_size": 8,
             "recompute": "full", "step_time_s": 0.15, "peak_memory_bytes": 40 * 2**30,
             "feasible": True, "why": "21% slower (recompute)"},
        ],
        "warnings": ["attention dropout kept replicated"],
    }
    d.update(over)
    return d


def _reverse_order(o):
    if isinstance(o, dict):
        return {k: _reverse_order(o[k]) for k in reversed(list(o))}
    if isinstance(o, list):
        return [_reverse_order(v) for v in o]
    return o


def _bad(d, *fields):
    with pytest.raises(BadInput) as ei:
        Plan.from_dict(d)
    msg = str(ei.value)
    for f in fields:
        assert f in msg, msg
    return msg


# ------------------------------------------------------------------ round trip / determinism

def test_round_trip_dict_and_json(tmp_path):
    p = Plan.from_dict(example_plan_dict())
    q = Plan.from_json(p.to_json())
    assert q == p
    assert q.to_json() == p.to_json()
    path = tmp_path / "plan.json"
    path.write_text(p.to_json())
    r = Plan.from_json(path)
    assert r.to_json() == p.to_json()
    assert Plan.from_json(str(path)).to_json() == p.to_json()
    assert p.degrees == {"dp": 2, "tp": 2, "pp": 2, "sp": 1, "zero": 1}
    assert p.to_dict()["model"]["name"] == "gpt2-small"


def test_byte_identical_regardless_of_insertion_order():
    a = Plan.from_dict(example_plan_dict())
    b = Plan.from_dict(_reverse_order(example_plan_dict()))
    assert a.to_json() == b.to_json()
    text = a.to_json()
    assert text.endswith("}\n") and not text.endswith("\n\n")
    keys = list(json.loads(text))
    assert keys == ["version", "model", "cluster", "global_batch", "seq_len", "dtype", "mesh", "degrees",
                    "pipeline", "tensor_parallel", "megatron_sp", "sequence_parallel", "placements", "templates", "chunking", "recompute", "predicted",
                    "search", "alternatives", "warnings"]
    assert list(json.loads(text)["degrees"]) == ["dp", "tp", "pp", "sp", "zero"]
    assert text.startswith('{\n  "version": 1,\n')


def test_floats_rounded_to_6_significant_digits():
    p = Plan.from_dict(example_plan_dict())
    pr = json.loads(p.to_json())["predicted"]
    assert pr["step_time_s"] == 0.123457
    assert pr["tflops_per_device"] == 151.235
    assert pr["mfu"] == 0.484713
    assert pr["peak_memory_bytes"] == 21474836480  # ints are exact
    assert '"step_time_s": 0.123457' in p.to_json()
    # tiny float noise does not change the bytes
    d = example_plan_dict()
    d["predicted"]["step_time_s"] = 0.123456789 + 1e-15
    assert Plan.from_dict(d).to_json() == p.to_json()


def test_input_dict_not_modified_and_accessors_are_copies():
    d = example_plan_dict()
    before = copy.deepcopy(d)
    p = Plan.from_dict(d)
    assert d == before
    deg = p.degrees
    deg["dp"] = 99
    assert p.degrees["dp"] == 2


def test_optional_sections_get_defaults():
    d = example_plan_dict()
    for k in ("tensor_parallel", "alternatives", "warnings", "dtype"):
        del d[k]
    del d["predicted"]["breakdown"]
    p = Plan.from_dict(d)
    assert p.tensor_parallel == {} and p.alternatives == [] and p.warnings == []
    assert p.predicted["breakdown"] == {}
    assert Plan.from_json(p.to_json()) == p


# ------------------------------------------------------------------ validation

def test_missing_field():
    d = example_plan_dict()
    del d["degrees"]
    _bad(d, "degrees", "missing")
    d = example_plan_dict()
    del d["pipeline"]["microbatches"]
    _bad(d, "pipeline.microbatches", "missing")


def test_wrong_types():
    _bad(example_plan_dict(global_batch="32"), "global_batch", "integer")
    d = example_plan_dict()
    d["degrees"]["tp"] = 2.0
    _bad(d, "degrees.tp")
    d = example_plan_dict()
    d["degrees"]["dp"] = True
    _bad(d, "degrees.dp")
    d = example_plan_dict()
    d["search"]["folded"] = "yes"
    _bad(d, "search.folded")
    _bad(example_plan_dict(model=[1]), "model", "object")


def test_degree_bounds_and_product():
    d = example_plan_dict()
    d["degrees"]["tp"] = 0
    _bad(d, "degrees.tp", ">= 1")
    d = example_plan_dict()
    d["degrees"]["dp"] = 4
    _bad(d, "degrees", "16", "cluster.devices 8")
    d = example_plan_dict()
    d["mesh"]["shape"] = [2, 2, 4]
    _bad(d, "mesh.shape", "16")
    d = example_plan_dict()
    d["mesh"]["axes"] = ["pp", "dp"]
    _bad(d, "mesh.axes")
    d = example_plan_dict()
    d["degrees"]["zero"] = 4
    _bad(d, "degrees.zero")


def test_enumerations():
    d = example_plan_dict()
    d["pipeline"]["schedule"] = "magic"
    _bad(d, "pipeline.schedule", "magic")
    d = example_plan_dict()
    d["tensor_parallel"]["h.0.attn.c_attn"]["style"] = "diagonal"
    _bad(d, "tensor_parallel.h.0.attn.c_attn.style")
    d = example_plan_dict()
    d["tensor_parallel"]["h.0.attn.c_attn"]["groups"] = 0
    _bad(d, "tensor_parallel.h.0.attn.c_attn.groups")
    _bad(example_plan_dict(recompute="some"), "recompute")
    for s in ("none", "gpipe", "1f1b", "interleaved", "zb-h1", "zbv", "wave"):
        d = example_plan_dict()
        d["pipeline"]["schedule"] = s
        Plan.from_dict(d)


def test_unknown_top_level_key_and_version():
    _bad(example_plan_dict(extra=1), "extra", "unknown")
    _bad(example_plan_dict(version=2), "version")
    _bad([1, 2], "object")


def test_truncated_json_reports_line_and_column(tmp_path):
    text = Plan.from_dict(example_plan_dict()).to_json()
    with pytest.raises(BadInput, match=r"line \d+ column \d+"):
        Plan.from_json(text[: len(text) // 2])
    path = tmp_path / "cut.json"
    path.write_text(text[:200])
    with pytest.raises(BadInput, match=r"cut\.json.*line \d+ column \d+"):
        Plan.from_json(path)


def test_nan_rejected():
    text = Plan.from_dict(example_plan_dict()).to_json().replace('"mfu": 0.484713', '"mfu": NaN')
    with pytest.raises(BadInput, match="NaN"):
        Plan.from_json(text)


def test_deeply_nested_json_bomb(tmp_path):
    with pytest.raises(BadInput, match="nesting"):
        Plan.from_json("[" * 100000 + "]" * 100000)
    d = example_plan_dict()
    nest: dict = {}
    cur = nest
    for _ in range(30):
        cur["x"] = {}
        cur = cur["x"]
    d["templates"] = nest
    _bad(d, "nesting")
    path = tmp_path / "deep.json"
    path.write_text('{"version": 1, "templates": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(BadInput, match="nesting"):
        Plan.from_json(path)


def test_oversized_file_rejected(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as f:
        f.seek(50 * 1024 * 1024 + 10)
        f.write(b" ")
    with pytest.raises(BadInput, match="MB"):
        Plan.from_json(path)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_payload_is_not_executed(tmp_path, capsys):
    for proto in (0, 2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"evil{proto}.json"
        path.write_bytes(pickle.dumps(_Evil(), protocol=proto))
        with pytest.raises(BadInput, match="plan file"):
            Plan.from_json(path)
    assert "pwned" not in capsys.readouterr().out


def test_huge_integer_literal():
    with pytest.raises(BadInput, match="number"):
        Plan.from_json('{"version": ' + "9" * 5000 + "}")


def test_bytes_and_empty_input():
    p = Plan.from_dict(example_plan_dict())
    assert Plan.from_json(p.to_json().encode()) == p
    with pytest.raises(BadInput, match="empty"):
        Plan.from_json("   ")


def test_minimal_plan_explains():
    d = example_plan_dict(tensor_parallel={}, alternatives=[], warnings=[])
    d["pipeline"]["stages"] = []
    del d["predicted"]["breakdown"]
    text = Plan.from_dict(d).explain()
    assert "predicted" in text and "alternatives" not in text


def test_missing_file():
    with pytest.raises(BadInput, match="not found"):
        Plan.from_json("/nonexistent/plan.json")


# ------------------------------------------------------------------ explain / diff

def test_explain_contains_key_numbers():
    text = Plan.from_dict(example_plan_dict()).explain()
    for s in ("gpt2-small", "a100-80g", "dp=2", "tp=2", "pp=2", "zero=1", "1f1b", "selective",
              "predicted", "123.457 ms", "20.00 GiB", "151.2", "48.5 %",
              "h.*.attn.c_attn", "colwise×3", "h.*.mlp.c_proj", "rowwise×3",
              "h.0-2", "attn.c_attn colwise(3), attn.c_proj rowwise, mlp.c_fc colwise, mlp.c_proj rowwise",
              "allreduce", "10.000 ms", "8.1 %", "bubble", "24.691 ms", "activations", "4.66 GiB",
              "alternatives", "peak memory 90.00 GiB > 80 GiB", "attention dropout kept replicated"):
        assert s in text, s
    assert "h.0.attn" not in text
    assert all(len(line) <= 110 for line in text.splitlines())


def test_diff_names_moved_decisions_and_deltas():
    a = Plan.from_dict(example_plan_dict())
    d = example_plan_dict(recompute="full")
    d["degrees"].update(dp=4, pp=1)
    d["mesh"] = {"shape": [4, 2], "axes": ["dp", "tp"]}
    d["pipeline"].update(schedule="none", microbatches=1, microbatch_size=8, stages=[{"layers": [0, 1, 2]}])
    for i in range(3):
        d["tensor_parallel"][f"h.{i}.mlp.c_fc"]["style"] = "rowwise"
    d["chunking"] = [{"kind": "lm_head_loss", "scope": "lm_head", "dim": 0, "chunks": 4}]
    d["predicted"]["step_time_s"] = 0.123456789 * 1.1
    d["predicted"]["peak_memory_bytes"] = 21474836480 // 2
    d["search"]["seconds"] = 12.5
    b = Plan.from_dict(d)
    lines = a.diff(b)
    text = "\n".join(lines)
    for s in ("degrees.dp: 2 -> 4", "degrees.pp: 2 -> 1", "mesh", "pipeline.schedule: 1f1b -> none",
              "pipeline.microbatches: 4 -> 1", "recompute", "full", "tensor_parallel h.*.mlp.c_fc",
              "colwise×3 -> rowwise×3", "chunking", "+10.0%", "-50.0%"):
        assert s in text, (s, text)
    assert "degrees.tp" not in text
    assert "seconds" not in text


def test_diff_ignores_search_seconds():
    a = Plan.from_dict(example_plan_dict())
    d = example_plan_dict()
    d["search"]["seconds"] = 3.25
    assert a.diff(Plan.from_dict(d)) == []
    assert a.diff(a) == []


# ------------------------------------------------------------------ case, placements, richer diff

def example_case(**over) -> dict:
    return {"model": "gpt2-small", "cluster": "a100-80g", "devices": 8, "global_batch": 32, "seq": 1024,
            "dtype": "bf16", "memory_limit_gib": None, "fix": {"tp": 2}, **over}


def test_case_round_trips_first_after_version():
    from planner.plan import case_command

    p = Plan.from_dict(example_plan_dict(case=example_case()))
    assert list(json.loads(p.to_json()))[:3] == ["version", "case", "model"]
    assert Plan.from_json(p.to_json()) == p
    cmd = case_command(p.to_dict()["case"])
    assert cmd == "autopar plan gpt2-small --cluster a100-80g --devices 8 --global-batch 32 --seq 1024 --dtype bf16 " \
                  "--fix tp=2"
    assert "inputs" in p.explain() and cmd[:60] in p.explain()


@pytest.mark.parametrize("case, field", [
    (example_case(fix={"tp": 0}), "case.fix.tp"),
    (example_case(fix={"zero": 4}), "case.fix.zero"),
    (example_case(fix={"bogus": 1}), "case.fix.bogus"),
    (example_case(fix={"schedule": "fast"}), "case.fix.schedule"),
    (example_case(devices="8"), "case.devices"),
    (example_case(memory_limit_gib=-1), "case.memory_limit_gib"),
    (example_case(dtype="int8"), "case.dtype"),
    (example_case(extra=1), "case.extra"),
    ({k: v for k, v in example_case().items() if k != "seq"}, "case.seq"),
    ([], "case"),
])
def test_bad_case_names_the_field(case, field):
    _bad(example_plan_dict(case=case), f"'{field}'")


def test_placements_group_blocks_and_show_replicated_instances():
    from planner.plan import placements

    tp = {f"blocks.{i}.{m}": {"style": s, "groups": g} for i in range(4)
          for m, s, g in (("attn.qkv", "colwise", 3), ("attn.proj", "rowwise", 1))}
    tp.update({f"blocks.{i}.mlp.fc": {"style": "colwise", "groups": 1} for i in (0, 1)})
    tp["lm_head"] = {"style": "colwise", "groups": 1}
    templates = [{"id": "t0", "first": "blocks.0", "instances": 6}]
    assert placements(tp, templates) == [
        ("t0 (6×)", "blocks.0-1", "attn.proj rowwise, attn.qkv colwise(3), mlp.fc colwise"),
        ("t0 (6×)", "blocks.2-3", "attn.proj rowwise, attn.qkv colwise(3)"),
        ("t0 (6×)", "2 instances", "replicated"),
        ("", "(outside blocks)", "lm_head colwise"),
    ]


def test_diff_names_stage_cuts_breakdown_and_other_fields():
    a = Plan.from_dict(example_plan_dict())
    d = example_plan_dict()
    d["pipeline"]["stages"] = [{"blocks": "h.0..h.1"}, {"blocks": "h.2..h.2"}]
    d["predicted"]["comm_bytes"] = 2 * 987654321
    d["predicted"]["breakdown"]["allreduce_s"] = 0.02
    d["alternatives"] = []
    text = "\n".join(a.diff(Plan.from_dict(d)))
    for s in ('pipeline.stages: 2 stages [{"layers":[0,1]},{"layers":[2]}] -> 2 stages [h.0..h.1 | h.2..h.2]',
              "predicted comm bytes: 987,654,321 -> 1,975,308,642 (+100.0%)",
              "breakdown allreduce: 10.000 ms -> 20.000 ms", "also changed: alternatives"):
        assert s in text, (s, text)


def test_decision_ignores_predicted_stage_times_and_memory():
    """Two pipeline plans with the same cuts are one plan (a range over S would otherwise see a new
    plan at every length: the stages' predicted times grow with it); other cuts are another plan."""
    from pathlib import Path

    from planner.plan import decision

    d = json.loads((Path(__file__).parent / "golden" / "gpt2-small_a100_4_pp4_1f1b.json").read_text())
    longer = copy.deepcopy(d)
    for st in longer["pipeline"]["stages"]:
        st["time_per_microbatch_s"] *= 2
        st["peak_memory_bytes"] += 1
    assert decision(longer) == decision(d)
    recut = copy.deepcopy(d)
    recut["pipeline"]["stages"][0]["regions"][1] += 1
    assert decision(recut) != decision(d)
