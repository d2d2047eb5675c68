"""The ``range`` section of the plan JSON: validation, determinism, piece_for, explain, range_chart, CLI."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from planner.check import range_chart
from planner.cli import main
from planner.plan import Plan, _fmt_bytes, _fmt_secs
from search.errors import BadInput

GOLDEN = Path(__file__).resolve().parent / "golden"
REASON = "no plan fits 80 GiB per device; the leanest needs 93.1 GiB"


def _point(name: str, seq_len: int) -> dict:
    """A golden plan without its case, evaluated (nominally) at ``seq_len``."""
    d = json.loads((GOLDEN / name).read_text())
    d.pop("case")
    return {**d, "seq_len": seq_len}


def range_dict() -> dict:
    """A range plan over S = 2048..1048576: tp4 with chunking, then dp4 sp2 ring, then nothing fits."""
    a = _point("llama2-7b_h100_8_s32768_chunked.json", 2048)
    b = _point("gpt2-small_h100_8_s8192_mem3.json", 16384)
    pieces = [
        {"lo": 2048, "hi": 16383, "plan": a, "infeasible": "",
         "step_time_s": "1.2e-9*S**2 + 3.1e-5*S + 0.12", "peak_memory_bytes": "4096*S + 1234567"},
        {"lo": 16384, "hi": 262143, "plan": b, "infeasible": "",
         "step_time_s": "2.5E-10*S**2", "peak_memory_bytes": "(S/2)*1024 + 5e9"},
        {"lo": 262144, "hi": 1048576, "plan": None, "infeasible": REASON,
         "step_time_s": "", "peak_memory_bytes": ""},
    ]
    samples = []
    for k in range(11, 21):
        at = 2 ** k
        i = next(i for i, pc in enumerate(pieces) if pc["lo"] <= at <= pc["hi"])
        ok = pieces[i]["plan"] is not None
        samples.append({"at": at, "piece": i, "step_time_s": 1e-9 * at ** 1.5 + 0.123456789 if ok else None,
                        "peak_memory_bytes": 4096.0 * at + 1e9 if ok else None, "priced": 300 - k, "skipped": 10 * k})
    return {**copy.deepcopy(a), "range": {
        "symbol": "S", "lo": 2048, "hi": 1048576, "step": 2048, "memory_limit_bytes": 80 * 2**30, "pieces": pieces,
        "breakpoints": [
            {"at": 16384, "cause": "memory",
             "left": {"step_time_s": 0.61, "peak_memory_bytes": 79000000000, "feasible": True},
             "right": {"step_time_s": 0.62, "peak_memory_bytes": 70000000000, "feasible": True}},
            {"at": 262144, "cause": "memory",
             "left": {"step_time_s": 9.5, "peak_memory_bytes": 8.6e10, "feasible": False},
             "right": {"step_time_s": None, "peak_memory_bytes": None, "feasible": False}},
        ],
        "samples": samples,
    }}


@pytest.fixture(scope="module")
def plan() -> Plan:
    return Plan.from_dict(range_dict())


def test_round_trip_byte_identical_and_nested_canonical(plan):
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan and again.to_json() == text
    d = json.loads(text)
    assert list(d)[-1] == "range" and list(d["range"]) == ["symbol", "lo", "hi", "step", "memory_limit_bytes", "pieces", "breakpoints", "samples"]
    assert d["range"]["samples"][0]["step_time_s"] == float(f"{1e-9 * 2048 ** 1.5 + 0.123456789:.6g}")
    # a piece's plan is canonical exactly like a top-level plan
    nested = d["range"]["pieces"][1]["plan"]
    assert nested == Plan.from_dict(nested).to_dict()
    assert list(nested) == list(Plan.from_dict(nested).to_dict())
    # shuffled key order and unrounded floats give the same bytes
    shuffled = range_dict()
    shuffled["range"] = dict(reversed(list(shuffled["range"].items())))
    shuffled["range"]["pieces"][0]["plan"]["predicted"]["mfu"] += 1e-12
    assert Plan.from_dict(shuffled).to_json() == text


def _set(path: str, value):
    """A mutator setting ``range.<path>`` (dotted, ints index lists) to ``value``."""
    def mutate(d):
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        cur = d["range"]
        for k in keys[:-1]:
            cur = cur[k]
        cur[keys[-1]] = value
    return mutate


def _off_grid_boundary(d):
    d["range"]["pieces"][0]["hi"], d["range"]["pieces"][1]["lo"] = 16000, 16001


def _drop_piece_boundary(d):
    d["range"]["pieces"][1]["lo"] = 16390  # gap after pieces[0].hi = 16383


BAD = [
    ("range.symbol", _set("symbol", "T"), "unknown value 'T'"),
    ("range.lo", _set("lo", 0), ">= 1"),
    ("range.hi", _set("hi", 100), ">= 2048"),
    ("range.extra", _set("extra", 1), "unknown key"),
    ("range.step", _set("step", 1000), "does not divide"),
    ("range.step", _set("step", 0), ">= 1"),
    ("range.memory_limit_bytes", _set("memory_limit_bytes", 0), "must be > 0"),
    ("range.pieces[1].lo", _off_grid_boundary, "not on the grid"),
    ("range.pieces", _set("pieces", []), "must not be empty"),
    ("range.pieces[0].lo", _set("pieces.0.lo", 2049), "must be 2048"),
    ("range.pieces[1].lo", _drop_piece_boundary, "contiguous"),
    ("range.pieces[2].hi", _set("pieces.2.hi", 1048575), "must be range.hi 1048576"),
    ("range.pieces[2].hi", _set("pieces.2.hi", 2 ** 21), "<= 1048576"),
    ("range.pieces[0].hi", _set("pieces.0.hi", 2000), ">= 2048"),
    ("range.pieces[0].step_time_s", _set("pieces.0.step_time_s", "__import__('os')"), "not allowed"),
    ("range.pieces[0].step_time_s", _set("pieces.0.step_time_s", "B*2"), "'B' not allowed"),
    ("range.pieces[1].peak_memory_bytes", _set("pieces.1.peak_memory_bytes", "1" * 5000), "longer than 2000"),
    ("range.pieces[1].peak_memory_bytes", _set("pieces.1.peak_memory_bytes", 5), "expected a string"),
    ("range.pieces[0].infeasible", _set("pieces.0.infeasible", "too big"), "must be \"\" when plan is not null"),
    ("range.pieces[2].infeasible", _set("pieces.2.infeasible", ""), "reason"),
    ("range.pieces[2].step_time_s", _set("pieces.2.step_time_s", "S"), "when plan is null"),
    ("range.pieces[0].plan.range", _set("pieces.0.plan.range", {}), "must not have its own range"),
    ("range.pieces[0].plan.case", _set("pieces.0.plan.case", {}), "must not have its own range"),
    ("range.pieces[0].plan.degrees.tp", _set("pieces.0.plan.degrees.tp", "4"), "expected an integer"),
    ("range.pieces[0].plan", _set("pieces.0.plan", [1]), "expected a JSON object"),
    ("range.pieces[1].plan.seq_len", _set("pieces.1.plan.seq_len", 8192), "!= the piece's lo 16384"),
    ("range.breakpoints", _set("breakpoints", []), "0 breakpoints for 3 pieces"),
    ("range.breakpoints[0].at", _set("breakpoints.0.at", 16383), "must be range.pieces[1].lo 16384"),
    ("range.breakpoints[1].cause", _set("breakpoints.1.cause", "luck"), "unknown value 'luck'"),
    ("range.breakpoints[0].left.feasible", _set("breakpoints.0.left.feasible", 1), "true/false"),
    ("range.breakpoints[0].right.step_time_s", _set("breakpoints.0.right.step_time_s", -1), ">= 0"),
    ("range.breakpoints[0].left", _set("breakpoints.0.left", None), "expected an object"),
    ("range.samples[0].at", _set("samples.0.at", 2047), ">= 2048"),
    ("range.samples[9].at", _set("samples.9.at", 2 ** 21), "<= 1048576"),
    ("range.samples[1].at", _set("samples.1.at", 2048), "strictly increasing"),
    ("range.samples[0].piece", _set("samples.0.piece", 3), "<= 2"),
    ("range.samples[0].piece", _set("samples.0.piece", 1), "covers 16384..262143, not 2048"),
    ("range.samples[0].step_time_s", _set("samples.0.step_time_s", None), "got null"),
    ("range.samples[0].peak_memory_bytes", _set("samples.0.peak_memory_bytes", "1"), "finite number"),
]


@pytest.mark.parametrize("field,mutate,needle", BAD, ids=[f"{f}:{n}" for f, _, n in BAD])
def test_validation_names_the_field(field, mutate, needle):
    d = range_dict()
    mutate(d)
    with pytest.raises(BadInput) as e:
        Plan.from_dict(d)
    assert f"plan field '{field}'" in str(e.value) and needle in str(e.value), str(e.value)


def test_hostile_expression_is_never_evaluated(capsys):
    d = range_dict()
    d["range"]["pieces"][0]["step_time_s"] = "__import__('builtins').print('pwned')"
    with pytest.raises(BadInput, match="not allowed"):
        Plan.from_json(json.dumps(d))
    assert "pwned" not in capsys.readouterr().out


def test_range_accessor_and_point_plan(plan):
    r = plan.range
    assert r["symbol"] == "S" and len(r["pieces"]) == 3
    r["lo"] = 1  # a copy
    assert plan.range["lo"] == 2048
    point = Plan.from_dict(_point("gpt2-small_h100_8_s8192_mem3.json", 8192))
    assert point.range is None
    with pytest.raises(BadInput, match="point plan.*--seq LO..HI"):
        point.piece_for(8192)


def test_piece_for(plan):
    p = plan.piece_for(100000)
    assert p.seq_len == 100000 and p.degrees == plan.range["pieces"][1]["plan"]["degrees"]
    assert p.range is None and "case" not in p.to_dict()
    assert plan.piece_for(16383).degrees["tp"] == 4 and plan.piece_for(2048).seq_len == 2048
    assert plan.piece_for(16384).sequence_parallel["variant"] == "ring"
    with pytest.raises(BadInput, match=r"outside .* 2048\.\.1048576; re-plan with --seq 1024\.\.1048576 covering 1024"):
        plan.piece_for(1024)
    with pytest.raises(BadInput, match=r"--seq 2048\.\.2097152 covering 2097152"):
        plan.piece_for(2 ** 21)
    with pytest.raises(BadInput, match="S=300000: no plan on S = 262144..1048576: no plan fits 80 GiB"):
        plan.piece_for(300000)


def test_piece_for_global_batch():
    d = range_dict()
    r = d["range"]
    r["symbol"] = "B"
    for pc in r["pieces"]:
        if pc["plan"]:
            pc["plan"]["global_batch"] = pc["lo"]
        for k in ("step_time_s", "peak_memory_bytes"):
            pc[k] = pc[k].replace("S", "B")
    p = Plan.from_dict(d).piece_for(20000)
    assert p.global_batch == 20000 and p.seq_len == 16384
    with pytest.raises(BadInput, match="--global-batch 1..1048576 covering 1"):
        Plan.from_dict(d).piece_for(1)


def test_explain_has_range_tables(plan):
    text = plan.explain()
    assert text.index("autopar plan:") < text.index("Range over S = 2048..1048576")
    lines = text.splitlines()
    row0 = next(line for line in lines if line.lstrip().startswith("2048..16383"))
    first, second = (plan.range["pieces"][i]["plan"] for i in (0, 1))  # the golden plans the pieces hold
    assert row0.split()[1:6] == [str(first["degrees"][k]) for k in ("pp", "dp", "sp", "tp", "zero")]
    assert _fmt_secs(first["predicted"]["step_time_s"]) in row0
    assert _fmt_bytes(first["predicted"]["peak_memory_bytes"]) in row0
    row1 = next(line for line in lines if line.lstrip().startswith("16384..262143"))
    assert "ring" in row1 and _fmt_secs(second["predicted"]["step_time_s"]) in row1
    row2 = next(line for line in lines if line.lstrip().startswith("262144..1048576"))
    assert "no plan fits" in row2
    assert f"S = 262144..1048576: {REASON}" in text
    assert "breakpoints" in text
    bp = next(line for line in lines if line.lstrip().startswith("16384 ") and "memory" in line)
    assert "610 ms" in bp and "620 ms" in bp and bp.count("yes") == 2
    bp2 = next(line for line in lines if line.lstrip().startswith("262144 ") and "memory" in line)
    assert "80.09 GiB" in bp2 and bp2.count("no") == 2
    assert "Range over" not in Plan.from_dict(_point("gpt2-small_h100_8_s8192_mem3.json", 8192)).explain()


def test_range_chart_png_svg_and_bad_suffix(plan, tmp_path):
    png, svg = tmp_path / "r.png", tmp_path / "r.svg"
    range_chart(plan, png)
    range_chart(plan, svg)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    head = svg.read_text()[:400]
    assert "<svg" in svg.read_text() and head.startswith("<?xml") and svg.stat().st_size > 5000
    with pytest.raises(BadInput, match=r"\.png or \.svg"):
        range_chart(plan, tmp_path / "r.txt")
    assert not (tmp_path / "r.txt").exists()
    with pytest.raises(BadInput, match="point plan"):
        range_chart(Plan.from_dict(_point("gpt2-small_h100_8_s8192_mem3.json", 8192)), png)


def test_cli_explain_range_chart(plan, tmp_path, capsys):
    path, out = tmp_path / "plan.json", tmp_path / "range.png"
    path.write_text(plan.to_json())
    assert main(["explain", str(path), "--range-chart", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "Range over S = 2048..1048576" in stdout and f"range chart written to {out}" in stdout
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["explain", str(path), "--range-chart", str(tmp_path / "range.txt")]) == 2
    assert ".png or .svg" in capsys.readouterr().err
    bad = copy.deepcopy(json.loads(path.read_text()))
    bad["range"]["breakpoints"][0]["at"] = 5
    path.write_text(json.dumps(bad))
    assert main(["explain", str(path)]) == 2
    assert "range.breakpoints[0].at" in capsys.readouterr().err


@pytest.mark.parametrize("seq,needle", [([16], "a range is [lo, hi]"), ([16, "x"], "case.seq[1]"), ([0, 64], ">= 1")])
def test_recorded_range_case_is_validated(seq, needle):
    d = json.loads((GOLDEN / "gpt-tiny_a100_8.json").read_text())
    d["case"]["seq"] = seq
    with pytest.raises(BadInput, match=re.escape(needle)):
        Plan.from_dict(d)
