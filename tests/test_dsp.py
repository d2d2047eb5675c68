"""DSP (search.dsp, passes.dsp, runtime.dsp) on the video DiT: the T-sharded model with all-to-all
switches around temporal blocks matches one process (loss and every gradient, fp32), and the counted
all-to-all bytes equal both the formula in passes/dsp.py and ``search.dsp.dsp_traffic`` (what the
planner prices). One gloo launch per world size (2 and 4 ranks) runs every check.

Errors: DSP that cannot apply (T or N not divisible by the degree, no [B, T, N, ...] input, ...) is
``search.seqshard.Unsupported`` from ``dsp_layout``, and ``apply_dsp`` raises the same exception
unchanged (the planner turns it into a "cannot use DSP" reason).
"""
from __future__ import annotations

import copy

import pytest
import torch

from examples.dit import DiT, DiTConfig, example_inputs
from examples.zoo import MODELS, build
from passes.dsp import apply_dsp
from planner.capture import capture
from search.dsp import Split, block_of, dsp_layout, dsp_traffic
from search.seqshard import Unsupported
from tests.distributed import launch_once

TOL = 1e-5
BATCH = 2


def _dsp_checks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    group = dist.group.WORLD
    model, args, _ = build("dit-tiny", batch=BATCH, device="cpu", seed=0)
    out = {"switch": _switch_check(group, rank, world), **_run_dsp(model, args, group, rank, world)}
    model, args = _consecutive_temporal(device="cpu")
    out["consecutive"] = _run_dsp(model, args, group, rank, world)
    return out


def _run_dsp(model, args, group, rank: int, world: int) -> dict:
    """One DSP training step of ``model`` against one process: loss and gradient differences, the
    counted collectives (after forward and after backward) and dsp_traffic of the layout."""
    from runtime.collectives import comm_stats

    out = {}
    ref = copy.deepcopy(model)
    ref_loss = ref(*args)
    ref_loss.backward()
    gm = capture(model, args).gm
    layout = dsp_layout(gm, world)
    out["traffic"], out["switched"] = dsp_traffic(layout, world), layout.switched
    dsp = _DSPRank(apply_dsp(gm, group, world, rank), group, world, rank)
    comm_stats.reset()
    loss = dsp(*args)
    out["comm_forward"] = comm_stats.snapshot()
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


def _consecutive_temporal(device: str = "meta"):
    """A DiT whose blocks are spatial, temporal, temporal, spatial: the residual stream passes from one
    switched block into the next without switching back (2 switches instead of 4)."""
    cfg = DiTConfig(frames=8, tokens=8, in_channels=4, hidden=16, heads=2, depth=4)
    torch.manual_seed(1)
    with torch.device(device):
        model = DiT(cfg)
    model.blocks[2].temporal, model.blocks[3].temporal = True, False
    return model, example_inputs(cfg, BATCH, device=device, seed=1)


class _DSPRank(torch.nn.Module):
    """Stand-in for runtime.module.DistributedModule + BatchSplit until passes/emit runs DSP plans: deals
    out this rank's frames of every [B, T, ...] input (``x.chunk(P, dim=1)[rank]``), returns the scalar
    loss with the value of the mean over ranks (equal shards: the global loss) and the gradient of the
    local one, and averages parameter gradients over the group when backward ends (runtime.dp.GradSync)."""

    def __init__(self, gm, group, world: int, rank: int):
        super().__init__()
        from runtime.dp import GradSync

        self.gm, self.group, self.world, self.rank = gm, group, world, rank
        self.grad_sync = GradSync([p for p in gm.parameters() if p.requires_grad], group)

    def forward(self, *args):
        from runtime.collectives import all_reduce_mean_scalar

        local = [a.chunk(self.world, dim=1)[self.rank] if isinstance(a, torch.Tensor) and a.dim() >= 2 else a
                 for a in args]
        out = self.gm(*local)
        return out + (all_reduce_mean_scalar(out, self.group) - out.detach())


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
@pytest.mark.parametrize("model", ["dit-tiny", "consecutive"])
def test_dsp_matches_single_process(world, model):
    for rank, r in enumerate(_results(world)):
        r = r if model == "dit-tiny" else r[model]
        where = f"{model}, rank {rank}/{world}"
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


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("model", ["dit-tiny", "consecutive"])
def test_dsp_traffic_equals_counted_all_to_all(world, model):
    """What the planner prices (search.dsp.dsp_traffic) is exactly what the rewritten graph sends."""
    for rank, r in enumerate(_results(world)):
        r = r if model == "dit-tiny" else r[model]
        forward, backward = r["traffic"]
        assert forward == r["comm_forward"]["all_to_all"]["bytes"], (rank, r["traffic"], r["comm_forward"])
        assert forward + backward == r["comm"]["all_to_all"]["bytes"], (rank, r["traffic"], r["comm"])


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
def test_indivisible_axis_is_unsupported(frames, tokens, axis):
    """Refused by the search (the planner's "cannot use DSP" reason) and, unchanged, by the pass."""
    cfg = DiTConfig(frames=frames, tokens=tokens, in_channels=4, hidden=32, heads=4, depth=2)
    with torch.device("meta"):
        model = DiT(cfg)
    gm = capture(model, example_inputs(cfg, 2)).gm
    with pytest.raises(Unsupported, match=f"does not divide {axis}"):
        dsp_layout(gm, 4)
    with pytest.raises(Unsupported, match=f"does not divide {axis}"):
        apply_dsp(gm, None, 4, 0)
    dsp_layout(gm, 2)  # both even


def test_no_frames_tokens_input_is_unsupported():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    gm = capture(model, (torch.randn(4, 8),)).gm
    with pytest.raises(Unsupported, match=r"needs a \[B, T, N, ...\] input .* shape \(4, 8\)"):
        dsp_layout(gm, 2)


def test_dsp_layout_of_dit_tiny():
    """Single process: the odd (temporal) blocks switch, once in and once out each, on the [B, T, N, hidden]
    residual stream; the temporal position table is narrowed; the loss is a local mean."""
    model, args, _ = build("dit-tiny", batch=BATCH)
    cfg = MODELS["dit-tiny"].config
    gm = capture(model, args).gm
    layout = dsp_layout(gm, 4)
    temporal = [f"blocks.{i}" for i in range(1, cfg.depth, 2)]
    assert layout.switched == temporal
    assert (layout.degree, layout.frames, layout.tokens, layout.inputs) == (4, cfg.frames, cfg.tokens, ["x", "target"])
    assert [(e.block, e.direction) for e in layout.switches] == [
        (block, d) for block in temporal for d in ("to_spatial", "to_temporal")]
    residual = BATCH * cfg.frames * cfg.tokens * cfg.hidden * 4
    nodes = {n.name: n for n in gm.graph.nodes}
    for e in layout.switches:
        assert e.nbytes == residual and e.grad and e.users, e
        assert tuple(nodes[e.source].meta["val"].shape) == (BATCH, cfg.frames, cfg.tokens, cfg.hidden)
        inside = [u for u in e.users if block_of(nodes[u]) == e.block]
        assert inside == (list(e.users) if e.direction == "to_spatial" else []), e
        # the switched value is T-sharded outside and N-sharded inside its block
        source = layout.placement[e.source]
        assert source == (Split(1, cfg.frames) if e.direction == "to_spatial" else Split(2, cfg.tokens)), e
    assert layout.narrows == [("add", "unsqueeze", 0)]  # temporal_pos.unsqueeze(1): [T, 1, hidden]
    assert layout.loss == "mse_loss" and layout.placement["mse_loss"] is None
    attn = [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]
    assert [layout.placement[a.name] for a in attn] == [
        Split(0, cfg.tokens) if i % 2 else Split(0, cfg.frames) for i in range(cfg.depth)]  # batch dim only
    # 4 switches of residual / P per rank: (P-1)/P of it each, forward and again backward
    per = 3 * (residual // 4) // 4
    assert dsp_traffic(layout, 4) == (len(layout.switches) * per,) * 2
    assert dsp_traffic(layout, 1) == (0, 0)
    assert sum(dsp_traffic(layout, 2)) == expected_all_to_all_bytes(cfg, BATCH, 2)


def test_dsp_layout_does_not_mutate_the_graph():
    model, args, _ = build("dit-tiny", batch=BATCH)
    gm = capture(model, args).gm
    code, nodes = gm.code, [(n.name, n.op, str(n.target), str(n.args)) for n in gm.graph.nodes]
    modules = [name for name, _ in gm.named_modules()]
    dsp_layout(gm, 2)
    dsp_layout(gm, 4)
    assert gm.code == code
    assert [(n.name, n.op, str(n.target), str(n.args)) for n in gm.graph.nodes] == nodes
    assert [name for name, _ in gm.named_modules()] == modules


def test_consecutive_switched_blocks_do_not_switch_back_between_them():
    model, args = _consecutive_temporal()
    layout = dsp_layout(capture(model, args).gm, 2)
    assert layout.switched == ["blocks.1", "blocks.2"]
    assert [(e.block, e.direction) for e in layout.switches] == [("blocks.1", "to_spatial"),
                                                                  ("blocks.2", "to_temporal")]
