"""A symbolic capture at one point: the concrete ``ModelGraph`` a capture at (B, S) would give, without tracing.

    >>> from examples.zoo import build
    >>> from planner.capture import capture_symbolic
    >>> at = Specializer(capture_symbolic(*build("gpt-tiny", batch=2, seq=8), name="gpt-tiny"))
    >>> mg = at(4, 16)
    >>> mg.batch_size, mg.seq_len, next(mg.nodes()).meta["autopar"].shape
    (4, 16, (4, 16, 64))

Range planning (``search.range``) searches many points of one model; tracing it again at each point
(torch.export: seconds) is what the symbolic capture avoids. :class:`Specializer` compiles every
expression of the symbolic graph once — the ``NodeInfo`` facts and shapes, the saved-activation census
(``search.saved``), the sizes and strides of every traced value — into one function
(:func:`search.symbolic.evaluator`, exact integers), and each call copies the graph with those values
substituted: meta tensors of the point's sizes, ``NodeInfo`` of ints, the shape arithmetic of the
symbolic graph (``sym_size``) replaced by its value. The concrete search then runs on the copy as on a
capture at that point (``tests/test_range.py`` checks both give the same plan).
"""
from __future__ import annotations

import dataclasses
import functools

import sympy
import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils._pytree import tree_map

from search.chunking import ChunkRegion, chunk_regions, peak_above
from search.fold import Folding, fold
from search.graph import ModelGraph, expression
from search.saved import Census
from search.symbolic import FACTS, B, S, evaluator


class Specializer:
    """``Specializer(mg)(b, s)`` -> ``mg`` at batch ``b`` and sequence ``s`` (``mg`` from ``capture_symbolic``)."""

    def __init__(self, mg: ModelGraph):
        self.mg = mg
        symbols = mg.gm.meta["symbols"]
        exprs: dict[sympy.Expr, int] = {}

        def index(value) -> int:
            e = expression(value, symbols) if isinstance(value, torch.SymInt) else sympy.sympify(value)
            return exprs.setdefault(e, len(exprs))

        self._vals: dict[str, object] = {}     # node -> its val with every size an index
        self._infos: dict[str, dict] = {}      # node -> NodeInfo field -> index (or tuple of indices)
        self._saved: dict[str, int] = {}
        for node in mg.gm.graph.nodes:
            self._vals[node.name] = tree_map(lambda v: _Indexed.of(v, index), node.meta.get("val"))
            if "autopar" in node.meta:
                info = node.meta["autopar"]
                fields = {f: index(getattr(info, f)) for f in FACTS if f != "output_bytes"}
                fields["output_bytes"] = index(info.output_bytes)
                if info.shape is not None:
                    fields["shape"] = tuple(index(d) for d in info.shape)
                self._infos[node.name] = fields
            if "saved_bytes" in node.meta:
                self._saved[node.name] = index(node.meta["saved_bytes"])
        census = mg.gm.meta.get("saved_census")
        self._census = census and (census, {k: index(v) for k, v in census.nbytes.items()})
        self._values = evaluator(list(exprs))
        self._regions = None  # the symbolic chunk regions and their evaluator, on first use
        self._graph = None    # the graph every point rewrites (:meth:`_concrete_graph`), on first use

    def __call__(self, b: int, s: int) -> ModelGraph:
        """The graph at batch ``b`` and sequence ``s`` (either is ignored where the capture kept it concrete).

        Every call returns the same graph with its metadata and size constants rewritten for the new
        point: a returned ``ModelGraph`` is valid until the next call."""
        b = b if self.mg.batch_size == B else self.mg.batch_size
        s = s if self.mg.seq_len == S else self.mg.seq_len
        v = self._values(b, s)
        if self._graph is None:
            self._graph = self._concrete_graph()
        gm, base, sizes = self._graph
        for node in gm.graph.nodes:
            meta = base[node.name]
            val = tree_map(lambda x: x.value(v) if isinstance(x, _Indexed) else x, self._vals[node.name])
            node.meta = dict(meta, val=val)
            if node.name in self._infos:
                node.meta["autopar"] = dataclasses.replace(meta["autopar"], **{
                    f: tuple(v[i] for i in idx) if f == "shape" else v[idx] for f, idx in self._infos[node.name].items()})
            if node.name in self._saved:
                node.meta["saved_bytes"] = v[self._saved[node.name]]
        for node, (args, kwargs) in sizes.items():
            node.args, node.kwargs = _fill(args, v), _fill(kwargs, v)
        gm.meta = {"folding": self.folding}
        if self._census:
            census, nbytes = self._census
            gm.meta["saved_census"] = Census(census.owner, {k: v[i] for k, i in nbytes.items()}, census.savers,
                                             census.out_storage)
        gm.meta["chunk_regions"] = functools.partial(self._chunk_regions, b, s)
        return dataclasses.replace(self.mg, gm=gm, batch_size=b, seq_len=s, warnings=list(self.mg.warnings))

    @functools.cached_property
    def folding(self) -> Folding:
        """The symbolic graph's folding: a point's graph has the same nodes and the same repeats, and its
        regions take no sizes as inputs (the shape arithmetic is constants there)."""
        sizes = {n.name for n in self.mg.gm.graph.nodes if n.op == "call_function" and _is_size(self._vals[n.name])}
        folding = fold(self.mg)
        return dataclasses.replace(folding, regions=tuple(
            dataclasses.replace(r, inputs=tuple(n for n in r.inputs if n not in sizes)) for r in folding.regions))

    def _concrete_graph(self) -> tuple[fx.GraphModule, dict[str, dict], dict[fx.Node, tuple]]:
        """The copy every point rewrites: (graph module, node -> the symbolic node's metadata, node ->
        its (args, kwargs) with each size of the shape arithmetic as a :class:`_Size`). The shape
        arithmetic (``sym_size`` and integer ops on it) is gone: its value is a constant at a point."""
        graph = fx.Graph()
        graph.output(graph.graph_copy(self.mg.gm.graph, {}))
        base = {n.name: n.meta for n in self.mg.gm.graph.nodes}
        arithmetic = {n for n in graph.nodes if n.op == "call_function" and _is_size(self._vals[n.name])}
        slot = {n: _Size(self._vals[n.name].shape) if isinstance(self._vals[n.name], _Indexed) else self._vals[n.name]
                for n in arithmetic}
        sizes = {}
        for node in graph.nodes:
            if node not in arithmetic and any(a in slot for a in node.all_input_nodes):
                sub = lambda a: slot.get(a, a) if isinstance(a, fx.Node) else a  # noqa: E731
                sizes[node] = (tree_map(sub, node.args), tree_map(sub, node.kwargs))
                node.args, node.kwargs = _fill(sizes[node][0], None), _fill(sizes[node][1], None)
        for node in reversed(graph.nodes):
            if node in arithmetic:
                graph.erase_node(node)
        # its Python code is generated only if it is ever run
        return _LazyGraphModule(self.mg.gm, graph), base, sizes

    def _chunk_regions(self, b: int, s: int) -> list[ChunkRegion]:
        """``search.chunking.chunk_regions`` at (b, s): probed once on the symbolic graph, evaluated here."""
        if self._regions is None:
            regions = chunk_regions(self.mg, fold(self.mg))
            exprs = [sympy.sympify(e) for r in regions for e in (r.size, r.saved_bytes, r.grad_input_bytes,
                                                                  r.fwd_flops, r.fwd_mem_bytes, *r.transient_bytes)]
            self._regions = regions, evaluator(exprs)
        regions, values = self._regions
        v = iter(values(b, s))
        out = []
        for r in regions:
            size, saved, grad_in, flops, moved = (next(v) for _ in range(5))
            timeline = [next(v) for _ in r.transient_bytes]
            out.append(dataclasses.replace(r, size=size, saved_bytes=float(saved), grad_input_bytes=float(grad_in),
                                           fwd_flops=float(flops), fwd_mem_bytes=float(moved),
                                           transient_bytes=float(peak_above(timeline))))
        return out


def _is_size(val) -> bool:
    """Whether a traced value is a size (an int at every point), not a tensor."""
    return isinstance(val, int) or (isinstance(val, _Indexed) and val.dtype is None)


@dataclasses.dataclass(frozen=True)
class _Size:
    """A size of the shape arithmetic in a node's arguments: an index into the compiled expressions."""

    index: int


def _fill(args, v: list[int] | None):
    """``args`` with every :class:`_Size` replaced by its value in ``v`` (by 1 when ``v`` is None:
    a placeholder until the first point is written)."""
    return tree_map(lambda a: (1 if v is None else v[a.index]) if isinstance(a, _Size) else a, args)


@dataclasses.dataclass(frozen=True)
class _Indexed:
    """A traced value with its sizes as indices into the compiled expressions: a tensor (shape,
    stride, dtype, requires_grad) or a size (``sym_size``)."""

    shape: tuple | int
    stride: tuple = ()
    dtype: torch.dtype | None = None
    requires_grad: bool = False

    @classmethod
    def of(cls, value, index):
        if isinstance(value, torch.Tensor):
            return cls(tuple(index(d) for d in value.shape), tuple(index(d) for d in value.stride()), value.dtype,
                       value.requires_grad)
        if isinstance(value, torch.SymInt):
            return cls(index(value))
        return value

    def value(self, v: list[int]):
        if self.dtype is None:
            return v[self.shape]
        return torch.empty_strided([v[i] for i in self.shape], [v[i] for i in self.stride], dtype=self.dtype,
                                   device="meta", requires_grad=self.requires_grad)
