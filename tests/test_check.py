"""Golden-plan regression (`autopar check`), determinism across processes, `explain --why` and charts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from planner.check import GOLDEN_DIR, load_golden, make_case, plan_case
from planner.cli import main
from planner.plan import Plan
from search.cluster import get_cluster
from test_plan import example_plan_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = GOLDEN_DIR / "gpt-tiny_a100_8.json"


@pytest.fixture
def tiny_dir(tmp_path):
    """A golden directory holding one fast case, planned by the search as it is now."""
    d = tmp_path / "golden"
    d.mkdir()
    plan_case(Plan.from_json(TINY).to_dict()["case"]).save(d / TINY.name)
    return d


# ------------------------------------------------------------------ the golden matrix (CI)

def test_golden_plans_unchanged(capsys):
    """Re-plans every golden case; on purpose-made search changes run `autopar check --update` and commit."""
    rc = main(["check"])
    out = capsys.readouterr().out
    assert rc == 0, out


def test_golden_matrix_covers_every_strategy_family():
    plans = [p.to_dict() for _, p in load_golden(GOLDEN_DIR)]
    seen = set()
    for d in plans:
        g = d["degrees"]
        seen |= {f"zero={g['zero']}", f"recompute={d['recompute']}", f"cluster={d['cluster']['name']}"}
        seen |= {k for k in ("dp", "tp", "pp") if g[k] > 1}
        seen |= {"microbatches"} if d["pipeline"]["microbatches"] > 1 else set()
        seen |= {f"schedule={d['pipeline']['schedule']}"} if g["pp"] > 1 else set()
        seen |= {f"attention={d['sequence_parallel']['variant']}"} if g["sp"] > 1 else set()
        seen |= {"megatron_sp"} if d["megatron_sp"] else set()
        seen |= {"chunking"} if d["chunking"] else set()
        seen |= {"range"} if d.get("range") else set()
    want = {"range", "dp", "tp", "pp", "microbatches", "zero=0", "zero=1", "zero=2", "zero=3", "recompute=none",
            "recompute=full", "recompute=selective", "cluster=a100-80g", "cluster=h100-80g", "attention=ring",
            "attention=ring2d", "attention=usp", "megatron_sp", "chunking"}
    assert want <= seen, f"no golden case chooses {sorted(want - seen)}; add one with " \
                         "`autopar plan ... --record-case --out tests/golden/NAME.json`"
    assert len({d["seq_len"] for d in plans}) >= 3 and len({d["cluster"]["devices"] for d in plans}) >= 3


# ------------------------------------------------------------------ determinism

def test_plan_json_identical_across_processes_and_hash_seeds(tmp_path):
    """The CLI in two processes with different hash seeds (run side by side) writes the same bytes."""
    procs = [subprocess.Popen([sys.executable, "-m", "planner", "plan", "llama-tiny", "--devices", "8", "--seq", "64",
                               "--global-batch", "16", "--record-case", "--format", "json"], cwd=ROOT,
                              env={**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for seed in ("0", "4242")]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        outs.append(out)
    assert outs[0] == outs[1]
    reordered = json.loads(outs[0], object_pairs_hook=lambda kv: dict(reversed(kv)))
    assert Plan.from_dict(reordered).to_json().encode() == outs[0]


# ------------------------------------------------------------------ a mismatch names the decision that moved

def test_slower_links_in_a_cluster_file_move_the_plan(tmp_path, capsys):
    cluster = tmp_path / "cluster.json"
    base = {**get_cluster("a100-80g").to_dict(), "name": "test-cluster"}
    cluster.write_text(json.dumps(base))
    (tmp_path / "golden").mkdir()
    golden = plan_case(make_case("gpt-tiny", cluster=str(cluster), devices=8))
    golden.save(tmp_path / "golden" / "case.json")
    slow = {**base, "intra_bandwidth": base["intra_bandwidth"] * 1e-4,
            "inter_bandwidth": base["inter_bandwidth"] * 1e-4}
    cluster.write_text(json.dumps(slow))
    moved = plan_case(golden.to_dict()["case"])
    changed = [k for k in ("dp", "tp", "pp") if golden.degrees[k] != moved.degrees[k]]
    assert changed, "precondition: 10^4 slower links must change the degrees"

    assert main(["check", str(tmp_path / "golden")]) == 1
    out = capsys.readouterr().out
    assert "CHANGED  case.json" in out
    for k in changed:
        assert f"degrees.{k}: {golden.degrees[k]} -> {moved.degrees[k]}" in out, out
    assert "predicted step time:" in out and "%)" in out
    assert "1 failed" in out


def test_changed_golden_value_is_reported_then_update_restores_it(tiny_dir, capsys):
    path = tiny_dir / TINY.name
    fresh = path.read_bytes()
    d = json.loads(fresh)
    d["recompute"] = "full" if d["recompute"] == "none" else "none"
    d["predicted"]["step_time_s"] *= 2
    path.write_text(json.dumps(d))
    assert main(["check", str(tiny_dir)]) == 1
    out = capsys.readouterr().out
    assert "recompute: " in out and "(-50.0%)" in out, out

    assert main(["check", str(tiny_dir), "--update"]) == 0
    assert "updated" in capsys.readouterr().out
    assert path.read_bytes() == fresh
    assert main(["check", str(tiny_dir)]) == 0


def test_update_replans_a_golden_whose_format_is_stale(tiny_dir, capsys):
    """A golden written before the plan format grew a field: check says so (exit 2), --update re-plans
    it from its case."""
    path = tiny_dir / TINY.name
    fresh = path.read_bytes()
    d = json.loads(fresh)
    del d["templates"]
    path.write_text(json.dumps(d))
    assert main(["check", str(tiny_dir)]) == 2
    assert "templates" in capsys.readouterr().err
    assert main(["check", str(tiny_dir), "--update"]) == 0
    assert "updated" in capsys.readouterr().out and path.read_bytes() == fresh


# ------------------------------------------------------------------ bad golden files: exit 2, named

@pytest.mark.parametrize("content, needle", [
    ('{"version": 1, "model": ', "invalid JSON at line"),
    (None, "degrees.tp"),  # a valid JSON plan with a bad field
    ("no-case", "no 'case'"),
])
def test_corrupted_golden_file_exit_2(tiny_dir, content, needle, capsys):
    path = tiny_dir / "bad.json"
    d = json.loads((tiny_dir / TINY.name).read_text())
    if content is None:
        d["degrees"]["tp"] = "two"
        content = json.dumps(d)
    elif content == "no-case":
        del d["case"]
        content = json.dumps(d)
    path.write_text(content)
    assert main(["check", str(tiny_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: golden ") and str(path) in captured.err, captured.err
    assert needle in captured.err, captured.err
    assert "Traceback" not in captured.err and captured.out == ""  # nothing re-planned


def test_missing_or_empty_golden_dir_exit_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["check", str(tmp_path)]) == 2
    assert "no *.json plans" in capsys.readouterr().err


# ------------------------------------------------------------------ explain --why / --memory-chart

def test_explain_why_replans_with_the_pin(tiny_dir, capsys):
    path = tiny_dir / TINY.name
    chosen = Plan.from_json(path)
    tp = 1 if chosen.degrees["tp"] != 1 else 2
    assert main(["explain", str(path), "--why", f"tp={tp}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"chosen -> tp={tp}:")
    assert f'case.fix: {{}} -> {{"tp": {tp}}}' in out
    assert f"degrees.tp: {chosen.degrees['tp']} -> {tp}" in out
    assert "predicted step time:" in out and f"tp={tp} loses" in out


def test_explain_why_needs_a_recorded_case(tmp_path, capsys):
    path = tmp_path / "plan.json"
    Plan.from_dict(example_plan_dict()).save(path)
    assert main(["explain", str(path), "--why", "tp=4"]) == 2
    assert "records no 'case'" in capsys.readouterr().err


@pytest.mark.parametrize("with_case", [False, True])
def test_memory_chart_is_a_png(tiny_dir, tmp_path, with_case, capsys):
    path = tmp_path / "plan.json"
    if with_case:
        shutil.copy(tiny_dir / TINY.name, path)
    else:
        Plan.from_dict(example_plan_dict()).save(path)
    png = tmp_path / "mem.png"
    assert main(["explain", str(path), "--memory-chart", str(png)]) == 0
    assert f"memory chart written to {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
