"""Sequence parallelism in the search: the sequence-sharding rules (search.seqshard), the variants'
traffic against DESIGN §4, and the planner's choice and explanation (search.baseline, plan JSON).

Exactness on real ranks lives in tests/test_attention.py (kernels, bytes vs ``traffic``) and
tests/test_emit.py (whole models under sp, sp × tp, sp × dp).
"""
from __future__ import annotations

import json

import pytest
import torch

from planner.api import make_plan_from_spec
from planner.capture import capture
from planner.plan import Plan
from search.errors import BadInput
from search.seqpar import SPChoice, choices, traffic
from search.seqshard import Seq, Unsupported, propagate_seq


def _graph(name, batch=2, seq=None, targets=True):
    from examples.zoo import build

    model, args, kwargs = build(name, batch=batch, seq=seq)
    return capture(model, args if targets else args[:1], kwargs, name=name)


# ------------------------------------------------------------ sequence-sharding rules

def test_llama_shards_tokens_and_indexes_rope_tables():
    mg = _graph("llama-tiny")
    lay = propagate_seq(mg.gm, seq_len=mg.seq_len, sp=2)
    assert lay.inputs == {"idx": 1, "targets": 1}
    assert len(lay.attention) == 2 and lay.loss == "cross_entropy_loss"
    nodes = {n.name: n for n in mg.gm.graph.nodes}
    # every position table read (cos and sin, for q and for k, in both layers) is a [S, head_dim] table
    assert len(lay.select_positions) == 8
    for name, i, dim in lay.select_positions:
        assert tuple(nodes[name].args[i].meta["val"].shape)[dim] == mg.seq_len
    # q/k/v views get the local sequence length; the flattened logits keep whole tokens
    assert lay.local_args["view"][1][1] == mg.seq_len // 2
    assert lay.placement["view_8"] == Seq(0)


def test_gpt_position_embedding_is_indexed():
    mg = _graph("gpt-tiny")
    lay = propagate_seq(mg.gm, seq_len=mg.seq_len, sp=4)
    # wte(idx) + wpe(arange(S)): the learned [S, hidden] position rows are taken at this rank's positions
    assert [(n, i, d) for n, i, d in lay.select_positions] == [("add", 1, 0)]


def test_per_token_output_is_refused_with_advice():
    mg = _graph("gpt-tiny", targets=False)  # returns logits
    with pytest.raises(Unsupported, match="pass the targets"):
        propagate_seq(mg.gm, seq_len=mg.seq_len, sp=2)


def test_explicit_mask_is_refused_naming_the_node():
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 8)
            self.register_buffer("mask", torch.ones(8, 8, dtype=torch.bool).tril())

        def forward(self, idx, y):
            x = self.emb(idx).view(2, 8, 2, 4).transpose(1, 2)
            out = torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=self.mask)
            return torch.nn.functional.mse_loss(out, y)

    idx = torch.zeros(2, 8, dtype=torch.long)
    mg = capture(Masked(), (idx, torch.zeros(2, 2, 8, 4)), {})
    with pytest.raises(Unsupported, match="scaled_dot_product_attention: attention with an explicit mask"):
        propagate_seq(mg.gm, seq_len=8, sp=2)


# ------------------------------------------------------------ variants and their traffic

def test_traffic_matches_design_formulas_for_mha():
    """DESIGN §4: Ulysses ≈ 4 s h / P per link (forward: q, k, v in, output back); the ring passes K and V
    blocks around, 2 s h (P−1)/P per device forward. h = H·D, s global, one sample, element size e."""
    s, H, D, e, P = 4096, 16, 64, 2, 8
    head = (s // P) * D * e  # one head of one rank's tokens
    uly = traffic("ulysses", head_bytes=head, heads=H, kv_heads=H, elem=e, degree=P)
    assert uly.total[0] == pytest.approx(4 * s * H * D * e / P * (P - 1) / P)
    ring = traffic("ring", head_bytes=head, heads=H, kv_heads=H, elem=e, degree=P)
    assert ring.total[0] == pytest.approx(2 * s * H * D * e * (P - 1) / P)
    assert ring.total[1] == pytest.approx(ring.total[0] * 3)  # bf16 K/V + fp32 dK/dV sums backward
    # the concentric ring moves the same bytes, the hybrid fewer than the ring (fewer ring hops)
    assert traffic("ring2d", head_bytes=head, heads=H, kv_heads=H, elem=e, degree=P, inner=4).total == ring.total
    usp = traffic("usp", head_bytes=head, heads=H, kv_heads=H, elem=e, degree=P, inner=2)
    assert sum(uly.total) < sum(usp.total) < sum(ring.total)


def test_choices_respect_heads_sequence_and_gqa():
    from search.seqpar import Attn

    a = Attn(q_bytes=1.0, kv_bytes=1.0, heads=4, kv_heads=4, fwd_flops=1.0, bwd_flops=1.0, causal=True)
    ok, why = choices(8, [a], seq_len=64)
    assert "ulysses" not in {c.variant for c in ok} and "does not divide the 4 attention heads" in why[0]
    assert SPChoice(8, "ring", layout="zigzag") in ok and SPChoice(8, "usp", 4, "zigzag") in ok
    ok, why = choices(8, [a], seq_len=72)  # 72 splits 8 ways but not into 16 zig-zag blocks
    assert not ok and "does not split into 16 blocks" in why[-1]
    gqa = Attn(1.0, 1.0, heads=12, kv_heads=3, fwd_flops=1.0, bwd_flops=1.0, causal=False)
    ok, why = choices(4, [gqa], seq_len=64)  # 4 and 3 kv heads do not divide one another
    assert [c.variant for c in ok if c.variant == "ulysses"] == [] and "kv heads" in why[0]
    assert SPChoice(4, "ring", layout="contiguous") in ok


# ------------------------------------------------------------ the planner's choice

def test_long_context_llama_chooses_sequence_parallelism_and_explains_it():
    plan = make_plan_from_spec("llama2-7b", cluster="h100-80g", devices=64, seq_len=131072)
    sp = plan.sequence_parallel
    assert plan.degrees["sp"] == sp["degree"] > 1
    assert plan.degrees["dp"] * plan.degrees["sp"] * plan.degrees["tp"] * plan.degrees["pp"] == 64
    assert dict(zip(plan.mesh["axes"], plan.mesh["shape"]))["sp"] == sp["degree"]
    # every variant priced for the chosen degree is listed; the chosen one is the cheapest
    best = min(sp["options"], key=lambda o: (o["exposed_s_per_step"], o["comm_bytes_per_step"]))
    assert best["exposed_s_per_step"] == sp["exposed_s_per_step"]
    assert {o["variant"] for o in sp["options"]} >= {"ring", "ulysses", "ring2d", "usp"}
    text = plan.explain()
    assert f"attention variants priced for sp={sp['degree']}" in text and "chosen" in text
    # without sequence parallelism the best plan is slower
    no_sp = make_plan_from_spec("llama2-7b", cluster="h100-80g", devices=64, seq_len=131072, fix={"sp": 1})
    assert no_sp.predicted["step_time_s"] > plan.predicted["step_time_s"]


def test_fix_sp_and_attention():
    plan = make_plan_from_spec("gpt-tiny", cluster="a100-80g", devices=8, fix={"sp": 4, "dp": 2, "attention": "ring2d"})
    sp = plan.sequence_parallel
    assert (plan.degrees["sp"], sp["variant"], sp["inner"], sp["layout"]) == (4, "ring2d", 2, "zigzag")
    assert plan.mesh == {"shape": [2, 4, 1], "axes": ["dp", "sp", "tp"]}
    again = make_plan_from_spec("gpt-tiny", cluster="a100-80g", devices=8, fix={"sp": 4, "dp": 2, "attention": "ring2d"})
    assert again.to_json() == plan.to_json()  # deterministic


def test_fix_sp_on_a_model_that_cannot_shard_says_why():
    with pytest.raises(BadInput, match="--fix sp=2: this model cannot be sharded on its sequence: .*explicit mask"):
        make_plan_from_spec("hf:llama:num_hidden_layers=1,hidden_size=64,intermediate_size=128,"
                            "num_attention_heads=4,num_key_value_heads=4,vocab_size=128",
                            cluster="a100-80g", devices=4, seq_len=32, fix={"sp": 2})


def test_fix_ulysses_beyond_the_heads_is_infeasible_with_reason():
    from search.errors import Infeasible

    with pytest.raises((BadInput, Infeasible), match="does not divide the 4 attention heads"):
        make_plan_from_spec("gpt-tiny", cluster="a100-80g", devices=8, fix={"sp": 8, "attention": "ulysses"})


def test_plan_json_sequence_parallel_is_validated():
    plan = make_plan_from_spec("gpt-tiny", cluster="a100-80g", devices=8, fix={"sp": 2, "attention": "ring"})
    d = json.loads(plan.to_json())
    bad = dict(d, sequence_parallel={})
    with pytest.raises(BadInput, match="sequence_parallel.*missing for degrees.sp = 2"):
        Plan.from_dict(bad)
    bad = dict(d, sequence_parallel=dict(d["sequence_parallel"], variant="teleport"))
    with pytest.raises(BadInput, match="sequence_parallel.variant"):
        Plan.from_dict(bad)
    bad = dict(d, sequence_parallel=dict(d["sequence_parallel"], inner=3))
    with pytest.raises(BadInput, match="sequence_parallel.inner"):
        Plan.from_dict(bad)


# ------------------------------------------------------------ DSP for spatial-temporal models

def test_dit_plans_dsp_with_the_switch_traffic_of_search_dsp():
    from search.dsp import dsp_layout, dsp_traffic

    plan = make_plan_from_spec("dit-tiny", cluster="a100-80g", devices=8, dtype="fp32", fix={"sp": 4, "dp": 2})
    sp = plan.sequence_parallel
    assert (sp["variant"], sp["degree"], sp["layout"]) == ("dsp", 4, "contiguous")
    mg = _graph("dit-tiny", batch=plan.global_batch)
    fwd, bwd = dsp_traffic(dsp_layout(mg.gm, 4), 4)  # the captured (global) batch; a rank has 1/dp of it
    assert sp["comm_bytes_per_step"] == (fwd + bwd) // plan.degrees["dp"]


def test_dit_refuses_token_attention_variants_with_reason():
    from search.errors import Infeasible

    with pytest.raises((BadInput, Infeasible), match="shards by DSP"):
        make_plan_from_spec("dit-tiny", cluster="a100-80g", devices=8, fix={"sp": 4, "attention": "ring"})


# ------------------------------------------------------------ Megatron sequence parallelism (inside tp)

def test_megatron_sp_priced_for_the_full_layout():
    from search.placement import megatron_sp_nodes
    from search.space import build_space, megatron_sp

    mg = _graph("gpt-tiny")
    space = build_space(mg, 2)
    msp = megatron_sp(mg, space)
    names = megatron_sp_nodes(mg.gm, space.layout(space.all_sharded()).styles, 2)
    nodes = {n.name: n for n in mg.gm.graph.nodes}
    saved = sum(nodes[n].meta["saved_bytes"] for n in names)  # search.saved census (norms' mean/rstd too)
    assert names and saved and msp.delta.act_bytes == pytest.approx(-saved / 2)  # they halve under tp=2
    assert msp.delta.fwd_flops == 0  # only token-wise, memory-bound work moves
    assert len(msp.gathers) == 2  # the embedding enters split, the LM head reads it gathered
    # sp=1: with sp free the planner prefers dp1 × sp2 × tp4 (Megatron-SP's one all-reduce per norm weight
    # costs more latency there)
    plan = make_plan_from_spec("gpt2-small", cluster="a100-80g", devices=8, fix={"tp": 4, "sp": 1})
    assert plan.megatron_sp and "megatron-sp" in plan.explain()


def test_megatron_sp_off_where_tp_rows_are_flattened():
    # Hugging Face GPT-2 projects [B·S, H] rows (addmm): the sequence dim is not at dim 1
    plan = make_plan_from_spec("hf:gpt2:n_layer=2,n_embd=64,n_head=4,vocab_size=128", cluster="a100-80g",
                               devices=8, seq_len=32, fix={"tp": 2, "dp": 4})
    assert plan.degrees["tp"] == 2 and not plan.megatron_sp
