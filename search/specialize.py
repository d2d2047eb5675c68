"""A symbolic capture at one point: the concrete ``ModelGraph`` a capture at (B, S) would give, without tracing.

    >>> from examples.zoo import build
    >>> from planner.capture import capture_symbolic
    >>> at = Specializer(capture_symbolic(*build("gpt-tiny", batch=2, seq=8), name="gpt-tiny"))
    >>> mg = at(4, 16)
    >>> mg.batch_size, mg.seq_len, [n.meta["autopar"].shape for n in mg.nodes()][:2]
    (4, 16, [(16,), (4, 16, 64)])

Range planning (``search.range``) searches many points of one model; tracing it again at each point
(torch.export: seconds) is what the symbolic capture avoids. :class:`Specializer` compiles every
expression of the symbolic graph once — the ``NodeInfo`` facts and shapes, the saved-activation census
(``search.saved``), the sizes and strides of every traced value — into one function
(:func:`search.symbolic.evaluator`, exact integers), and each call writes those values into one
concrete copy of the graph (made on first use, with the shape arithmetic of the symbolic graph,
``sym_size``, taken out): meta tensors of the point's sizes, ``NodeInfo`` of ints, the sizes the shape
arithmetic computed as constants in its users' arguments. The concrete search then runs on it as on a
capture at that point (``tests/test_range.py`` checks both give the same plan).
"""
from __future__ import annotations

import dataclasses
import functools

import sympy
import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from search.chunking import ChunkRegion, chunk_regions, peak_above
from search.fold import Excerpt, Folding, excerpt, fold
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

        self._vals: dict[str, tuple] = {}      # node -> (its val's leaves with every size an index, pytree spec
                                               # or None for a single leaf)
        self._base = {n.name: n.meta for n in mg.gm.graph.nodes}  # the symbolic metadata a point rewrites
        self._infos: dict[str, dict] = {}      # node -> NodeInfo field -> index (or tuple of indices)
        self._saved: dict[str, int] = {}
        for node in mg.gm.graph.nodes:
            leaves, spec = tree_flatten(node.meta.get("val"))
            leaves = [_Indexed.of(x, index) for x in leaves]
            self._vals[node.name] = (leaves[0], None) if spec.is_leaf() else (leaves, spec)
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
        # the shape arithmetic: nodes whose value is a size, constants at a point
        self._sizes = {n.name for n in mg.gm.graph.nodes if n.op == "call_function" and _is_size(self._vals[n.name][0])
                       and self._vals[n.name][1] is None}
        self._graphs = None   # the graph and its folding excerpt every point rewrites (:meth:`_concrete`)

    def __call__(self, b: int, s: int) -> ModelGraph:
        """The graph at batch ``b`` and sequence ``s`` (either is ignored where the capture kept it concrete).

        Every call returns the same graph (and the same folding excerpt of it, ``search.fold.excerpt``)
        with its metadata and size constants rewritten for the new point: a returned ``ModelGraph`` is
        valid until the next call."""
        b = b if self.mg.batch_size == B else self.mg.batch_size
        s = s if self.mg.seq_len == S else self.mg.seq_len
        v = self._values(b, s)
        if self._graphs is None:
            ex = excerpt(self.mg.gm, self.folding)
            self._graphs = self._concrete(self.mg.gm), ex.gm is not self.mg.gm and (self._concrete(ex.gm), ex.weight)
        (gm, sizes), ex = self._graphs
        metas = self._rewrite(gm, v)
        _write_sizes(sizes, v)
        gm.meta = {"folding": self.folding}
        if ex:
            (ex_gm, ex_sizes), weight = ex
            for node in ex_gm.graph.nodes:
                node.meta.clear()
                node.meta.update(metas[node.name])
            _write_sizes(ex_sizes, v)
            gm.meta["excerpt"] = (self.folding, Excerpt(ex_gm, weight))
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
        folding = fold(self.mg)
        return dataclasses.replace(folding, regions=tuple(
            dataclasses.replace(r, inputs=tuple(n for n in r.inputs if n not in self._sizes)) for r in folding.regions))

    def _rewrite(self, gm: fx.GraphModule, v: list[int]) -> dict[str, dict]:
        """Write every node's metadata at the point ``v`` into ``gm``; returns node name -> its metadata."""
        metas, made = {}, {}
        for node in gm.graph.nodes:
            name = node.name
            val, spec = self._vals[name]
            meta = self._base[name]
            if spec is None:
                meta = dict(meta, val=val.value(v, made) if isinstance(val, _Indexed) else val)
            else:
                meta = dict(meta, val=tree_unflatten([x.value(v, made) if isinstance(x, _Indexed) else x for x in val],
                                                     spec))
            if name in self._infos:
                meta["autopar"] = dataclasses.replace(meta["autopar"], **{
                    f: tuple(v[i] for i in idx) if f == "shape" else v[idx] for f, idx in self._infos[name].items()})
            if name in self._saved:
                meta["saved_bytes"] = v[self._saved[name]]
            node.meta.clear()  # in place: assigning a node's attribute costs more than the rewrite
            node.meta.update(meta)
            metas[name] = meta
        return metas

    def _concrete(self, source: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, tuple]]:
        """A copy of ``source`` (a graph of the symbolic capture) for every point to rewrite: (graph
        module, node -> its (args, kwargs) with each size of the shape arithmetic as a :class:`_Size`).
        The shape arithmetic (``sym_size`` and integer ops on it) is gone: its value is a constant at a point."""
        graph = fx.Graph()
        graph.output(graph.graph_copy(source.graph, {}))
        slot = {n: _Size(self._vals[n.name][0].shape) if isinstance(self._vals[n.name][0], _Indexed)
                else self._vals[n.name][0] for n in graph.nodes if n.name in self._sizes}
        sizes = {}
        for node in graph.nodes:
            if node not in slot and any(a in slot for a in node.all_input_nodes):
                sub = lambda a: slot.get(a, a) if isinstance(a, fx.Node) else a  # noqa: E731
                sizes[node] = (tree_map(sub, node.args), tree_map(sub, node.kwargs))
                node.args, node.kwargs = _fill(sizes[node][0], None), _fill(sizes[node][1], None)
        for node in reversed(graph.nodes):
            if node in slot:
                graph.erase_node(node)
        # its Python code is generated only if it is ever run
        return _LazyGraphModule(source, graph), sizes

    def _chunk_regions(self, b: int, s: int) -> list[ChunkRegion]:
        """``search.chunking.chunk_regions`` at (b, s): probed once on the symbolic graph, evaluated here."""
        if self._regions is None:
            regions = chunk_regions(self.mg, self.folding)
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


def _write_sizes(sizes: dict[fx.Node, tuple], v: list[int]) -> None:
    """Each node's (args, kwargs) of ``sizes`` with the sizes at the point ``v``."""
    for node, (args, kwargs) in sizes.items():
        node.args, node.kwargs = _fill(args, v), _fill(kwargs, v)


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

    def value(self, v: list[int], made: dict):
        """The value at the point ``v``; ``made`` holds the meta tensors made for it so far, which
        nodes of one spec share (the search reads their sizes and dtypes only)."""
        if self.dtype is None:
            return v[self.shape]
        key = (tuple(v[i] for i in self.shape), tuple(v[i] for i in self.stride), self.dtype, self.requires_grad)
        if key not in made:
            made[key] = torch.empty_strided(key[0], key[1], dtype=self.dtype, device="meta",
                                            requires_grad=self.requires_grad)
        return made[key]
