"""DSP (passes.dsp, runtime.dsp) on the video DiT: the T-sharded model with all-to-all switches around
temporal blocks matches one process (loss and every gradient, fp32), and the all-to-all bytes match
the formula in passes/dsp.py. One gloo launch per world size (2 and 4 ranks) runs every check.
"""
from __future__ import annotations

import copy

import pytest
import torch

from examples.dit import DiT, DiTConfig, example_inputs
from examples.zoo import MODELS, build
from passes.dsp import apply_dsp, shard_inputs
from planner.capture import capture
from search.errors import BadInput
from tests.distributed import launch_once

TOL = 1e-5
BATCH = 2


def _dsp_checks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from passes.dsp import DSPModule
    from runtime.collectives import comm_stats

    group = dist.group.WORLD
    out = {"switch": _switch_check(group, rank, world)}

    model, args, _ = build("dit-tiny", batch=BATCH, device="cpu", seed=0)
    ref = copy.deepcopy(model)
    ref_loss = ref(*args)
    ref_loss.backward()
    dsp = DSPModule(apply_dsp(capture(model, args).gm, group, world, rank), group)
    comm_stats.reset()
    loss = dsp(*shard_inputs(args, world, rank))
    loss.backward()
    out["comm"] = comm_stats.snapshot()
    out["loss"] = abs(loss.item() - ref_loss.item())
    ref_params = dict(ref.named_parameters())
    grads = {name: (p.grad - ref_params[name].grad).abs().max().item()
             for name, p in dsp.gm.named_parameters()}
    out["grads"] = grads
    out["missing"] = sorted(set(ref_params) - set(grads))
    out["param_bytes"] = sum(p.numel() * p.element_size() for p in ref.parameters())
    return out


def _switch_check(group, rank: int, world: int) -> dict:
    """[B, T/P, N, H] -> [B, T, N/P, H] is the matching slice of the full tensor; backward is the inverse."""
    from runtime.dsp import switch_shard

    full = torch.arange(2 * 4 * world * 2 * world * 3, dtype=torch.float32).view(2, 4 * world, 2 * world, 3)
    x = full.chunk(world, dim=1)[rank].clone().requires_grad_()
    y = switch_shard(x, group, 1, 2)
    weight = full.chunk(world, dim=2)[rank] + 1.0  # d(sum(y * w))/dx = w at x's positions
    (y * weight).sum().backward()
    return {"fwd": torch.equal(y, full.chunk(world, dim=2)[rank]),
            "bwd": torch.equal(x.grad, (full + 1.0).chunk(world, dim=1)[rank])}


_RESULTS: dict[int, object] = {}


def _results(world: int) -> list:
    return launch_once(_RESULTS, world, _dsp_checks, timeout=120, label="dsp")


def expected_all_to_all_bytes(cfg: DiTConfig, batch: int, world: int, elem: int = 4) -> int:
    """passes/dsp.py: 4 switches (2 forward, 2 backward) per temporal block, each (P-1)/P of the
    [B, T/P, N, hidden] activation a rank holds."""
    local = batch * cfg.frames * cfg.tokens * cfg.hidden * elem // world
    return 4 * cfg.temporal_blocks * (world - 1) * local // world


@pytest.mark.parametrize("world", [2, 4])
def test_switch_shard_exact(world):
    for rank, r in enumerate(_results(world)):
        assert r["switch"] == {"fwd": True, "bwd": True}, f"rank {rank}/{world}: {r['switch']}"


@pytest.mark.parametrize("world", [2, 4])
def test_dsp_matches_single_process(world):
    for rank, r in enumerate(_results(world)):
        where = f"rank {rank}/{world}"
        assert not r["missing"], f"{where}: parameters without a gradient comparison: {r['missing']}"
        assert r["loss"] <= TOL, f"{where}: loss differs by {r['loss']:.3g}"
        worst = max(r["grads"], key=r["grads"].get)
        assert r["grads"][worst] <= TOL, f"{where}: grad of {worst} differs by {r['grads'][worst]:.3g}"


@pytest.mark.parametrize("world", [2, 4])
def test_dsp_comm_bytes_match_formula(world):
    cfg = MODELS["dit-tiny"].config
    for rank, r in enumerate(_results(world)):
        comm = r["comm"]
        assert comm["all_to_all"] == {"calls": 4 * cfg.temporal_blocks,
                                      "bytes": expected_all_to_all_bytes(cfg, BATCH, world)}, comm
        # gradient average + the fp32 loss report: 2 (P-1)/P of (param bytes + 4)
        assert comm["all_reduce"]["bytes"] == 2 * (world - 1) * (r["param_bytes"] + 4) // world, comm


# --- single process --------------------------------------------------------------------------------

def test_dit_presets_build_on_meta():
    model, (x, target), kwargs = build("dit-xl", batch=1)
    cfg = MODELS["dit-xl"].config
    assert all(p.device.type == "meta" for p in model.parameters()) and kwargs == {}
    assert tuple(x.shape) == tuple(target.shape) == (1, cfg.frames, cfg.tokens, cfg.in_channels)
    per_block = 12 * cfg.hidden ** 2 + 13 * cfg.hidden
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(cfg.depth * per_block, rel=0.01)
    assert [b.temporal for b in model.blocks[:4]] == [False, True, False, True]


def test_dit_forward_and_seq_sets_frames():
    model, (x, target), _ = build("dit-tiny", batch=2, seq=4, device="cpu")
    assert x.shape[1] == 4 and model.config.frames == 4
    assert model(x).shape == x.shape
    loss = model(x, target)
    loss.backward()
    assert loss.dim() == 0 and all(p.grad is not None for p in model.parameters())


def test_dit_captures_with_export():
    model, args, _ = build("dit-tiny", batch=2)
    mg = capture(model, args, name="dit-tiny")
    cfg = MODELS["dit-tiny"].config
    attn = [n for n in mg.nodes() if n.meta["autopar"].op == "scaled_dot_product_attention"]
    assert len(attn) == cfg.depth and mg.layers == cfg.depth and mg.seq_len == cfg.frames
    # spatial attention: batch B*T over N tokens; temporal: batch B*N over T frames
    assert attn[0].meta["autopar"].shape[::2] == (2 * cfg.frames, cfg.tokens)
    assert attn[1].meta["autopar"].shape[::2] == (2 * cfg.tokens, cfg.frames)


@pytest.mark.parametrize("frames, tokens, axis", [(6, 16, "T"), (8, 6, "N")])
def test_indivisible_axis_is_bad_input(frames, tokens, axis):
    cfg = DiTConfig(frames=frames, tokens=tokens, in_channels=4, hidden=32, heads=4, depth=2)
    with torch.device("meta"):
        model = DiT(cfg)
    gm = capture(model, example_inputs(cfg, 2)).gm
    with pytest.raises(BadInput, match=f"does not divide {axis}"):
        apply_dsp(gm, None, 4, 0)
    if axis == "T":
        with pytest.raises(BadInput, match="T divisible"):
            shard_inputs(example_inputs(cfg, 2, device="cpu"), 4, 0)
