"""Symbolic capture (issue 8): per-node facts as expressions in B and S agree with concrete captures."""
from __future__ import annotations

import functools
from pathlib import Path
import resource

import pytest
import sympy
import torch

from examples.zoo import MODELS, build
from planner.capture import capture, capture_symbolic
from search.errors import BadInput, CaptureError
from search.fold import fold
from search.saved import annotate_saved
from search.symbolic import FACTS, B, S, SymbolicCosts, evaluator

# (B, S) points: B = 1 included, S within the tiny presets' position tables (32); S >= 2 (see symbolic.py)
POINTS = [(1, 7), (2, 16), (3, 5), (4, 32), (7, 2)]
SEQ_DIMS = {"evoformer-tiny": (1, 2), "dit-tiny": ()}  # the DiT's frames are tied to its temporal table
MODELS_CHECKED = ["gpt-tiny", "llama-tiny", "bert-tiny", "evoformer-tiny", "dit-tiny", "gpt2-small", "llama2-7b"]


@functools.lru_cache(maxsize=None)
def _symbolic(name: str):
    """(graph, costs, growth of the peak RSS in bytes while capturing) of preset ``name`` at B=2, S=8."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mg = capture_symbolic(*build(name, batch=2, seq=8 if name not in SEQ_DIMS else None), name=name,
                          seq_dims=SEQ_DIMS.get(name, (1,)))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    return mg, SymbolicCosts(mg), grown


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "bert-tiny"])
def test_saved_activation_census_is_symbolic_too(name):
    """``search.saved`` on the symbolic graph: each node's saved bytes evaluate to the concrete census."""
    mg, _, _ = _symbolic(name)
    sym_nodes = list(mg.nodes())
    total = sum(n.meta["saved_bytes"] for n in sym_nodes)
    assert total.free_symbols == {B, S}
    for b, s in POINTS:
        mc = capture(*build(name, batch=b, seq=s), name=name)
        annotate_saved(mc.gm)
        got = [n.meta["saved_bytes"].subs({B: b, S: s}) for n in sym_nodes]
        assert got == [n.meta["saved_bytes"] for n in mc.nodes()], (b, s)


def test_eager_attention_census_at_batch_one():
    """At B = 1 an eager matmul saves views of q, k, v where it copies them for B >= 2: the bytes move
    from the matmuls to the projection, and the total agrees."""
    mg = capture_symbolic(*build("gpt-tiny-eager", batch=2, seq=8), name="eager")
    total = sum(n.meta["saved_bytes"] for n in mg.nodes())
    assert sympy.degree(total, S) == 2  # the [B, heads, S, S] softmax
    for b, s in [(1, 7), (2, 16), (3, 5)]:
        mc = capture(*build("gpt-tiny-eager", batch=b, seq=s), name="eager")
        annotate_saved(mc.gm)
        assert total.subs({B: b, S: s}) == sum(n.meta["saved_bytes"] for n in mc.nodes()), (b, s)


def test_llama2_7b_symbolic_capture_allocates_no_parameters():
    mg, _, grown = _symbolic("llama2-7b")
    params = list(mg.gm.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    assert abs(mg.num_params - 6.74e9) / 6.74e9 < 0.01
    assert grown < 2 * 2**30  # its fp32 weights would be 27 GB
    assert (mg.batch_size, mg.seq_len) == (B, S)


@pytest.mark.parametrize("name", MODELS_CHECKED)
def test_symbolic_facts_equal_concrete_capture(name):
    mg, costs, _ = _symbolic(name)
    sym_nodes = list(mg.nodes())
    symbols = {B, S} if SEQ_DIMS.get(name, (1,)) else {B}
    for n in sym_nodes:
        info = n.meta["autopar"]
        assert all(isinstance(getattr(info, f), sympy.Expr) for f in FACTS)
        assert set().union(*(getattr(info, f).free_symbols for f in FACTS)) <= symbols, n.name
    # S enters quadratically (attention) where the sequence is symbolic
    assert sympy.degree(costs.total.fwd_flops, S) >= (2 if S in symbols else 0)
    assert sympy.degree(costs.total.fwd_flops, B) == 1
    shape_of = evaluator([d for n in sym_nodes for d in (n.meta["autopar"].shape or ())])

    for b, s in POINTS:
        seq = s if S in symbols else MODELS[name].config.frames
        mc = capture(*build(name, batch=b, seq=seq if S in symbols else None), name=name)
        conc_nodes = list(mc.nodes())
        assert len(conc_nodes) == len(sym_nodes), (b, s)
        at = costs.nodes_at(b, seq)
        shapes = iter(shape_of(b, seq))
        for sn, cn in zip(sym_nodes, conc_nodes):
            si, ci = sn.meta["autopar"], cn.meta["autopar"]
            assert (si.op, si.scope, si.params, si.dtype) == (ci.op, ci.scope, ci.params, ci.dtype), (sn, cn)
            shape = tuple(next(shapes) for _ in si.shape) if si.shape is not None else None
            assert shape == ci.shape, (sn.name, b, s)
            got = at[sn.name]
            want = tuple(getattr(ci, f) for f in FACTS)
            assert tuple(got) == want and all(type(v) is int for v in got), (sn.name, si.op, b, s, got, want)

        # per template: one instance's sum equals each instance's concrete sum; the total multiplies it out
        conc = {x.name: y.meta["autopar"] for x, y in zip(sym_nodes, conc_nodes)}
        per_template = costs.templates_at(b, seq)
        folding = fold(mg)
        for t in folding.templates:
            for region in folding.instances(t.id):
                sums = tuple(sum(getattr(conc[x], f) for x in region.nodes) for f in FACTS)
                assert tuple(per_template[t.id]) == sums, (t.id, region.scope, b, s)
        assert tuple(costs.total_at(b, seq)) == tuple(sum(getattr(i, f) for i in conc.values()) for f in FACTS)


@pytest.mark.parametrize("name", [m for m in MODELS_CHECKED if m not in ("gpt2-small", "llama2-7b")])
def test_symbolic_graph_folds_like_the_concrete_one(name):
    mg, _, _ = _symbolic(name)
    concrete = capture(*build(name, batch=2, seq=8 if name not in SEQ_DIMS else None), name=name)
    assert [t.instances for t in fold(mg).templates] == [t.instances for t in fold(concrete).templates]
    assert fold(mg).templates


def test_template_instances_share_expressions_and_evaluation_rederives_nothing(monkeypatch):
    mg, costs, _ = _symbolic("llama2-7b")
    folding = fold(mg)
    (t,) = folding.templates
    assert costs.instances == {t.id: 32}
    for names in folding.correspondence(t.id).values():
        assert all(costs.nodes[x] is costs.nodes[names[0]] for x in names)  # simplified once per template

    def boom(*a, **k):
        raise AssertionError("evaluation must not derive expressions")

    for fn in ("factor", "simplify", "lambdify", "expand"):
        monkeypatch.setattr(sympy, fn, boom)
    sweep = [costs.total_at(b, s) for b in (1, 2, 4, 8) for s in (2**k for k in range(1, 22))]
    assert len(sweep) == 84 and len(costs.nodes_at(1, 4096)) == len(list(mg.nodes()))
    monkeypatch.undo()
    # exact beyond 2**53: the largest point agrees with sympy's own integer arithmetic
    big = {B: 2**20, S: 2**21}
    assert tuple(costs.total_at(2**20, 2**21)) == tuple(int(e.xreplace(big)) for e in costs.total)
    assert costs.total_at(2**20, 2**21).fwd_flops > 2**80


def test_evaluator_is_exact_for_quotients_and_floors():
    f = evaluator([sympy.floor(S / 2) * B, B * S / 8, 3 * S**2 / B + sympy.Rational(1, 2)])
    b, s = 2**40 + 8, 2**41 + 1
    assert f(b, s) == [(s // 2) * b, b * s // 8, (6 * s**2 + b) // (2 * b)]


def test_specialized_sequence_names_the_line():
    with pytest.raises(CaptureError) as ei:
        capture_symbolic(*build("dit-tiny", batch=2), name="dit-tiny")
    msg = str(ei.value)
    assert "S symbolic" in msg and "dit.py:" in msg and "temporal_pos" in msg and "seq_dims=()" in msg
    assert "\n" not in msg and ei.value.__cause__ is None


class _Bounded(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = torch.nn.Parameter(torch.zeros(16, 4))
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        torch._check(x.shape[1] <= 16)  # BOUND-LINE
        return self.lin(x + self.pos[: x.shape[1]])


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        return torch.nonzero(x).float().sum()


def test_bounded_and_data_dependent_sizes_are_capture_errors():
    with pytest.raises(CaptureError, match=r"S symbolic: .*test_symbolic.py:\d+ \(torch._check"):
        capture_symbolic(_Bounded(), (torch.randn(2, 8, 4),))
    with pytest.raises(CaptureError, match=r"nonzero .*depends on data"):
        capture_symbolic(_DataDependent(), (torch.randn(2, 8, 4),))


def test_keyword_inputs_and_bad_example_sizes():
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, input, *, mask):
            return (self.lin(input) * mask[..., None]).sum()

    mg = capture_symbolic(Masked(), (torch.randn(3, 5, 4),), {"mask": torch.ones(3, 5)})
    linear = next(n.meta["autopar"] for n in mg.nodes() if n.meta["autopar"].op == "linear")
    assert linear.fwd_flops == 32 * B * S and linear.shape == (B, S, 4)
    with pytest.raises(BadInput, match="at least 2"):
        capture_symbolic(*build("gpt-tiny", batch=1))
    with pytest.raises(BadInput, match="mask"):
        capture_symbolic(Masked(), (torch.randn(3, 5, 4),), {"mask": torch.ones(3, 6)})


def test_capture_leaves_torch_logging_as_it_was():
    """The guard-site recorder turns the ShapeEnv's INFO records on only while export runs: afterwards
    torch's INFO logs (create_env, produce_guards) stay off, so the CLI prints none of them. A fresh
    process: pytest's logging plugin resets the loggers' level caches between phases, hiding the bug."""
    import subprocess
    import sys

    code = ("import logging; from examples.zoo import build; from planner.capture import capture, capture_symbolic\n"
            "capture_symbolic(*build('gpt-tiny', batch=2, seq=8), name='g')\n"
            "capture(*build('gpt-tiny', batch=2, seq=8), name='g')\n"
            "print(logging.getLogger('torch.fx.experimental.symbolic_shapes').isEnabledFor(logging.INFO))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).resolve().parent.parent))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False" and "create_env" not in done.stderr, done.stderr[-2000:]
