"""planner.capture: the annotated graph the search prices (FLOPs, params, scopes, source lines, errors)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx

from planner.capture import capture
from search.errors import CaptureError

B, S = 2, 32  # gpt-tiny: vocab 128, seq 32, hidden 64, layers 2, heads 4, ffn 256
H, HEADS, LAYERS, VOCAB, FFN = 64, 4, 2, 128, 256


def _val(n):
    return n.meta["val"] if isinstance(n, fx.Node) else n


@pytest.fixture(scope="module")
def gpt_tiny():
    from examples.zoo import build

    model, args, kwargs = build("gpt-tiny", batch=B)
    assert next(model.parameters()).device.type == "meta"
    return model, capture(model, args, kwargs, name="gpt-tiny")


def _calls(mg, op=None):
    return [n for n in mg.gm.graph.nodes
            if n.op == "call_function" and (op is None or n.meta["autopar"].op == op)]


def test_every_call_function_node_is_annotated(gpt_tiny):
    _, mg = gpt_tiny
    calls = _calls(mg)
    assert calls
    assert all("autopar" in n.meta for n in calls)
    assert list(mg.nodes()) == calls


def test_linear_flops_are_2mnk_and_backward_twice(gpt_tiny):
    _, mg = gpt_tiny
    linears = _calls(mg, "linear")
    assert len(linears) == 4 * LAYERS + 1  # qkv, proj, fc, proj per block + lm head
    for n in linears:
        x, w = _val(n.args[0]), _val(n.args[1])
        m = math.prod(x.shape[:-1])
        k = x.shape[-1]
        nout = w.shape[0]
        info = n.meta["autopar"]
        assert info.fwd_flops == 2 * m * nout * k, n.name
        assert info.bwd_flops == 2 * info.fwd_flops, n.name
    # known values from the config, independent of the graph
    qkv = next(n for n in linears if n.meta["autopar"].scope == "blocks.0.attn.qkv")
    assert qkv.meta["autopar"].fwd_flops == 2 * (B * S) * (3 * H) * H
    assert qkv.meta["autopar"].shape == (B, S, 3 * H)


def test_sdpa_flops(gpt_tiny):
    _, mg = gpt_tiny
    sdpa = _calls(mg, "scaled_dot_product_attention")
    assert len(sdpa) == LAYERS
    d = H // HEADS
    for n in sdpa:
        b, h, s, dd = _val(n.args[0]).shape
        assert (b, h, s, dd) == (B, HEADS, S, d)
        assert n.meta["autopar"].fwd_flops == 4 * b * h * s * s * dd
        assert n.meta["autopar"].bwd_flops > n.meta["autopar"].fwd_flops


def test_params_match_named_parameters(gpt_tiny):
    model, mg = gpt_tiny
    names = [k for k, _ in model.named_parameters()]
    assert list(mg.param_shapes) == names
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
    assert mg.param_shapes == shapes
    assert mg.num_params == sum(p.numel() for p in model.parameters())
    # every parameter a node reads is named as named_parameters() names it (tied lm_head -> wte.weight)
    read = {fqn for n in mg.nodes() for fqn in n.meta["autopar"].params}
    assert read <= set(names)
    assert read == set(names)  # every parameter is read by some node
    qkv = next(n for n in _calls(mg, "linear") if n.meta["autopar"].scope == "blocks.1.attn.qkv")
    assert qkv.meta["autopar"].params == ("blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias")


def test_scope_and_source_for_linears(gpt_tiny):
    _, mg = gpt_tiny
    scopes = [n.meta["autopar"].scope for n in _calls(mg, "linear")]
    assert scopes == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj",
                      "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc", "blocks.1.mlp.proj",
                      "lm_head"]
    for n in _calls(mg, "linear"):
        src = n.meta["autopar"].source
        # the user's line (examples/gpt.py), not torch/nn/modules/linear.py
        assert src.startswith("gpt.py:") and src.split(":")[1].isdigit(), src


def test_summary_fields(gpt_tiny):
    _, mg = gpt_tiny
    assert mg.layers == LAYERS
    assert (mg.batch_size, mg.seq_len) == (B, S)
    assert mg.name == "gpt-tiny"
    assert all(v == "float32" for v in mg.param_dtypes.values())


@pytest.mark.parametrize("spec, prefix", [
    ("hf:gpt2:n_layer=2,n_embd=64,n_head=4,vocab_size=128,n_positions=64", "transformer.h."),
    ("hf:llama:num_hidden_layers=2,hidden_size=64,num_attention_heads=4,num_key_value_heads=2,"
     "intermediate_size=128,vocab_size=128,max_position_embeddings=64", "model.layers."),
])
def test_hf_small_configs_capture(spec, prefix):
    from planner.models import resolve_model

    lm = resolve_model(spec, batch=2, seq=16, device="meta")
    mg = capture(lm.model, lm.args, lm.kwargs, name=lm.name)
    assert mg.layers == 2
    assert mg.num_params == sum(p.numel() for p in lm.model.parameters())
    assert set(mg.param_shapes) == {k for k, _ in lm.model.named_parameters()}
    assert (mg.batch_size, mg.seq_len) == (2, 16)
    matmuls = [n for n in mg.nodes() if n.meta["autopar"].op in ("linear", "addmm", "mm")]
    assert matmuls and all(n.meta["autopar"].fwd_flops > 0 for n in matmuls)
    assert any(n.meta["autopar"].scope.startswith(prefix) for n in matmuls)
    assert all("autopar" in n.meta for n in mg.gm.graph.nodes if n.op == "call_function")


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:  # BRANCH-LINE
            return y * 2
        return y


def test_untraceable_model_gives_actionable_capture_error():
    import inspect

    lines, start = inspect.getsourcelines(_DataDependent.forward)
    lineno = start + next(i for i, l in enumerate(lines) if "BRANCH-LINE" in l)
    with pytest.raises(CaptureError) as ei:
        capture(_DataDependent(), (torch.randn(2, 4),))
    msg = str(ei.value)
    assert f"test_capture.py:{lineno}" in msg
    assert "torch.where" in msg and "torch.cond" in msg
    assert "\n" not in msg and "Traceback" not in msg and len(msg) < 1000
    assert ei.value.__cause__ is None and ei.value.__suppress_context__


def test_device_mismatch_capture_error_says_so():
    with pytest.raises(CaptureError) as ei:
        capture(torch.nn.Linear(4, 4), (torch.empty(2, 4, device="meta"),))
    msg = str(ei.value)
    assert "different devices" in msg and "torch.where" not in msg
