"""The autopar CLI, run in-process via planner.cli.main.

Tests marked "needs:" depend on modules written elsewhere (examples.zoo, search.cluster, planner.api).
"""
from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from planner.cli import main, parse_fix
from planner.plan import Plan
from search.errors import BadInput, Infeasible
from test_plan import example_plan_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(Plan.from_dict(example_plan_dict()).to_json())
    return path


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err, err


# ------------------------------------------------------------------ explain / usage

def test_explain_plan_file(plan_file, capsys):
    assert main(["explain", str(plan_file)]) == 0
    out, err = capsys.readouterr()
    assert "gpt2-small" in out and "123.457 ms" in out and "h.*.attn.c_attn" in out
    assert err == ""


def test_explain_malformed_plan_file(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text('{"version": 1, "model": {')
    assert main(["explain", str(path)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error:") and "line 1 column" in err
    _no_traceback(err)


def test_explain_invalid_plan_names_field(tmp_path, capsys):
    d = example_plan_dict()
    d["degrees"]["tp"] = 3
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    assert main(["explain", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "degrees" in err
    _no_traceback(err)


def test_explain_pickle_file(tmp_path, capsys):
    path = tmp_path / "evil.json"
    path.write_bytes(pickle.dumps({"version": 1}))
    assert main(["explain", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:")
    _no_traceback(err)


def test_explain_missing_file(tmp_path, capsys):
    assert main(["explain", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not found" in err
    _no_traceback(err)


def test_unknown_subcommand(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_no_subcommand(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "plan" in capsys.readouterr().out


def test_bad_option_value(capsys):
    assert main(["plan", "gpt2", "--devices", "eight"]) == 2
    assert main(["plan", "gpt2", "--dtype", "fp8"]) == 2
    assert main(["plan", "gpt2", "--format", "yaml"]) == 2


@pytest.mark.parametrize("fix, needle", [
    ("dp", "malformed"), ("dp=", "malformed"), ("=2", "malformed"), ("dp=two", "integer"),
    ("dp=2,foo=3", "unknown key 'foo'"), ("tp=0", "tp=0"), ("zero=4", "zero"),
    ("schedule=magic", "schedule"), ("dp=2,dp=4", "twice"), (",", "empty"),
])
def test_bad_fix_syntax(fix, needle, capsys):
    assert main(["plan", "gpt2", "--fix", fix]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --fix") and needle in err, err
    _no_traceback(err)


def test_parse_fix():
    assert parse_fix("dp=2, tp=4,zero=0,schedule=1f1b,microbatches=8") == {
        "dp": 2, "tp": 4, "zero": 0, "schedule": "1f1b", "microbatches": 8}
    with pytest.raises(BadInput):
        parse_fix("pp=1,xx")
    assert parse_fix("recompute=none,tp=2") == {"recompute": "none", "tp": 2}
    with pytest.raises(BadInput, match="unknown recompute 'half'"):
        parse_fix("recompute=half")


# ------------------------------------------------------------------ plan, with a stand-in planner.api

@pytest.fixture
def fake_api(monkeypatch):
    calls = []
    mod = types.ModuleType("planner.api")

    def make_plan_from_spec(model_spec, **kw):
        calls.append((model_spec, kw))
        if model_spec == "too-big":
            raise Infeasible("needs 900 GiB per device; add devices or --memory-limit")
        if model_spec == "boom":
            raise RuntimeError("kaboom")
        return Plan.from_dict(example_plan_dict())

    mod.make_plan_from_spec = make_plan_from_spec
    monkeypatch.setitem(sys.modules, "planner.api", mod)
    return calls


def test_plan_passes_arguments(fake_api, tmp_path, capsys):
    out_path = tmp_path / "out.json"
    rc = main(["plan", "gpt2-small", "--cluster", "h100-80g", "--devices", "8", "--global-batch", "32",
               "--seq", "1024", "--dtype", "bf16", "--memory-limit", "70", "--fix", "tp=2,schedule=1f1b",
               "--no-fold", "--timings", "--search", "ops", "--out", str(out_path)])
    assert rc == 0
    spec, kw = fake_api[0]
    assert spec == "gpt2-small"
    assert kw == {"cluster": "h100-80g", "devices": 8, "global_batch": 32, "seq_len": 1024, "dtype": "bf16",
                  "memory_limit_gib": 70.0, "fix": {"tp": 2, "schedule": "1f1b"}, "fold": False,
                  "timings": True, "search": "ops"}
    out = capsys.readouterr().out
    assert "predicted" in out and "gpt2-small" in out
    assert Plan.from_json(out_path).to_json() == Plan.from_dict(example_plan_dict()).to_json()


def test_plan_defaults_and_json_format(fake_api, capsys):
    assert main(["plan", "gpt2-small", "--format", "json"]) == 0
    _, kw = fake_api[0]
    assert kw["cluster"] == "a100-80g" and kw["fix"] == {} and kw["fold"] is True and kw["timings"] is False
    assert kw["search"] == "ilp"
    assert kw["devices"] is None and kw["memory_limit_gib"] is None
    out = capsys.readouterr().out
    assert out == Plan.from_dict(example_plan_dict()).to_json()


def test_plan_infeasible_exit_1(fake_api, capsys):
    assert main(["plan", "too-big"]) == 1
    err = capsys.readouterr().err
    assert err == "error: needs 900 GiB per device; add devices or --memory-limit\n"


def test_internal_error_exit_3(fake_api, capsys):
    assert main(["plan", "boom"]) == 3
    err = capsys.readouterr().err
    assert "internal error" in err and "Traceback" in err and "kaboom" in err


def test_python_dash_m_planner(plan_file):
    r = subprocess.run([sys.executable, "-m", "planner", "explain", str(plan_file)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "gpt2-small" in r.stdout
    r = subprocess.run([sys.executable, "-m", "planner", "explain", "/nonexistent.json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:")


# ------------------------------------------------------------------ needs: examples.zoo, search.cluster, planner.api

def test_models_lists_zoo(capsys):
    """needs: examples.zoo.list_models"""
    from examples.zoo import list_models

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    models = list_models()
    assert models
    for m in models:
        name = m["name"] if isinstance(m, dict) else m.name
        assert name in out


def test_clusters_lists_builtins(capsys):
    """needs: search.cluster.builtin_names / get_cluster"""
    from search.cluster import builtin_names

    assert main(["clusters"]) == 0
    out = capsys.readouterr().out
    for name in builtin_names():
        assert name in out
    assert "a100-80g" in out


def test_real_plan_on_zoo_model(tmp_path, capsys):
    """needs: planner.api.make_plan_from_spec, examples.zoo, search.cluster"""
    from examples.zoo import list_models

    names = [m["name"] if isinstance(m, dict) else m.name for m in list_models()]
    name = "gpt-tiny" if "gpt-tiny" in names else names[0]
    out1, out2 = tmp_path / "a.json", tmp_path / "b.json"
    args = ["plan", name, "--devices", "8", "--global-batch", "16", "--seq", "128", "--format", "json"]
    assert main(args + ["--out", str(out1)]) == 0, capsys.readouterr().err
    assert main(args + ["--out", str(out2)]) == 0
    assert out1.read_bytes() == out2.read_bytes()  # deterministic without --timings
    p = Plan.from_json(out1)
    assert p.cluster["devices"] == 8
    assert main(["explain", str(out1)]) == 0


def test_real_plan_infeasible_names_minimum_memory(capsys):
    """needs: planner.api, examples.zoo — no stand-ins: gpt2-small cannot fit 0.1 GiB per device."""
    args = ["plan", "gpt2-small", "--devices", "8", "--format", "json"]
    assert main(args + ["--memory-limit", "0.1"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: no plan fits 0.1 GiB per device"), err
    _no_traceback(err)
    need = float(re.search(r"needs ([0-9.]+) GiB", err).group(1))
    assert need > 0.1
    # the named need is the minimum: 1% more fits, and nothing fitting needs less than 1% below it
    assert main(args + ["--memory-limit", f"{need * 1.01:.4f}"]) == 0, capsys.readouterr().err
    peak = json.loads(capsys.readouterr().out)["predicted"]["peak_memory_bytes"] / 2**30
    assert need * 0.99 <= peak <= need * 1.01


def test_plan_record_case(fake_api, capsys):
    assert main(["plan", "gpt2-small", "--devices", "8", "--seq", "1024", "--memory-limit", "70", "--fix", "tp=2",
                 "--record-case", "--format", "json"]) == 0
    case = json.loads(capsys.readouterr().out)["case"]
    assert case == {"model": "gpt2-small", "cluster": "a100-80g", "devices": 8, "global_batch": None, "seq": 1024,
                    "dtype": "bf16", "memory_limit_gib": 70.0, "fix": {"tp": 2}}


def test_check_and_explain_options_in_help(capsys):
    assert main(["check", "--help"]) == 0
    assert "--update" in capsys.readouterr().out
    assert main(["explain", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--why" in out and "--memory-chart" in out
