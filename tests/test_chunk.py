"""apply_chunk (passes/chunk.py; the analysis is search/chunkflow.py): chunked regions match the
unchunked graph (loss and every parameter gradient, fp32) for MLPs, query-chunked attention, LM head +
cross-entropy and the Evoformer's pair updates, with chunk counts that do and do not divide the axis;
a plan's chunking entries (search.chunking) applied after tensor parallelism and after Ulysses sequence
parallelism on two gloo ranks (one launch); the measured peak memory of a training step falls as
predicted from shapes; regions that cannot be chunked raise a ChunkError naming the node.

Memory is measured with a TorchDispatchMode that counts the bytes of every tensor storage an aten op
creates until its last tensor dies: forward, backward, the recomputation under checkpoint and gradient
buffers, as an allocator would see them (minus kernel-internal scratch). Prediction: in backward a
region peaks at its largest intermediate u (an MLP's hidden activation, the logits, attention weights):
the tensor saved for that op's backward, the gradient arriving and the gradient leaving coexist, 3u.
Chunking k ways makes that 3u / k, so the step's peak falls by 3u (1 - 1/k) when that region's backward
sets it (one block here; search/chunking.py has the deeper cases, where the saved activations dominate).
``runtime.memory.LiveBytes`` counts them, parameters (and their ``t()`` views) excluded.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.fx as fx

from examples.evoformer import Evoformer, EvoformerConfig, example_inputs
from examples.gpt import GPT, GPTConfig
from examples.zoo import build
from passes.chunk import ChunkedRegion, apply_chunk
from planner.capture import capture
from runtime.memory import step_peak
from search.chunkflow import ChunkError, chunk_flow, region_between, scope_region
from tests.distributed import run_ranks

TOL = 1e-5
# deep-copying an exported graph's pytree codegen warns about a deprecated spec type
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


@functools.cache
def _captured(name: str):
    model, args, kwargs = build(name, batch=2, device="cpu", seed=0)
    return capture(model, args, kwargs).gm, args


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A new graph over the same parameters (apply_chunk rewrites its graph in place)."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def _step(gm, args) -> tuple[torch.Tensor, dict]:
    for p in gm.parameters():
        p.grad = None
    loss = gm(*args)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in gm.named_parameters()}


def _attention(gm, attn: str, proj: str) -> list[str]:
    """Query path of ``attn``: its first view (q's) through SDPA to the output projection."""
    names = scope_region(gm, attn)
    q_view = next(n for n in gm.graph.nodes if n.name in names and n.target == torch.ops.aten.view.default)
    first_proj = scope_region(gm, proj)[0]
    return region_between(q_view, next(n for n in gm.graph.nodes if n.name == first_proj))


def _loss_head(gm, head: str) -> list[str]:
    """The head's linear through the cross-entropy."""
    loss = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.cross_entropy_loss.default)
    first = scope_region(gm, head)[0]
    return region_between(next(n for n in gm.graph.nodes if n.name == first), loss)


def _tri_mul(gm):  # the per-row part: everything but the input norm and the edge b every row needs
    return scope_region(gm, "blocks.0.tri_mul", exclude=("blocks.0.tri_mul.norm_in", "blocks.0.tri_mul.right"))


def _col_attention(gm):  # attention around the ending node, with the transpose back to [B, i, j, c]
    return scope_region(gm, "blocks.1.col_attn.attn") + [scope_region(gm, "blocks.1.col_attn")[-1]]


def _spatial_attention(gm):  # from the [B, T, N, H] -> [B*T, N, H] reshape: frames merged with the batch
    attn = scope_region(gm, "blocks.0.attn")
    first = next(n for n in gm.graph.nodes if n.name == attn[0])
    return [first.args[0].name] + attn


# (model, case, region, dim of the anchor, chunk counts, expected output dims)
CASES = [
    ("gpt-tiny", "mlp", lambda gm: scope_region(gm, "blocks.0.mlp"), 1, (4, 5, 32), [1]),
    ("gpt-tiny", "attention", lambda gm: _attention(gm, "blocks.1.attn", "blocks.1.attn.proj"), 1, (3, 7), [1]),
    ("gpt-tiny", "lm_head+ce", lambda gm: _loss_head(gm, "lm_head"), 1, (3, 5), ["mean"]),
    ("llama-tiny", "mlp", lambda gm: scope_region(gm, "layers.1.mlp"), 1, (3,), [1]),
    ("llama-tiny", "attention", lambda gm: _attention(gm, "layers.0.self_attn", "layers.0.self_attn.o_proj"),
     1, (5,), [1]),
    ("llama-tiny", "lm_head+ce", lambda gm: _loss_head(gm, "lm_head"), 1, (6,), ["mean"]),
    ("evoformer-tiny", "tri_mul rows", _tri_mul, 1, (5,), [1]),
    ("evoformer-tiny", "row attention", lambda gm: scope_region(gm, "blocks.0.row_attn.attn"), 1, (2, 5), [1]),
    ("evoformer-tiny", "column attention", _col_attention, 1, (5,), [2]),
    ("evoformer-tiny", "transition columns", lambda gm: scope_region(gm, "blocks.1.transition"), 2, (7,), [2]),
    ("evoformer-tiny", "distogram+ce", lambda gm: _loss_head(gm, "head"), 1, (5,), ["mean"]),
    ("dit-tiny", "frames through spatial attention", _spatial_attention, 1, (3,), [0]),
]


@pytest.mark.parametrize("name, case, region, dim, counts, out_dims", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_chunked_region_matches_unchunked(name, case, region, dim, counts, out_dims):
    gm, args = _captured(name)
    ref_loss, ref_grads = _step(gm, args)
    names = region(gm)
    assert list(chunk_flow(gm, names, dim).output_dims.values()) == out_dims
    for chunks in counts:
        chunked = apply_chunk(_copy(gm), names, dim, chunks)
        assert sum(isinstance(m, ChunkedRegion) for m in chunked.modules()) == 1
        assert chunked.state_dict().keys() == gm.state_dict().keys()
        loss, grads = _step(chunked, args)
        assert (loss - ref_loss).abs().item() <= TOL, f"{case}, {chunks} chunks: loss {loss} vs {ref_loss}"
        assert grads.keys() == ref_grads.keys()
        worst = max(grads, key=lambda n: (grads[n] - ref_grads[n]).abs().max())
        diff = (grads[worst] - ref_grads[worst]).abs().max().item()
        assert diff <= TOL, f"{case}, {chunks} chunks: grad of {worst} differs by {diff:.3g}"


def test_flow_finds_sliced_and_whole_inputs():
    """Llama attention: q and the RoPE tables are sliced along the sequence, k and v passed whole;
    the LM head's targets are sliced through their flattening view (batch x sequence merged)."""
    gm, _ = _captured("llama-tiny")
    flow = chunk_flow(gm, _attention(gm, "layers.0.self_attn", "layers.0.self_attn.o_proj"), 1)
    # cos, sin [T, hd] along dim 0 and q's projection [B, T, C] along dim 1
    assert sorted(flow.dims[n].pos for n in flow.inputs if n in flow.dims) == [0, 0, 1]
    assert sum(n.op == "call_function" and n not in flow.dims for n in flow.inputs) == 2  # k, v
    flow = chunk_flow(gm, _loss_head(gm, "lm_head"), 1)
    targets = next(n for n in flow.inputs if n.meta["val"].dtype == torch.long)
    assert flow.dims[targets] == (0, 2, 1, False)  # dim 0 of [B*T] = 2 x T x 1


def test_mean_loss_counts_ignored_targets_per_chunk():
    """The token mean is sum / count over chunks: a chunk whose targets are all ignored adds nothing."""
    gm, (ids, targets) = _captured("gpt-tiny")
    targets = targets.clone()
    targets[:, :12] = -100  # the first of 4 chunks (8 tokens) is all ignored, the second half
    ref_loss, ref_grads = _step(gm, (ids, targets))
    loss, grads = _step(apply_chunk(_copy(gm), _loss_head(gm, "lm_head"), 1, 4), (ids, targets))
    assert (loss - ref_loss).abs().item() <= TOL
    assert max((grads[n] - ref_grads[n]).abs().max().item() for n in grads) <= TOL


def test_loss_region_takes_its_gradients_in_the_forward():
    """A region ending in a scalar loss runs each chunk's backward right after its forward: the body
    runs k times in the forward and never in the backward (no recompute, unlike the checkpointed MLP),
    a scaled loss and a retained graph give scaled and repeated gradients, and without gradients the
    loop is a plain one."""
    gm, args = _captured("gpt-tiny")
    ref_loss, ref_grads = _step(gm, args)
    head = apply_chunk(_copy(gm), _loss_head(gm, "lm_head"), 1, 4)
    mlp = apply_chunk(_copy(gm), scope_region(gm, "blocks.0.mlp"), 1, 4)
    calls = {}
    for name, chunked in (("head", head), ("mlp", mlp)):
        region = next(m for m in chunked.modules() if isinstance(m, ChunkedRegion))
        assert region.scalar_loss == (name == "head")
        region.body.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        loss = chunked(*args)
        forward, calls[name] = calls[name], 0
        loss.backward()
        assert (forward, calls[name]) == ((4, 0) if name == "head" else (4, 4)), name
    for p in head.parameters():
        p.grad = None
    loss = head(*args)
    (3 * loss).backward(retain_graph=True)
    (3 * loss).backward()
    worst = max((p.grad - 6 * ref_grads[n]).abs().max().item() for n, p in head.named_parameters())
    assert worst <= 6 * TOL
    with torch.no_grad():
        assert (head(*args) - ref_loss).abs().item() <= TOL


# --------------------------------------------------------------------------------------- errors

def test_reduced_dim_names_the_node():
    gm, _ = _captured("gpt-tiny")
    with pytest.raises(ChunkError, match=r"cannot chunk linear_2 \(linear\): it reduces or mixes dim 2"):
        chunk_flow(gm, scope_region(gm, "blocks.0.mlp"), 2)  # the hidden dim is contracted by fc
    with pytest.raises(ChunkError, match=r"cannot chunk layer_norm_1 \(layer_norm\)"):
        chunk_flow(gm, scope_region(gm, "blocks.0.ln_2") + scope_region(gm, "blocks.0.mlp"), 2)
    with pytest.raises(ChunkError, match=r"scaled_dot_product_attention_1 .* mixes dim 2 of transpose_\d+"):
        chunk_flow(gm, scope_region(gm, "blocks.1.attn"), 1)  # keys chunked along with the queries
    llama, _ = _captured("llama-tiny")
    with pytest.raises(ChunkError, match=r"cannot chunk mean_\d+ \(mean\): it reduces the chunked axis and add_\d+"):
        chunk_flow(llama, scope_region(llama, "layers.1.input_layernorm"), 2)  # RMSNorm's mean is used inside


def test_bad_regions_and_counts_are_clear():
    gm, _ = _captured("gpt-tiny")
    mlp = scope_region(gm, "blocks.0.mlp")
    with pytest.raises(ChunkError, match="between 1 and the axis length 32, got 33"):
        apply_chunk(_copy(gm), mlp, 1, 33)
    with pytest.raises(ChunkError, match=r"unknown nodes: \['nope'\]"):
        chunk_flow(gm, mlp + ["nope"], 1)
    with pytest.raises(ChunkError, match="out of range"):
        chunk_flow(gm, mlp, 3)
    evo, _ = _captured("evoformer-tiny")  # the bias projection runs between the norm and the attention
    with pytest.raises(ChunkError, match="not convex"):
        chunk_flow(evo, scope_region(evo, "blocks.0.row_attn.norm") + scope_region(evo, "blocks.0.row_attn.attn"), 1)


# --------------------------------------------------------------------------------------- tensor parallel

def _tp_rank(rank: int, world: int) -> dict:
    """gpt-tiny, Megatron tp=2, then chunked as a plan says: every region ``search.chunking`` found on the
    single-process capture (attention, MLP of each block, LM head + loss), matched on the tensor-parallel
    graph by scope. Loss and gradients (shards against the matching shard of the single-process one)."""
    import torch.distributed as dist

    from passes.chunk import apply_chunking
    from passes.tp import apply_tp, shard_tensor
    from search.chunking import chunk_regions
    from search.placement import choose_styles, propagate

    model, args, _ = build("gpt-tiny", batch=2, device="cpu", seed=0)
    planned = capture(copy.deepcopy(model), args)
    ref_loss, ref_grads = _step(planned.gm, args)
    entries = [r.entry(3 + i) for i, r in
               enumerate(chunk_regions(planned))]
    gm = capture(model, args).gm
    styles = choose_styles(gm, world)
    shards = propagate(gm, styles, world).param_shards
    apply_tp(gm, styles, dist.group.WORLD, world, rank)
    apply_chunking(gm, entries)
    loss, grads = _step(gm, args)
    diffs = {}
    for name, g in grads.items():
        want = shard_tensor(ref_grads[name], *shards[name], world, rank) if name in shards else ref_grads[name]
        diffs[name] = (g - want).abs().max().item()
    return {"loss": abs(loss.item() - ref_loss.item()), "grads": diffs, "sharded": sorted(shards),
            "entries": [(e["kind"], e["scope"]) for e in entries],
            "chunked": [m.chunks for m in gm.modules() if isinstance(m, ChunkedRegion)],
            "sp": _sp_checks(model, args, entries, rank, world)}


def _sp_checks(model, args, entries, rank: int, world: int) -> dict:
    """After Ulysses sequence parallelism (zig-zag, sp=2): the MLP and LM-head entries give this rank's
    loss and gradients of the unchunked sp graph; the attention entry, whose attention sp replaced,
    is refused."""
    import torch.distributed as dist

    from passes.chunk import apply_chunking
    from passes.sp import apply_sp
    from runtime.attention import positions
    from search.errors import BadInput

    local = tuple(a[:, positions(32, world, rank, "zigzag")] for a in args)

    def sp_graph():
        gm = capture(copy.deepcopy(model), args).gm
        return apply_sp(gm, variant="ulysses", layout="zigzag", seq_len=32, sp=world, rank=rank,
                        group=dist.group.WORLD)

    ref_loss, ref_grads = _step(sp_graph(), local)
    gm = apply_chunking(sp_graph(), [e for e in entries if e["kind"] != "attention"])
    loss, grads = _step(gm, local)
    try:
        apply_chunking(sp_graph(), [e for e in entries if e["kind"] == "attention"])
        refused = ""
    except BadInput as exc:
        refused = str(exc)
    return {"loss": abs(loss.item() - ref_loss.item()), "grad": max((grads[n] - ref_grads[n]).abs().max().item()
                                                                    for n in grads),
            "chunked": sum(isinstance(m, ChunkedRegion) for m in gm.modules()), "refused": refused}


def test_chunking_after_tensor_or_sequence_parallel_matches():
    for rank, r in enumerate(run_ranks(_tp_rank, 2, timeout=120)):
        assert r["entries"] == [("attention", "blocks.*.attn"), ("mlp", "blocks.*.mlp"), ("lm_head_loss", "lm_head")]
        assert sorted(r["chunked"]) == [3, 3, 4, 4, 5], r["chunked"]  # two blocks, one head
        assert "blocks.0.mlp.fc.weight" in r["sharded"] and "blocks.1.attn.qkv.weight" in r["sharded"]
        assert r["loss"] <= TOL, f"rank {rank}: loss differs by {r['loss']:.3g}"
        worst = max(r["grads"], key=r["grads"].get)
        assert r["grads"][worst] <= TOL, f"rank {rank}: grad of {worst} differs by {r['grads'][worst]:.3g}"
        sp = r["sp"]
        assert sp["chunked"] == 3 and sp["loss"] <= TOL and sp["grad"] <= TOL, sp
        assert "matches nothing" in sp["refused"] and "sequence parallelism" in sp["refused"], sp["refused"]


# --------------------------------------------------------------------------------------- memory

def _largest_intermediate(flow) -> int:
    """Bytes of the region's largest intermediate; for attention, its weights [..., L, S]."""
    def size(n):
        if n.target == torch.ops.aten.scaled_dot_product_attention.default:
            q, k = n.args[0].meta["val"], n.args[1].meta["val"]
            return math.prod(q.shape[:-1]) * k.shape[-2] * q.element_size()
        return n.meta["val"].numel() * n.meta["val"].element_size()
    return max(size(n) for n in flow.body if isinstance(n.meta["val"], torch.Tensor))


def _gpt(**cfg):
    torch.manual_seed(0)
    model = GPT(GPTConfig(layers=1, heads=2, hidden=32, **cfg))
    ids = torch.randint(0, cfg["vocab"], (2, cfg["seq"]))
    return capture(model, (ids, ids)).gm, (ids, ids)


def _evoformer():
    """One pair block whose row attention weights [B, N, heads, N, N] dominate (column attention chunked)."""
    cfg = EvoformerConfig(residues=64, in_channels=4, pair=8, heads=4, tri=8, blocks=1, bins=4)
    torch.manual_seed(0)
    args = example_inputs(cfg, 1, "cpu")
    gm = capture(Evoformer(cfg), args).gm
    return apply_chunk(gm, scope_region(gm, "blocks.0.col_attn.attn"), 1, 8), args


MEMORY = [
    ("mlp", lambda: _gpt(vocab=64, seq=256, ffn=1024), lambda gm: scope_region(gm, "blocks.0.mlp")),
    ("lm_head+ce", lambda: _gpt(vocab=4096, seq=128), lambda gm: _loss_head(gm, "lm_head")),
    ("evoformer row attention", _evoformer, lambda gm: scope_region(gm, "blocks.0.row_attn.attn")),
]


@pytest.mark.parametrize("case, make, region", MEMORY, ids=[m[0] for m in MEMORY])
def test_peak_memory_falls_as_predicted(case, make, region):
    gm, args = make()
    names, chunks = region(gm), 4
    u = _largest_intermediate(chunk_flow(gm, names, 1))
    before = step_peak(gm, *args)
    after = step_peak(apply_chunk(_copy(gm), names, 1, chunks), *args)
    predicted = 3 * u * (1 - 1 / chunks)
    print(f"\n{case}: peak {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB with {chunks} chunks; "
          f"fell {(before - after) / 2**20:.2f} MiB, predicted 3u(1-1/k) = {predicted / 2**20:.2f} MiB")
    assert abs(before - after - predicted) <= 0.1 * 3 * u, (case, before, after, predicted)
