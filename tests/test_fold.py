"""Folding on real captures: zoo and Hugging Face stacks, encoder-decoder, alternating and staged blocks."""
import dataclasses
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from examples import zoo
from examples.bert import Bert
from examples.gpt import GPT, GPTConfig
from examples.llama import Llama
from examples.zoo import build
from planner.capture import capture
from planner.models import resolve_model
from search.fold import excerpt, fold, no_fold
from search.space import build_space


# --- small hand-written models ---------------------------------------------------------------------

class Attn(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.q, self.kv, self.o, self.heads = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d), heads

    def forward(self, x, mem=None):
        mem = x if mem is None else mem
        b, s, d = x.shape
        q = self.q(x).view(b, s, self.heads, -1).transpose(1, 2)
        k, v = self.kv(mem).view(b, mem.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class MoE(nn.Module):
    """MoE-ish: every expert sees every token (no routing), enough to nest a repeat in a block."""

    def __init__(self, d, ffn, experts):
        super().__init__()
        self.experts = nn.ModuleList(MLP(d, ffn) for _ in range(experts))

    def forward(self, x):
        return sum(e(x) for e in self.experts) / len(self.experts)


class Block(nn.Module):
    def __init__(self, d, mlp, cross=False):
        super().__init__()
        self.norm1, self.norm3, self.attn, self.mlp = nn.LayerNorm(d), nn.LayerNorm(d), Attn(d), mlp
        self.norm2, self.cross = (nn.LayerNorm(d), Attn(d)) if cross else (None, None)

    def forward(self, x, mem=None):
        x = x + self.attn(self.norm1(x))
        if self.cross is not None:
            x = x + self.cross(self.norm2(x), mem)
        return x + self.mlp(self.norm3(x))


class Stack(nn.Module):
    def __init__(self, d, n, cross):
        super().__init__()
        self.block = nn.ModuleList(Block(d, MLP(d, 2 * d), cross) for _ in range(n))
        self.norm = nn.LayerNorm(d)

    def forward(self, x, mem=None):
        for b in self.block:
            x = b(x, mem)
        return self.norm(x)


class EncDec(nn.Module):
    """T5-style: shared embedding, encoder stack, decoder stack with cross-attention, LM head."""

    def __init__(self, d=32, vocab=64, n=3):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, d), nn.Linear(d, vocab, bias=False)
        self.encoder, self.decoder = Stack(d, n, cross=False), Stack(d, n, cross=True)

    def forward(self, src, tgt):
        return self.head(self.decoder(self.embed(tgt), self.encoder(self.embed(src))))


class Layers(nn.Module):
    def __init__(self, d, layers):
        super().__init__()
        self.embed, self.layers, self.head = nn.Linear(16, d), nn.ModuleList(layers), nn.Linear(d, 10)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Stage(nn.Module):
    def __init__(self, d, depth, merge):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, MLP(d, 2 * d)) for _ in range(depth))
        self.merge = nn.Linear(2 * d, 2 * d) if merge else None

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        if self.merge is None:
            return x
        b, s, d = x.shape
        return self.merge(x.reshape(b, s // 2, 2 * d))  # patch merging: half the tokens, twice the width


class Swin(nn.Module):
    """Two stages of two blocks, width 32 then 64, joined by a patch-merging projection."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(16, 32), nn.Linear(64, 10)
        self.stages = nn.ModuleList([Stage(32, 2, merge=True), Stage(64, 2, merge=False)])

    def forward(self, x):
        x = self.embed(x)
        for s in self.stages:
            x = s(x)
        return self.head(x)


class NoRepeat(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 32), nn.Linear(32, 8)])

    def forward(self, x):
        return self.layers[1](F.relu(self.layers[0](x)))


def _capture_meta(make, *shapes, dtype=torch.float32):
    with torch.device("meta"):
        model = make()
        args = tuple(torch.empty(s, dtype=dtype) if dtype.is_floating_point else torch.zeros(s, dtype=dtype)
                     for s in shapes)
    return capture(model, args, name=make.__name__)


@functools.cache
def _zoo(name, seq=None):
    model, args, kwargs = build(name, batch=2, seq=seq)
    return capture(model, args, kwargs, name=name)


def _checked(mg):
    """fold(mg) after checking the invariants every folding must hold."""
    f = fold(mg)
    names = [n.name for n in mg.nodes()]
    covered = [x for r in f.regions for x in r.nodes]
    assert sorted(covered) == sorted(names)                     # a partition of the nodes
    for t in f.templates:
        insts = f.instances(t.id)
        assert [r.scope for r in insts] == list(t.instances) and len(insts) >= 2
        assert all(len(r.nodes) == t.num_nodes and r.instance == k for k, r in enumerate(insts))
    assert [t.id for t in f.templates] == [f"t{i}" for i in range(len(f.templates))]
    seen = []                                                  # ids in order of first appearance
    for r in f.regions:
        if r.template is not None and r.template not in seen:
            seen.append(r.template)
    assert seen == [t.id for t in f.templates]
    return f


def _shape(f):
    return [(t.id, t.instances) for t in f.templates], [r.template for r in f.regions]


# --- tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, stack", [("gpt-tiny", "blocks"), ("llama-tiny", "layers"), ("bert-tiny", "layers")])
def test_zoo_stack_is_one_template_between_singletons(name, stack):
    mg = _zoo(name)
    f = _checked(mg)
    assert _shape(f) == ([("t0", (f"{stack}.0", f"{stack}.1"))], [None, "t0", "t0", None])
    t = f.templates[0]
    block_params = sum(v.numel() for k, v in mg.gm.named_parameters() if k.startswith(f"{stack}.0."))
    assert t.num_params == block_params and len(t.hash) == 64
    first, b0, b1, last = f.regions
    assert b1.inputs[0] == b0.outputs[-1]                      # blocks chain through the residual stream
    assert b1.inputs[1:] == b0.inputs[1:]                      # and share the rest (llama: rope cos/sin)
    assert last.inputs[0] == b1.outputs[-1]


def test_hf_gpt2_twelve_blocks():
    lm = resolve_model("hf:gpt2", batch=1, seq=16)
    mg = capture(lm.model, lm.args, lm.kwargs, name="gpt2")
    f = _checked(mg)
    (t,) = f.templates
    assert t.instances == tuple(f"transformer.h.{i}" for i in range(12))
    assert [r.template for r in f.regions] == [None] + ["t0"] * 12 + [None]
    head = {n.meta["autopar"].op for n in mg.nodes() if n.name in set(f.regions[0].nodes)}
    assert "embedding" in head and "addmm" not in head
    assert t.num_params == 12 * 768 * 768 + 13 * 768


def test_deep_stack_folds():
    """24 layers (gpt3-175b's 96 fold in ~35 ms, bench/run_search.py, but take 5 s to capture)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab=128, seq=32, hidden=64, layers=24, heads=4))
        ids = torch.zeros(2, 32, dtype=torch.long)
    mg = capture(model, (ids, ids), name="gpt-24")
    f = fold(mg)
    assert [t.instances for t in f.templates] == [tuple(f"blocks.{i}" for i in range(24))]
    assert len(f.regions) == 26


def test_encoder_decoder_two_templates():
    f = _checked(_capture_meta(EncDec, (2, 8), (2, 6), dtype=torch.long))
    enc, dec = (tuple(f"{s}.block.{i}" for i in range(3)) for s in ("encoder", "decoder"))
    assert _shape(f) == ([("t0", enc), ("t1", dec)], [None] + ["t0"] * 3 + [None] + ["t1"] * 3 + [None])
    enc_t, dec_t = f.templates
    assert dec_t.num_nodes > enc_t.num_nodes and dec_t.num_params > enc_t.num_params
    mem = f.regions[4].outputs                                 # encoder norm -> every decoder block
    assert all(set(mem) & set(r.inputs) for r in f.instances("t1"))


def test_alternating_dense_and_moe_blocks():
    def make():
        return Layers(32, [Block(32, MLP(32, 128) if i % 2 == 0 else MoE(32, 64, experts=2)) for i in range(4)])

    f = _checked(_capture_meta(make, (2, 8, 16)))
    # the outer level repeats, so the experts inside each MoE block are not folded separately
    assert _shape(f) == ([("t0", ("layers.0", "layers.2")), ("t1", ("layers.1", "layers.3"))],
                         [None, "t0", "t1", "t0", "t1", None])


def test_alternating_widths_differ_only_in_shapes():
    def make():
        return Layers(32, [Block(32, MLP(32, 128 if i % 2 == 0 else 64)) for i in range(6)])

    f = _checked(_capture_meta(make, (2, 8, 16)))
    assert [len(t.instances) for t in f.templates] == [3, 3]
    assert f.templates[0].hash != f.templates[1].hash
    assert [r.template for r in f.regions] == [None] + ["t0", "t1"] * 3 + [None]


def test_nested_repeat_folds_when_outer_blocks_are_distinct():
    def make():
        return Layers(32, [Block(32, MLP(32, 128)), Block(32, MoE(32, 64, experts=3))])

    f = _checked(_capture_meta(make, (2, 8, 16)))
    assert _shape(f)[0] == [("t0", tuple(f"layers.1.mlp.experts.{i}" for i in range(3)))]


def test_swin_stages_of_different_widths():
    f = _checked(_capture_meta(Swin, (2, 8, 16)))
    assert _shape(f) == ([("t0", ("stages.0.blocks.0", "stages.0.blocks.1")),
                          ("t1", ("stages.1.blocks.0", "stages.1.blocks.1"))],
                         [None, "t0", "t0", None, "t1", "t1", None])
    merge = f.regions[3]
    assert merge.scope == "" and any(n.startswith("linear") for n in merge.nodes)


def test_no_repeats_is_one_singleton_region():
    mg = _capture_meta(NoRepeat, (2, 16))
    f = _checked(mg)
    assert f.templates == () and len(f.regions) == 1
    assert f.regions[0].nodes == tuple(n.name for n in mg.nodes())
    assert no_fold(mg) == f


def test_no_fold_keeps_regions_but_no_sharing():
    mg = _capture_meta(Swin, (2, 8, 16))
    f, nf = fold(mg), no_fold(mg)
    assert [r.nodes for r in nf.regions] == [r.nodes for r in f.regions]
    assert [t.instances for t in nf.templates] == [(r.scope,) for r in f.regions if r.template]
    assert [r.template for r in nf.regions] == [None, "t0", "t1", None, "t2", "t3", None]
    assert [t.hash for t in nf.templates] == [f.templates[i].hash for i in (0, 0, 1, 1)]


def test_correspondence_maps_same_ops_by_position():
    mg = _capture_meta(lambda: Layers(32, [Block(32, MLP(32, 64)) for _ in range(3)]), (2, 8, 16))
    f = _checked(mg)
    nodes = {n.name: n for n in mg.nodes()}
    corr = f.correspondence("t0")
    rep = f.instances("t0")[0]
    assert list(corr) == list(rep.nodes) and len(corr) == f.templates[0].num_nodes
    for name, names in corr.items():
        assert names[0] == name and len(names) == 3 and len(set(names)) == 3
        assert len({nodes[x].target for x in names}) == 1
        assert len({nodes[x].meta["autopar"].shape for x in names}) == 1
        assert len({nodes[x].meta["autopar"].scope.split(".", 2)[2:] == [] for x in names}) == 1


def test_deterministic_across_captures():
    f = fold(_zoo("llama-tiny"))
    model, args, kwargs = build("llama-tiny", batch=2, seed=1)  # other weights, same structure
    assert fold(capture(model, args, kwargs)) == f


def test_different_shapes_give_different_hashes():
    a, b = fold(_zoo("gpt-tiny")), fold(_zoo("gpt-tiny", seq=16))
    assert a.templates[0].num_nodes == b.templates[0].num_nodes
    assert a.templates[0].hash != b.templates[0].hash


@pytest.mark.parametrize("mib", [6, 5, 4])
def test_no_fold_search_chunks_the_same_regions(mib):
    """--no-fold is the oracle of the folded search, so its space is the same: activation chunking
    chunks a template's region in its first instances (all, or as few as close the gap) under both
    (no_fold keeps the folding it unrolls for that), and both pick the same plan when memory binds."""
    from search.baseline import enumerate_candidates
    from search.cluster import get_cluster
    from search.strategy import ilp_select

    mg = capture(*build("gpt-tiny", batch=2, seq=1024), name="gpt-tiny")
    wins = [enumerate_candidates(mg, get_cluster("a100-80g", 2), global_batch=2, dtype="bf16", select=ilp_select,
                                 folding=f, memory_limit=mib * 2**20, fix={"recompute": "none", "sp": 1})[0]
            for f in (fold(mg), no_fold(mg))]
    assert wins[0].chunking and wins[0].chunking[0]["scope"] in ("blocks.*.mlp", "blocks.0.mlp")
    assert [(w.key(), w.chunking, w.step_time_s) for w in wins][0] == [(w.key(), w.chunking, w.step_time_s) for w in wins][1]


def _six_layers(family: str):
    spec = {"gpt": "gpt-tiny", "llama": "llama-tiny", "bert": "bert-tiny"}[family]
    cfg = dataclasses.replace(zoo.get(spec).config, layers=6)
    cls = {"gpt": GPT, "llama": Llama, "bert": Bert}[family]
    with torch.device("meta"):
        model = cls(cfg)
    ids = torch.zeros(2, 32, dtype=torch.long, device="meta")
    return capture(model, (ids, ids), name=f"{family}-6")


@pytest.mark.parametrize("family", ["gpt", "llama", "bert", "hf:gpt2"])
def test_megatron_sp_on_the_excerpt_equals_the_whole_graph(family):
    """The Megatron-SP layout propagated on three instances per template (weighted) prices exactly what
    propagating it on every instance does; the excerpt keeps 3 of the k blocks."""
    if family == "hf:gpt2":
        lm = resolve_model("hf:gpt2", batch=2, seq=16)
        mg = capture(lm.model, lm.args, lm.kwargs, name="gpt2")
    else:
        mg = _six_layers(family)
    folded, unfolded = fold(mg), no_fold(mg)
    (t,) = folded.templates
    ex = excerpt(mg.gm, folded)
    kept = {n.name for n in ex.gm.graph.nodes}
    blocks = [r for r in folded.regions if r.template]
    assert [bool(set(r.nodes) & kept) for r in blocks] == [True, True] + [False] * (len(blocks) - 3) + [True]
    assert {ex.weight[n] for n in blocks[1].nodes} == {len(t.instances) - 2}
    assert excerpt(mg.gm, unfolded).weight == {}  # --no-fold: the whole graph, unweighted
    for tp in (2, 4):
        a = build_space(mg, tp, folded).megatron_sp(mg)
        b = build_space(mg, tp, unfolded).megatron_sp(mg)
        assert (a is None) == (b is None), (family, tp)
        if a is None:  # Hugging Face GPT-2: its Conv1D projections flatten the tokens ([B*S, H] addmm)
            assert family == "hf:gpt2"
            continue
        assert sorted(a.gathers) == sorted(b.gathers) and len(a.gathers) > 0
        assert (a.grad_sums, a.grad_sum_count) == (b.grad_sums, b.grad_sum_count)
        for f in dataclasses.fields(a.delta):
            x, y = getattr(a.delta, f.name), getattr(b.delta, f.name)
            assert x == pytest.approx(y, rel=1e-12, abs=1e-6), (family, tp, f.name)
        assert a.delta.mem_bytes < 0 and a.delta.act_bytes < 0  # it does move work off the ranks
