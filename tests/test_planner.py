"""The planner end to end: Megatron style choice (search.placement), the dp × tp × ZeRO enumerator
(search.baseline via planner.api.make_plan_from_spec), its errors and the CLI's exit codes.

No timing assertions here: speed targets belong to bench/.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from planner.api import make_plan_from_spec
from planner.capture import capture
from planner.cli import main
from search.errors import BadInput, Infeasible
from search.placement import choose_styles

ROOT = Path(__file__).resolve().parents[1]
AUTOPAR = ROOT / ".venv" / "bin" / "autopar"


def _zoo_graph(name, batch=2):
    from examples.zoo import build

    model, args, kwargs = build(name, batch=batch)
    return capture(model, args, kwargs, name=name)


@pytest.fixture(scope="module")
def gpt_tiny():
    return _zoo_graph("gpt-tiny")


@pytest.fixture(scope="module")
def llama_tiny():
    return _zoo_graph("llama-tiny")


# ------------------------------------------------------------------ style choice (search.placement)

def test_choose_styles_gpt_tiny(gpt_tiny):
    styles = choose_styles(gpt_tiny.gm, 2)
    expected = {}
    for i in range(2):
        expected[f"blocks.{i}.attn.qkv"] = ("colwise", 3)
        expected[f"blocks.{i}.attn.proj"] = ("rowwise", 1)
        expected[f"blocks.{i}.mlp.fc"] = ("colwise", 1)
        expected[f"blocks.{i}.mlp.proj"] = ("rowwise", 1)
    assert styles == expected
    assert "lm_head" not in styles  # the tied LM head stays replicated
    assert choose_styles(gpt_tiny.gm, 1) == {}


def test_choose_styles_llama_tiny(llama_tiny):
    styles = choose_styles(llama_tiny.gm, 2)
    expected = {}
    for i in range(2):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            expected[f"layers.{i}.{m}"] = ("colwise", 1)
        for m in ("self_attn.o_proj", "mlp.down_proj"):
            expected[f"layers.{i}.{m}"] = ("rowwise", 1)
    assert styles == expected
    assert "lm_head" not in styles


def test_heads_not_divisible_by_tp_leave_attention_replicated():
    from examples.gpt import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab=128, seq=32, hidden=48, layers=2, heads=3))
    ids = torch.empty(2, 32, dtype=torch.long, device="meta")
    mg = capture(model, (ids, ids), name="gpt-3heads")
    styles = choose_styles(mg.gm, 2)
    assert not any(".attn." in m for m in styles), styles
    # the MLP (192 features) still splits two ways
    assert styles == {f"blocks.{i}.mlp.{m}": (s, 1) for i in range(2)
                      for m, s in (("fc", "colwise"), ("proj", "rowwise"))}


class _RegularisedMLP(torch.nn.Module):
    """An MLP whose first weight is also read by an L2 penalty: that weight must stay whole."""

    def __init__(self, tied: bool):
        super().__init__()
        self.tied = tied
        self.fc = torch.nn.Linear(16, 64)
        self.proj = torch.nn.Linear(64, 16)

    def forward(self, x):
        y = self.proj(torch.relu(self.fc(x))).sum()
        return y + self.fc.weight.pow(2).sum() if self.tied else y


@pytest.mark.parametrize("tied", [False, True])
def test_weight_read_outside_its_linear_is_not_sharded(tied):
    mg = capture(_RegularisedMLP(tied), (torch.randn(4, 16),), name="mlp")
    styles = choose_styles(mg.gm, 2)
    if tied:
        assert styles == {}
    else:
        assert styles == {"fc": ("colwise", 1), "proj": ("rowwise", 1)}


def test_propagate_refuses_a_shared_sharded_weight():
    from search.placement import Unsupported, propagate

    mg = capture(_RegularisedMLP(True), (torch.randn(4, 16),), name="mlp")
    with pytest.raises(Unsupported, match="fc.weight is also read by"):
        propagate(mg.gm, {"fc": ("colwise", 1), "proj": ("rowwise", 1)}, 2)


# ------------------------------------------------------------------ the enumerator

def test_plan_gpt_tiny_8_a100_is_valid():
    plan = make_plan_from_spec("gpt-tiny", cluster="a100-80g", devices=8)
    d = json.loads(plan.to_json())
    deg = d["degrees"]
    assert deg["pp"] * deg["dp"] * deg["tp"] == 8 and deg["sp"] == 1
    assert d["mesh"]["shape"] == ([deg["pp"]] if deg["pp"] > 1 else []) + [deg["dp"], deg["tp"]]
    assert len(d["pipeline"]["stages"]) == (deg["pp"] if deg["pp"] > 1 else 0)
    assert d["cluster"] == {"name": "a100-80g", "devices": 8, "devices_per_node": 8}
    assert d["model"]["name"] == "gpt-tiny" and d["model"]["layers"] == 2
    assert d["global_batch"] == 8 and d["seq_len"] == 32
    mb = d["pipeline"]
    assert mb["microbatches"] * mb["microbatch_size"] * deg["dp"] == d["global_batch"]
    p = d["predicted"]
    assert p["step_time_s"] > 0 and 0 < p["peak_memory_bytes"] <= 80 * 2**30
    assert d["search"]["seconds"] is None  # only --timings records wall clock
    # round trip through the Plan validator
    from planner.plan import Plan

    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()


def test_fix_dp_not_dividing_devices_lists_valid_degrees():
    with pytest.raises(BadInput) as ei:
        make_plan_from_spec("gpt-tiny", cluster="a100-80g", devices=8, fix={"dp": 3})
    msg = str(ei.value)
    assert "dp=3" in msg and "[1, 2, 4, 8]" in msg


def test_unknown_cluster_lists_builtins():
    with pytest.raises(BadInput) as ei:
        make_plan_from_spec("gpt-tiny", cluster="no-such-cluster", devices=8)
    msg = str(ei.value)
    assert "no-such-cluster" in msg and "a100-80g" in msg and "h100-80g" in msg


def test_unknown_model():
    with pytest.raises(BadInput) as ei:
        make_plan_from_spec("gpt-tinyy", cluster="a100-80g", devices=8)
    msg = str(ei.value)
    assert "gpt-tinyy" in msg and "gpt-tiny" in msg


def test_tiny_memory_limit_is_infeasible_with_minimum_needed():
    with pytest.raises(Infeasible) as ei:
        make_plan_from_spec("gpt-tiny", cluster="a100-80g", devices=8, memory_limit_gib=1e-4)
    msg = str(ei.value)
    assert ei.value.exit_code == 1
    # "... needs 0.00123 GiB": a positive number, larger than the limit it failed
    import re

    m = re.search(r"needs ([0-9.e+-]+) GiB", msg)
    assert m, msg
    assert float(m.group(1)) > 1e-4


def test_tp_all_reduce_bytes_match_hand_computation():
    """gpt-tiny (h=64, s=32, 2 layers), bf16, 2 devices, global batch 2, ZeRO 0.

    tp=2, dp=1: per layer Megatron all-reduces 4 tensors of b·s·h elements (ln_1 output into qkv and
    ln_2 output into fc in backward; proj and mlp.proj outputs in forward), each 2(p-1)/p of its bytes
    (with Megatron-SP: as all-gather + reduce-scatter pairs, the same volume). Megatron-SP adds two
    all-gathers of b·s·h ((p-1)/p: where the embedding enters split, before the LM head) and the
    all-reduce of the layer norms' gradients (5 norms × (weight + bias) × h, bf16).
    tp=1, dp=2: the gradient all-reduce, 2(p-1)/p of params × 2 bytes, plus the fp32 loss all-reduce
    (4 bytes) that reports the dp-mean loss.
    """
    b, s, h, layers, bf16 = 2, 32, 64, 2, 2
    tp2 = json.loads(make_plan_from_spec("gpt-tiny", cluster="a100-80g", devices=2, global_batch=b,
                                         fix={"tp": 2, "zero": 0}).to_json())
    assert tp2["degrees"]["tp"] == 2 and tp2["degrees"]["dp"] == 1
    p = 2
    assert tp2["megatron_sp"]
    expected_tp = 4 * layers * (2 * (p - 1) / p) * (b * s * h * bf16)
    expected_msp = 2 * (p - 1) / p * (b * s * h * bf16) + 2 * (p - 1) / p * (5 * 2 * h * bf16)
    assert tp2["predicted"]["comm_bytes"] == int(expected_tp + expected_msp) == 65536 + 9472

    tp1 = json.loads(make_plan_from_spec("gpt-tiny", cluster="a100-80g", devices=2, global_batch=b,
                                         fix={"tp": 1, "zero": 0}).to_json())
    assert tp1["degrees"]["tp"] == 1 and tp1["degrees"]["dp"] == 2
    params = tp1["model"]["params"]
    assert tp1["predicted"]["comm_bytes"] == int(2 * (p - 1) / p * params * bf16 + 2 * (p - 1) / p * 4)
    assert tp1["predicted"]["breakdown"]["time_tp_all_reduce_s"] == 0


def test_gpt3_175b_on_1024_a100():
    """The golden plan of this case (tests/test_check.py re-plans it and fails on any change) is what an
    expert would accept: tensor parallelism inside a node, dp × tp over every device, fits 80 GiB."""
    d = json.loads((ROOT / "tests" / "golden" / "gpt3-175b_a100_1024.json").read_text())
    assert d["case"] == {"model": "gpt3-175b", "cluster": "a100-80g", "devices": 1024, "global_batch": 1536,
                         "seq": 2048, "dtype": "bf16", "memory_limit_gib": None, "fix": {}}
    assert d["degrees"]["tp"] > 1
    assert d["degrees"]["dp"] * d["degrees"]["tp"] == 1024
    assert d["global_batch"] == 1536 and d["seq_len"] == 2048
    assert d["predicted"]["peak_memory_bytes"] <= 80 * 2**30
    assert d["tensor_parallel"]


# ------------------------------------------------------------------ CLI

def _env(seed: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PYTHONHASHSEED"] = seed
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_cli_exit_codes(capsys):
    assert main(["plan", "gpt-tiny", "--devices", "2", "--format", "json"]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out)["cluster"]["devices"] == 2

    assert main(["plan", "gpt-tiny", "--devices", "8", "--memory-limit", "0.0001"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "GiB" in err and "Traceback" not in err

    for argv in (["plan", "gpt-tiny", "--devices", "8", "--fix", "dp=3"],
                 ["plan", "gpt-tiny", "--cluster", "no-such-cluster"],
                 ["plan", "no-such-model"],
                 ["plan", "gpt-tiny", "--devices", "8", "--fix", "pp=3"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err, (argv, err)


def test_cli_untraceable_factory_is_bad_input(tmp_path, capsys):
    src = tmp_path / "branchy.py"
    src.write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(8, 8)\n"
        "    def forward(self, x):\n"
        "        y = self.lin(x)\n"
        "        if y.sum() > 0:\n"
        "            return y.mean()\n"
        "        return y.sum()\n"
        "def make(batch=2, seq=None):\n"
        "    return M(), (torch.randn(batch, 8),)\n")
    assert main(["plan", f"{src}:make", "--devices", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert "branchy.py:8" in err and "torch.cond" in err
