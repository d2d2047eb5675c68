"""Chunking made plannable: ``search.chunking.chunk_regions`` finds the chunkable regions of a captured
model (one per template, by module scope) and prices them like ``search.space``; ``passes.chunk.
apply_chunking`` applies plan entries {kind, scope, dim, chunks} to a fresh capture, finding every instance
again by scope (not by node names), with the loss and gradients of the unchunked model. The memory model
of ``chunk_memory`` is checked against measured live bytes. Single process.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import tests.test_chunk as measured  # LiveBytes (a module attribute: its tests are not collected twice)
from examples.gpt import GPT, GPTConfig
from examples.zoo import build
from passes.chunk import ChunkedRegion, apply_chunking
from planner.capture import capture
from search.chunking import ChunkRegion, chunk_memory, chunk_regions, matching_scopes
from search.errors import BadInput
from search.fold import fold
from search.space import COMPUTE_BOUND, NO_ACTIVATION, build_space

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

EXPECTED = {  # (kind, scope pattern) per model; dims 1 (sequence, pair rows), one region per kind and scope
    "gpt-tiny": [("attention", "blocks.*.attn"), ("mlp", "blocks.*.mlp"), ("lm_head_loss", "lm_head")],
    "llama-tiny": [("attention", "layers.*.self_attn"), ("mlp", "layers.*.mlp"), ("lm_head_loss", "lm_head")],
    "evoformer-tiny": [("pair", "blocks.*.tri_mul"), ("pair", "blocks.*.row_attn"), ("pair", "blocks.*.col_attn"),
                       ("mlp", "blocks.*.transition"), ("lm_head_loss", "head")],
}
VIEWS = {"view", "reshape", "_unsafe_view", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice",
         "select", "split", "chunk", "getitem", "t", "alias", "detach"}


@functools.cache
def _planned(name: str):
    model, args, kwargs = build(name, batch=2, device="cpu", seed=0)
    mg = capture(copy.deepcopy(model), args, kwargs, name=name)
    return model, args, mg, chunk_regions(mg, fold(mg))


def _step(gm, args):
    for p in gm.parameters():
        p.grad = None
    loss = gm(*args)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in gm.named_parameters()}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_regions_found_per_template(name):
    _, _, mg, regions = _planned(name)
    assert [(r.kind, r.scope) for r in regions] == EXPECTED[name]
    seq = mg.seq_len
    nodes = {n.name: n for n in mg.gm.graph.nodes}
    seen = set()
    for r in regions:
        assert isinstance(r, ChunkRegion) and r.dim == 1 and r.size == seq, r
        if r.kind == "lm_head_loss":
            assert (r.template, r.instances) == (None, 1)
        else:
            assert (r.template, r.instances) == ("t0", mg.layers), r
            assert all(nodes[n].meta["autopar"].scope.startswith(r.scope.replace("*", "0")) for n in r.nodes)
        assert not seen & set(r.nodes), f"{r.scope} overlaps another region"
        seen |= set(r.nodes)
        assert len(matching_scopes(mg.gm, r.scope)) == r.instances


@pytest.mark.parametrize("name", list(EXPECTED))
def test_numbers_are_counted_like_search_space(name):
    """act_bytes: the region nodes' outputs that are saved activations (backward FLOPs, not a view),
    summed independently here; FLOPs: the compute-bound ops' forward FLOPs; the regions of a block hold
    part of what search.space counts for it."""
    _, _, mg, regions = _planned(name)
    nodes = {n.name: n for n in mg.gm.graph.nodes}
    per_block = 0.0
    for r in regions:
        infos = [nodes[n].meta["autopar"] for n in r.nodes]
        saved = [i.output_bytes for i in infos if i.bwd_flops and i.op not in VIEWS]
        assert r.act_bytes == sum(saved) > 0
        assert 0 <= r.output_bytes < r.act_bytes
        assert r.fwd_flops == sum(i.fwd_flops for i in infos if i.op in COMPUTE_BOUND) > 0
        assert r.fwd_mem_bytes == sum(i.bytes_read + i.bytes_written for i in infos
                                      if i.op not in COMPUTE_BOUND and i.op not in NO_ACTIVATION)
        assert r.peak_bytes == max(i.output_bytes for i in infos)
        inputs = {a for n in r.nodes for a in nodes[n].all_input_nodes if a.name not in r.nodes and a.op != "get_attr"}
        assert r.input_bytes == sum(a.meta["val"].numel() * a.meta["val"].element_size() for a in inputs) > 0
        # one instance chunked k ways keeps its outputs and its share of one chunk's intermediates
        k = 4
        assert chunk_memory(r, k) == pytest.approx(r.output_bytes + (r.act_bytes - r.output_bytes) / (k * r.instances))
        assert chunk_memory(r, 2) > chunk_memory(r, k) >= r.output_bytes
        per_block += r.act_bytes if r.template else 0.0
    space = build_space(mg, 1)
    assert per_block <= space.block_acts["t0"][1]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_apply_chunking_matches_unchunked(name):
    """Entries from the planner's capture applied to a fresh capture whose node names were all changed."""
    model, args, mg, regions = _planned(name)
    ref_loss, ref_grads = _step(mg.gm, args)
    gm = capture(copy.deepcopy(model), args).gm
    for n in gm.graph.nodes:
        if n.op == "call_function":
            n._rename("rank_" + n.name)
    gm.recompile()
    entries = [{"kind": r.kind, "scope": r.scope, "dim": r.dim, "chunks": 5} for r in regions]
    apply_chunking(gm, entries)
    assert sum(isinstance(m, ChunkedRegion) for m in gm.modules()) == sum(r.instances for r in regions)
    loss, grads = _step(gm, args)
    assert (loss - ref_loss).abs().item() <= TOL
    worst = max(grads, key=lambda n: (grads[n] - ref_grads[n]).abs().max())
    assert (grads[worst] - ref_grads[worst]).abs().max().item() <= TOL, worst


def test_templates_that_share_a_path_get_alternatives():
    """DiT's spatial and temporal blocks alternate: "blocks.*" would match both templates."""
    model, args, mg, regions = _planned("dit-tiny")
    scopes = {(r.kind, r.scope, r.template) for r in regions}
    assert {("attention", "blocks.{0,2}.attn", "t0"), ("attention", "blocks.{1,3}.attn", "t1"),
            ("mlp", "blocks.{0,2}", "t0"), ("mlp", "blocks.{1,3}", "t1")} <= scopes
    ref_loss, _ = _step(mg.gm, args)
    gm = apply_chunking(capture(copy.deepcopy(model), args).gm,
                        [{"kind": r.kind, "scope": r.scope, "dim": r.dim, "chunks": 3} for r in regions])
    assert (gm(*args) - ref_loss).abs().item() <= TOL


def test_entries_that_match_nothing_are_bad_input():
    model, args, _, _ = _planned("gpt-tiny")
    gm = capture(copy.deepcopy(model), args).gm
    with pytest.raises(BadInput, match=r"matches nothing .*no module matches the scope 'blocks\.\*\.ffn'"):
        apply_chunking(gm, [{"kind": "mlp", "scope": "blocks.*.ffn", "dim": 1, "chunks": 2}])
    with pytest.raises(BadInput, match=r"2 module\(s\) match 'blocks\.\*\.mlp' .* none holds an attention region"):
        apply_chunking(gm, [{"kind": "attention", "scope": "blocks.*.mlp", "dim": 1, "chunks": 2}])
    with pytest.raises(BadInput, match="unknown chunking kind 'conv'"):
        apply_chunking(gm, [{"kind": "conv", "scope": "blocks.*.mlp", "dim": 1, "chunks": 2}])
    with pytest.raises(BadInput, match=r"lacks \['chunks'\]"):
        apply_chunking(gm, [{"kind": "mlp", "scope": "blocks.*.mlp", "dim": 1}])
    with pytest.raises(BadInput, match="cannot chunk linear_2"):  # found, but not along the hidden dim
        apply_chunking(gm, [{"kind": "mlp", "scope": "blocks.*.mlp", "dim": 2, "chunks": 2}])
    with pytest.raises(BadInput, match=r"chunking\[1\] .* overlaps an earlier entry"):
        apply_chunking(gm, [{"kind": "mlp", "scope": "blocks.*.mlp", "dim": 1, "chunks": 2}] * 2)
    assert not any(isinstance(m, ChunkedRegion) for m in gm.modules())


class _ActivationBytes(measured.LiveBytes):
    """LiveBytes without the parameters' storages (a weight's ``t()`` view would count its weight)."""

    def __init__(self, params: set[int]):
        super().__init__()
        self.params = params

    def _track(self, t):
        if t.untyped_storage().data_ptr() not in self.params:
            super()._track(t)


def test_memory_model_against_measured_live_bytes():
    """Two GPT layers, MLPs chunked: after the forward every MLP intermediate is gone, whatever k (its
    counted internals, act_bytes - output_bytes per instance); the model, which also counts one chunk's
    intermediates recomputed in backward, is below that."""
    torch.manual_seed(0)
    cfg = GPTConfig(layers=2, heads=2, hidden=32, vocab=64, seq=128, ffn=1024)
    model = GPT(cfg)
    ids = torch.randint(0, cfg.vocab, (2, cfg.seq))
    mg = capture(copy.deepcopy(model), (ids, ids))
    mlp = next(r for r in chunk_regions(mg) if r.kind == "mlp")
    internals = mlp.instances * (mlp.act_bytes - mlp.output_bytes)

    def after_forward(gm):
        with _ActivationBytes({p.untyped_storage().data_ptr() for p in gm.parameters()}) as mode:
            loss = gm(ids, ids)
            alive = mode.live
            loss.backward()
        return alive

    before = after_forward(mg.gm)
    for k in (2, 8):
        gm = apply_chunking(capture(copy.deepcopy(model), (ids, ids)).gm,
                            [{"kind": "mlp", "scope": mlp.scope, "dim": 1, "chunks": k}])
        fell = before - after_forward(gm)
        predicted = mlp.instances * (mlp.act_bytes - chunk_memory(mlp, k))
        assert predicted < internals and abs(fell - internals) <= 0.02 * internals, (k, fell, internals, predicted)
