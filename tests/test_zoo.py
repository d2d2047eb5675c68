"""Model zoo and model loading: published sizes, meta build speed, tiny models train and export."""
from __future__ import annotations

import math
import time

import pytest
import torch

from examples.zoo import MODELS, build, list_models
from planner.models import LoadedModel, resolve_model
from search.errors import BadInput

TINY = ["gpt-tiny", "llama-tiny", "bert-tiny"]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def design_gpt_params(cfg) -> float:
    """DESIGN §4: 12 l h² (1 + 13/(12h) + (V + s)/(12 l h))."""
    l, h, V, s = cfg.layers, cfg.hidden, cfg.vocab, cfg.seq
    return 12 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))


@pytest.mark.parametrize("name, published", [("gpt2-small", 124e6), ("gpt3-175b", 175e9), ("llama2-7b", 6.74e9)])
def test_param_count_matches_published(name, published):
    model, _, _ = build(name)
    assert all(p.device.type == "meta" for p in model.parameters())
    n = n_params(model)
    assert abs(n - published) / published < 0.01, (name, n)
    if MODELS[name].family == "gpt":
        assert abs(n - design_gpt_params(MODELS[name].config)) / n < 0.01


def test_gpt3_175b_builds_fast_on_meta():
    t = time.perf_counter()
    model, args, kwargs = build("gpt3-175b", batch=1)
    assert time.perf_counter() - t < 10
    assert len(model.blocks) == 96 and tuple(args[0].shape) == (1, 2048)
    assert args[0].device.type == "meta" and args[0].dtype == torch.int64


def test_list_models_sorted_and_complete():
    names = [m.name for m in list_models()]
    assert names == sorted(names)
    for want in ["gpt2-small", "gpt2-xl", "gpt3-6.7b", "gpt3-175b", "llama2-7b", "llama2-70b", "bert-large", *TINY]:
        assert want in names
    assert {m.family for m in list_models()} == {"gpt", "llama", "bert", "dit", "evoformer"}


def test_build_unknown_name_lists_valid():
    with pytest.raises(BadInput, match="gpt2-small"):
        build("gpt5")


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward_cpu(name):
    model, args, kwargs = build(name, batch=2, device="cpu", seed=0)
    assert all(a.dtype == torch.int64 and a.device.type == "cpu" for a in args)
    loss = model(*args, **kwargs)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    assert abs(loss.item() - math.log(MODELS[name].config.vocab)) < 1.0  # ~uniform at init
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    logits = model(args[0])
    assert tuple(logits.shape) == (2, MODELS[name].config.seq, MODELS[name].config.vocab)


def test_build_is_deterministic():
    m1, a1, _ = build("gpt-tiny", device="cpu", seed=3)
    m2, a2, _ = build("gpt-tiny", device="cpu", seed=3)
    m3, a3, _ = build("gpt-tiny", device="cpu", seed=4)
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1], a2[1]) and not torch.equal(a1[0], a3[0])
    for (k, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(p1, p2), k
    assert not torch.equal(m1.wte.weight, m3.wte.weight)
    assert m1.lm_head.weight is m1.wte.weight  # tied


def test_build_seq_override():
    model, args, _ = build("gpt-tiny", batch=3, seq=16)
    assert tuple(args[0].shape) == (3, 16)
    model, args, _ = build("gpt-tiny", batch=1, seq=64, device="cpu")  # longer than preset: grows wpe
    assert model.wpe.weight.shape[0] == 64 and math.isfinite(model(*args).item())


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_tiny_export_non_strict(name, device):
    model, args, kwargs = build(name, batch=2, device=device)
    ep = torch.export.export(model, args, kwargs, strict=False)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("scaled_dot_product" in t or "attention" in t for t in targets), sorted(targets)


def test_gpt_uses_fused_qkv_and_llama_gqa():
    gpt, _, _ = build("gpt-tiny")
    assert tuple(gpt.blocks[0].attn.qkv.weight.shape) == (3 * 64, 64)
    llama, _, _ = build("llama-tiny")
    attn = llama.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (64, 64) and tuple(attn.k_proj.weight.shape) == (32, 64)
    assert attn.q_proj.bias is None and llama.lm_head.weight is not llama.embed_tokens.weight


# --- planner.models.resolve_model ---------------------------------------------------------------

def test_resolve_zoo_name():
    lm = resolve_model("llama-tiny", batch=4, seq=8)
    assert isinstance(lm, LoadedModel) and lm.name == "llama-tiny"
    assert tuple(lm.args[0].shape) == (4, 8) and lm.kwargs == {}


FACTORY_FILE = '''
import torch
from torch import nn

def make(batch=2, seq=None):
    return nn.Linear(4, 4), (torch.zeros(batch, seq or 3, 4),)

def make3():
    return nn.Linear(4, 4), (), {"input": torch.zeros(1, 4)}

def bad_return():
    return 42

def not_a_module():
    return "model", (torch.zeros(1),)

def boom(batch=2):
    raise RuntimeError("kaboom")
'''


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(FACTORY_FILE)
    return path


def test_resolve_factory(factory_file):
    lm = resolve_model(f"{factory_file}:make", batch=5, seq=7)
    assert isinstance(lm.model, torch.nn.Linear) and tuple(lm.args[0].shape) == (5, 7, 4)
    lm = resolve_model(f"{factory_file}:make3")
    assert lm.args == () and set(lm.kwargs) == {"input"}


@pytest.mark.parametrize("suffix, needle", [
    (":missing", "no callable 'missing'"),
    (":bad_return", "expected (model, example_inputs)"),
    (":not_a_module", "nn.Module"),
    (":boom", "kaboom"),
    ("", "factory"),
])
def test_resolve_factory_errors(factory_file, suffix, needle):
    with pytest.raises(BadInput) as err:
        resolve_model(f"{factory_file}{suffix}")
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("spec, needles", [
    ("gpt5", ["unknown model", "gpt2-small", "hf:"]),
    ("gpt2small", ["did you mean gpt2-small"]),
    ("/no/such/file.py:make", ["not found"]),
    ("hf:notamodel", ["unknown Hugging Face model_type"]),
    ("hf:gpt22", ["did you mean gpt2"]),
    ("hf:gpt2:n_layer", ["malformed", "key=value"]),
    ("hf:gpt2:nlayer=2", ["nlayer", "did you mean n_layer"]),
    ("hf:", ["no model type"]),
])
def test_resolve_errors(spec, needles):
    with pytest.raises(BadInput) as err:
        resolve_model(spec)
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_resolve_hf_gpt2_small_config():
    lm = resolve_model("hf:gpt2:n_layer=2,n_embd=64,n_head=4,vocab_size=128", batch=2, seq=16, device="cpu")
    assert lm.name == "hf:gpt2" and lm.args == ()
    assert tuple(lm.kwargs["input_ids"].shape) == (2, 16) and lm.kwargs["input_ids"].dtype == torch.int64
    assert lm.model.config.n_layer == 2 and lm.model.config.use_cache is False
    out = lm.model(**lm.kwargs)
    assert math.isfinite(out.loss.item())
    meta = resolve_model("hf:gpt2:n_layer=2,n_embd=64,n_head=4,vocab_size=128")
    assert tuple(meta.kwargs["input_ids"].shape) == (2, 128)
    assert all(p.device.type == "meta" for p in meta.model.parameters())
