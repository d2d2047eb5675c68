"""Costs as expressions in the batch B and the sequence S: derive once, evaluate at any (B, S).

    >>> from examples.zoo import build
    >>> from planner.capture import capture_symbolic
    >>> mg = capture_symbolic(*build("gpt-tiny", batch=2), name="gpt-tiny")
    >>> costs = SymbolicCosts(mg)
    >>> costs.total.fwd_flops
    512*B*S**2 + 214208*B*S + 65*S + 1
    >>> costs.total_at(4, 16).fwd_flops
    14234641

``planner.capture.capture_symbolic`` exports with ``torch.export.Dim`` batch and sequence dimensions;
every node's ``NodeInfo`` then holds sympy expressions made by the same formulas as a concrete capture
(``planner.capture.annotate`` runs them on ``torch.SymInt`` sizes and :func:`search.graph.expression` converts the
results). Export names its shape-env symbols after the input sources (``s24``, ``s13``: a hash, not
an order); the capture reads them off the placeholders' sizes at the marked dims and renames them B
and S, so every expression has exactly these two free symbols (positive integers).

:class:`SymbolicCosts` simplifies (``sympy.factor``) each node of a template's representative once and
gives every instance the same expressions, sums each template once per instance, and totals the
model as Σ instances × template + the nodes outside templates. One generated function
(:func:`evaluator`, ``sympy.lambdify``) evaluates all distinct expressions at a point in exact
integer arithmetic (quotients are ``fractions.Fraction``), so sweeping (B, S) re-derives nothing.

Limits:

- Parameters are fixed by the model that was built: a position table sized by the config (GPT, BERT)
  is read as is, so the expressions of S beyond the table's length are those of a model whose
  embedding would index out of range (a concrete capture there needs a longer table).
- Code that compares B or S with a constant fixes it and the capture fails with a ``CaptureError``
  naming the line: the zoo's DiT adds a ``temporal_pos`` table of ``frames`` rows to the latents, so
  its sequence (frames) cannot be symbolic; it is captured with ``seq_dims=()`` (B symbolic only).
- Sizes that depend on data (``nonzero``, masks selected by value) have no expression in B and S; the
  capture rejects them naming the node.
- Export specialises the sizes 0 and 1, so the example inputs need B, S ≥ 2. The expressions hold for
  1 ≤ B ≤ 2**20 and 2 ≤ S ≤ 2**21 (``planner.capture.MAX_BATCH``/``MAX_SEQ``): at S = 1 a transposed
  tensor is already contiguous and a concrete capture drops the copy the symbolic graph keeps. Code
  whose sizes only work from a larger minimum (a pooling window of 2 guards ``S // 2 != 1``) is rejected
  like a specialisation.
- The saved-activation census (``search.saved``) runs on the capture's fake tensors too, so
  ``node.meta["saved_bytes"]`` is an expression (the eager-attention [B, heads, S, S] softmax is the
  S² term). At B = 1 an eager matmul saves views of q, k, v where it copies them for B ≥ 2: per node the
  bytes move from the matmuls to the projection, the total agrees.
- Only the node facts are symbolic here; communication and memory of a parallel plan are the cost
  model's functions of these facts (range planning builds them from :class:`SymbolicCosts`).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import sympy
from sympy.printing.pycode import PythonCodePrinter

from search.fold import Folding, fold
from search.graph import ModelGraph

B, S = sympy.symbols("B S", integer=True, positive=True)
SYMBOLS = {"B": B, "S": S}


class Facts(NamedTuple):
    """The per-node facts that scale with B and S (``NodeInfo`` fields of the same names)."""

    fwd_flops: int
    bwd_flops: int
    bytes_read: int
    bytes_written: int
    output_bytes: int


FACTS = Facts._fields


class SymbolicCosts:
    """Per-node, per-template and whole-model :class:`Facts` of a symbolic capture, compiled once.

    ``nodes[name]``: the node's expressions (instances share their representative's);
    ``templates[tid]``: the sum over one instance of template ``tid`` (``instances[tid]`` of them);
    ``total``: the whole graph. ``*_at(b, s)`` evaluate them exactly (ints).
    """

    def __init__(self, mg: ModelGraph, folding: Folding | None = None):
        folding = fold(mg) if folding is None else folding
        infos = {n.name: n.meta["autopar"] for n in mg.nodes()}
        rep = {}
        for t in folding.templates:
            for first, names in folding.correspondence(t.id).items():
                rep.update(dict.fromkeys(names, first))
        simplified: dict[str, Facts] = {}
        for name in infos:
            r = rep.get(name, name)
            if r not in simplified:
                simplified[r] = Facts(*(sympy.factor(getattr(infos[r], f)) for f in FACTS))
        self.nodes: dict[str, Facts] = {name: simplified[rep.get(name, name)] for name in infos}
        self.instances = {t.id: len(t.instances) for t in folding.templates}
        self.templates = {t.id: _sum(self.nodes[n] for n in folding.instances(t.id)[0].nodes)
                          for t in folding.templates}
        outside = [self.nodes[n] for r in folding.regions if r.template is None for n in r.nodes]
        self.total = _sum([Facts(*(k * e for e in self.templates[t])) for t, k in self.instances.items()] + outside)

        distinct: dict[sympy.Expr, int] = {}
        for facts in [*simplified.values(), *self.templates.values(), self.total]:
            for e in facts:
                distinct.setdefault(e, len(distinct))
        self._index = {name: [distinct[e] for e in facts] for name, facts in simplified.items()}
        self._rep = {name: rep.get(name, name) for name in infos}
        self._template_index = {t: [distinct[e] for e in facts] for t, facts in self.templates.items()}
        self._total_index = [distinct[e] for e in self.total]
        self._values = evaluator(list(distinct))

    def nodes_at(self, b: int, s: int) -> dict[str, Facts]:
        """Every node's facts at batch ``b`` and sequence ``s``."""
        v = self._values(b, s)
        per_rep = {r: Facts(*(v[i] for i in idx)) for r, idx in self._index.items()}
        return {name: per_rep[r] for name, r in self._rep.items()}

    def templates_at(self, b: int, s: int) -> dict[str, Facts]:
        """Template id -> the facts of one of its instances at (b, s)."""
        v = self._values(b, s)
        return {t: Facts(*(v[i] for i in idx)) for t, idx in self._template_index.items()}

    def total_at(self, b: int, s: int) -> Facts:
        """The whole graph's facts at (b, s)."""
        v = self._values(b, s)
        return Facts(*(v[i] for i in self._total_index))


def evaluator(exprs: list[sympy.Expr], symbols: tuple[sympy.Symbol, ...] = (B, S)):
    """``f(*values) -> [int, ...]``: ``exprs`` (integer-valued) compiled into one Python function that
    evaluates them in exact arithmetic: a quotient (a cost divided by a parallel degree, a floor of a
    strided length) is a ``fractions.Fraction``, never a float, so values beyond 2**53 stay exact."""
    fn = sympy.lambdify(symbols, list(exprs), printer=_ExactPrinter,
                        modules=[{"Fraction": Fraction, "math": math}], docstring_limit=0)
    return lambda *values: [int(v) for v in fn(*values)]


def _sum(rows) -> Facts:
    rows = list(rows)
    return Facts(*(sympy.factor(sympy.Add(*col)) for col in zip(*rows))) if rows else Facts(*[sympy.Integer(0)] * len(FACTS))


class _ExactPrinter(PythonCodePrinter):
    """Python code that stays in integers: a quotient is a ``Fraction``, never a float division."""

    def _print_Rational(self, expr):
        return f"Fraction({expr.p}, {expr.q})"

    def _print_Mul(self, expr):
        return self._quotient(expr) or super()._print_Mul(expr)

    def _print_Pow(self, expr, rational=False):
        return self._quotient(expr) or super()._print_Pow(expr, rational)

    def _quotient(self, expr) -> str | None:
        num, den = expr.as_numer_denom()
        return None if den == 1 else f"Fraction({self._print(num)}, {self._print(den)})"
