"""Recompute (``search.recompute`` analysis, ``passes.recompute`` emission, the planner's choice): exact
loss and gradients vs the plain graph, and measured activation memory (live bytes of the storages aten
ops create) falling where the choice says. Multi-rank equivalence (with dp and tp) is in test_emit."""
from __future__ import annotations

import copy

import pytest
import torch

from examples.zoo import build
from passes.recompute import Recomputed, apply_recompute
from planner.api import load_cluster, make_plan
from planner.capture import capture
from search.errors import BadInput
from search.fold import fold
from search.recompute import attention_cores, block_scopes
from runtime.memory import LiveBytes

SEQ = 256


def _captured(name: str, seq: int = SEQ):
    model, args, kwargs = build(name, batch=2, seq=seq, device="cpu", seed=0)
    return capture(model, args, kwargs, name=name), args


def _run(gm, args) -> tuple[float, dict, int, int]:
    """(loss, gradients, live bytes when the forward returns, peak live bytes of the step)."""
    for p in gm.parameters():
        p.grad = None
    with LiveBytes(exclude=[*gm.parameters(), *gm.buffers()]) as mode:
        loss = gm(*args)
        after_forward = mode.live
        loss.backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    return loss.item(), grads, after_forward, mode.peak


def test_attention_cores_are_the_parameter_free_attention():
    eager = _captured("gpt-tiny-eager", 32)[0].gm
    ops = [[n.rstrip("_0123456789") for n in c] for c in attention_cores(eager)]
    assert ops == [["matmul", "mul", "masked_fill", "softmax", "matmul"]] * 2
    fused = _captured("llama-tiny", 32)[0].gm
    assert [len(c) for c in attention_cores(fused)] == [1, 1]
    mlp = capture(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Softmax(-1)), (torch.randn(2, 8),)).gm
    assert attention_cores(mlp) == []  # a softmax without the two matmuls around it is no attention core


@pytest.mark.parametrize("name", ["gpt-tiny", "gpt-tiny-eager", "llama-tiny", "bert-tiny", "evoformer-tiny",
                                  "dit-tiny"])
def test_recompute_is_exact_and_frees_memory(name):
    mg, args = _captured(name, SEQ if name != "evoformer-tiny" else None)
    ref_loss, ref_grads, ref_fwd, _ = _run(mg.gm, args)
    kept = {}
    for kind in ("full", "selective"):
        gm = apply_recompute(copy.deepcopy(mg.gm), kind, block_scopes(mg, fold(mg)))
        regions = [m for m in gm.modules() if isinstance(m, Recomputed)]
        blocks = sum(r.template is not None for r in fold(mg).regions)
        expected = blocks if kind == "full" else len(attention_cores(mg.gm))
        assert len(regions) == expected, f"{kind}: {len(regions)} recomputed regions, expected {expected}"
        loss, grads, kept[kind], _ = _run(gm, args)
        assert loss == ref_loss
        assert grads.keys() == ref_grads.keys()
        worst = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
        assert worst <= 1e-6, f"{kind}: gradients differ by {worst:.3g}"
    # full keeps each block's input only: most of what the forward leaves alive is gone
    assert kept["full"] < 0.5 * ref_fwd, (kept, ref_fwd)
    assert kept["selective"] <= ref_fwd, (kept, ref_fwd)


def test_selective_frees_the_attention_scores():
    """Eager attention saves its [B, heads, S, S] softmax per layer; selective recompute keeps none."""
    mg, args = _captured("gpt-tiny-eager")
    _, _, none, _ = _run(mg.gm, args)
    _, _, selective, _ = _run(apply_recompute(copy.deepcopy(mg.gm), "selective", []), args)
    heads = build("gpt-tiny-eager", batch=2, seq=SEQ)[0].blocks[0].attn.heads
    scores = len(attention_cores(mg.gm)) * 2 * heads * SEQ * SEQ * 4
    assert none - selective >= scores, f"freed {none - selective} B, the softmax outputs alone are {scores} B"


def test_planner_picks_selective_when_it_is_enough():
    """gpt-tiny-eager, one device, a limit between the selective and the no-recompute peaks: selective
    (recomputes the attention cores) is predicted faster than full (recomputes whole blocks) and wins."""
    model, args, kwargs = build("gpt-tiny-eager", batch=2, seq=SEQ, device="cpu")
    cl = load_cluster("a100-80g", 1)
    fix = {"zero": 0, "microbatches": 1}
    plans = {rc: make_plan(copy.deepcopy(model), (args, kwargs), cl, dtype="fp32", fix={**fix, "recompute": rc})
             for rc in ("none", "selective", "full")}
    peak = {rc: p.predicted["peak_memory_bytes"] for rc, p in plans.items()}
    step = {rc: p.predicted["step_time_s"] for rc, p in plans.items()}
    assert peak["selective"] < peak["none"] and step["none"] < step["selective"] < step["full"], (peak, step)
    plan = make_plan(copy.deepcopy(model), (args, kwargs), cl, dtype="fp32", fix=fix,
                     memory_limit=(peak["selective"] + peak["none"]) / 2)
    assert plan.recompute == "selective", plan.recompute


def test_selective_is_not_offered_for_fused_attention():
    """A fused SDPA saves no s² scores: selective recompute would free only its log-sum-exp."""
    model, args, kwargs = build("gpt-tiny", batch=2, seq=SEQ, device="cpu")
    with pytest.raises(BadInput, match="selective frees nothing"):
        make_plan(model, (args, kwargs), load_cluster("a100-80g", 1), dtype="fp32", fix={"recompute": "selective"})


def test_bad_recompute_requests_are_clear():
    mlp = capture(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)),
                  (torch.randn(2, 8),))
    with pytest.raises(BadInput, match="no attention core"):
        apply_recompute(copy.deepcopy(mlp.gm), "selective", [])
    with pytest.raises(BadInput, match="none of the blocks"):
        apply_recompute(copy.deepcopy(mlp.gm), "full", ["blocks.0"])
    with pytest.raises(BadInput, match="recompute must be one of"):
        apply_recompute(copy.deepcopy(mlp.gm), "some", [])
