"""Tensor-parallel strategy space: the Megatron cones of a graph and the per-rank work each one changes.

For a tensor-parallel degree ``tp`` every cone (``search.placement.megatron_cones``: colwise linears,
the region they shard, the rowwise linears that close it) is a binary choice: replicated or split
``tp`` ways. Work is additive over nodes, so a layout's :class:`Work` is the all-replicated base plus
the delta of each sharded cone. The ILP (``search.strategy``) picks the cones; the enumerator
(``search.baseline``) shards them all.

Folding (``search.fold``): a block is an instance of a template. Work inside blocks is summed on
the template's first instance and multiplied by the instance count, cones are found on the first
instance and mapped to the others by node position, and the cones at one position of every instance
are one choice, priced once. Building and pricing a space therefore costs O(template size + nodes
outside blocks), not O(depth). With ``no_fold`` every instance is its own template.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from functools import cached_property, lru_cache, partial
from typing import Callable

from search.fold import Folding, excerpt, excerpt_instances, fold, no_fold
from search.graph import ModelGraph
from search.placement import Cone, Unsupported, bias_of, megatron_cones, module_of, op_name, propagate, weight_of
from search.recompute import attention_cores
from search.saved import annotate_saved, checkpoint_bytes
from search.seqpar import Attn

COMPUTE_BOUND = {"linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "scaled_dot_product_attention", "convolution"}
NO_ACTIVATION = {"view", "reshape", "_unsafe_view", "transpose", "permute", "expand", "unsqueeze", "squeeze",
                 "slice", "select", "split", "chunk", "getitem", "t", "alias", "detach", "_assert_tensor_metadata",
                 "arange", "zeros", "ones", "full", "empty", "new_ones", "lift_fresh_copy"}


@dataclass
class Work:
    """Per tensor-parallel rank, for the captured batch: what a layout costs. Additive."""

    fwd_flops: float = 0.0          # matmul/attention FLOPs
    bwd_flops: float = 0.0
    wgrad_flops: float = 0.0        # the part of bwd_flops that computes weight gradients
    mem_bytes: float = 0.0          # bytes moved by memory-bound ops, forward + backward
    block_fwd_flops: float = 0.0    # forward work inside blocks (recomputed under full recompute)
    block_fwd_bytes: float = 0.0
    core_fwd_flops: float = 0.0     # forward work of attention cores (recomputed under selective recompute)
    core_fwd_bytes: float = 0.0
    params: int = 0                 # parameters one tp rank holds
    act_bytes: float = 0.0          # saved activations
    act_outside: float = 0.0        # saved activations outside blocks
    act_core: float = 0.0           # saved activations of attention cores (what selective recompute frees)
    allreduces: tuple[tuple[float, int], ...] = ()  # tp all-reduces: (logical bytes, how many), sorted
    attention: tuple[tuple[Attn, int], ...] = ()    # attention calls: (shapes and FLOPs, how many)

    def __add__(self, o: "Work") -> "Work":
        return Work(**{f: getattr(self, f) + getattr(o, f) for f in _ADDITIVE},
                    **{f: _merge(getattr(self, f), getattr(o, f)) for f in _COUNTED})

    def __sub__(self, o: "Work") -> "Work":
        return self + o.scaled(-1)

    def scaled(self, k: int) -> "Work":
        """``k`` copies (an instance count)."""
        return Work(**{f: k * getattr(self, f) for f in _ADDITIVE},
                    **{f: tuple((s, k * n) for s, n in getattr(self, f) if k) for f in _COUNTED})


_COUNTED = ("allreduces", "attention")
_ADDITIVE = tuple(f.name for f in fields(Work) if f.name not in _COUNTED)


def _merge(a: tuple, b: tuple) -> tuple:
    """Multiset sum of (item, count) pairs, sorted, zero counts dropped."""
    count = dict(a)
    for item, n in b:
        count[item] = count.get(item, 0) + n
    return tuple(sorted((item, n) for item, n in count.items() if n))


@dataclass
class Choice:
    """One ILP decision: how many cones, one per instance of a template position, to shard.
    Instances are identical, so only the count matters; the first ``n`` instances are sharded."""

    key: str                 # "t0/5": the cone at node 5 of template t0; "c3": a cone outside blocks
    template: str | None     # the template whose instances hold the cones
    instances: int
    cone: Callable[[int], Cone]  # the cone in instance j (mapped from the first on demand)
    unit: Work               # what sharding one of them changes

    def delta(self, n: int) -> Work:
        return self.unit.scaled(n)

    def styles(self, n: int) -> dict[str, tuple[str, int]]:
        return {m: s for j in range(n) for m, s in self.cone(j).styles}


@dataclass
class TPStats:
    """A priced tensor-parallel layout: which cones it shards and its per-rank work."""

    space: "Space"
    picks: dict[str, int]    # choice key -> instances sharded
    work: Work
    act_max_block: float     # saved activations of the largest block (full recompute rematerializes one)
    core_max_block: float    # what selective recompute frees in the largest block (rematerialized one at a time)

    @property
    def tp(self) -> int:
        return self.space.tp

    @property
    def block_inputs(self) -> float:
        return self.space.block_inputs

    @cached_property
    def styles(self) -> dict[str, tuple[str, int]]:
        """Module FQN -> (style, groups) of every sharded linear (built on demand: O(depth))."""
        out = {}
        for c in self.space.choices:
            out.update(c.styles(self.picks.get(c.key, 0)))
        return out


@dataclass
class RegionWork:
    """One region of the folding (a block, or a run of nodes outside blocks), for pipeline stages."""

    template: str | None
    work: Work               # replicated, with the parameters its nodes read
    keys: list[str]          # choices with one cone in this region
    input_bytes: float       # bytes of the values it reads from earlier regions (a stage cut sends them)


@dataclass
class Space:
    tp: int
    base: Work                              # everything replicated
    block_inputs: float                     # bytes of every block's input, summed (what full recompute keeps)
    block_acts: dict[str, tuple[int, Work]]  # template -> (instances, work of one replicated instance)
    choices: list[Choice]
    regions: list[RegionWork]               # graph order
    transient: float = 0.0                  # the largest backward transient, replicated (:func:`backward_transient`)
    # the emitted FSDP's units (each repeated block one, the rest the root unit): (parameters outside the
    # blocks, parameters of the largest block, replicated; number of blocks)
    units: tuple[float, float, int] = (0.0, 0.0, 0)
    folding: Folding | None = None          # what the choices fold over (the Megatron-SP layout's excerpt)
    _layouts: dict = field(default_factory=dict, repr=False, compare=False)

    def region_sharded(self, r: RegionWork) -> Work:
        """``r`` with every cone it holds sharded (the full Megatron layout of one region)."""
        by_key = {c.key: c for c in self.choices}
        out = r.work
        for key in r.keys:
            out = out + by_key[key].unit
        return out

    def layout(self, picks: dict[str, int]) -> TPStats:
        """The layout that shards the first ``picks[key]`` instances of each choice. The largest block
        is a template's last instance: it holds a cone only when every instance does. Kept per
        ``picks``: every (ZeRO, microbatch, recompute) of a mesh prices the same few layouts."""
        key = tuple(sorted((k, n) for k, n in picks.items() if n))
        if key not in self._layouts:
            self._layouts[key] = self._layout(picks)
        return self._layouts[key]

    def _layout(self, picks: dict[str, int]) -> TPStats:
        work = self.base
        largest = {t: one for t, (_, one) in self.block_acts.items()}
        for c in self.choices:
            n = picks.get(c.key, 0)
            if n:
                work = work + c.delta(n)
                if c.template is not None and n == self.block_acts[c.template][0]:
                    largest[c.template] = largest[c.template] + c.unit
        return TPStats(self, dict(picks), work, max((w.act_bytes for w in largest.values()), default=0.0),
                       max((w.act_core for w in largest.values()), default=0.0))

    def all_sharded(self) -> dict[str, int]:
        return {c.key: c.instances for c in self.choices}

    def megatron_sp(self, mg: ModelGraph) -> "MegatronSP | None":
        """:func:`megatron_sp` of this space, computed once (it reads every instance)."""
        if not hasattr(self, "_megatron_sp"):
            self._megatron_sp = megatron_sp(mg, self)
        return self._megatron_sp


def build_space(mg: ModelGraph, tp: int, folding: Folding | None = None) -> Space:
    """The cone choices for ``tp`` (``folding`` defaults to :func:`search.fold.fold`). A cone that
    leaves the block it starts in cannot be mapped to the other instances: the space is then built
    unfolded."""
    folding = folding if folding is not None else fold(mg)
    try:
        return _build(mg, tp, folding)
    except _Crossing:
        return _build(mg, tp, no_fold(mg))


class _Crossing(Exception):
    pass


def _build(mg: ModelGraph, tp: int, folding: Folding) -> Space:
    gm = mg.gm
    nodes, core, transient = _graph_facts(gm)
    base = Work(params=sum(math.prod(s) for s in mg.param_shapes.values()))
    block_inputs = 0.0
    block_acts: dict[str, tuple[int, Work]] = {}
    starts = set()
    regions: list[RegionWork] = []
    one: dict[str, Work] = {}
    for region in folding.regions:
        inputs = sum(_val_bytes(nodes[n]) for n in region.inputs)
        if region.template is None:
            work = _region_work(mg, nodes, region.nodes, False, core)
            base = base + replace(work, params=0)
            starts.update(nodes[n] for n in region.nodes)
        elif region.instance == 0:
            k = len(folding.template(region.template).instances)
            work = one[region.template] = _region_work(mg, nodes, region.nodes, True, core)
            base = base + replace(work, params=0).scaled(k)
            first = nodes[region.nodes[0]]
            block_inputs += k * max((_val_bytes(a) for a in first.all_input_nodes if a.op != "get_attr"), default=0)
            block_acts[region.template] = (k, replace(work, params=0))
            starts.update(nodes[n] for n in region.nodes)
        else:
            work = one[region.template]
        regions.append(RegionWork(region.template, work, [], inputs))
    where = {n: (r.template, r.instance, i) for r in folding.regions if r.instance == 0
             for i, n in enumerate(r.nodes)}  # cones start in first instances only
    cones = megatron_cones(gm, tp, starts)
    choices, corr = [], {}
    for i, cone in enumerate(cones):
        spots = [where.get(n) for n in cone.nodes]
        unit = _cone_delta(mg, cone, tp, nodes, core)
        if all(s is not None and s[:2] == spots[0][:2] for s in spots):  # inside one (first) instance
            tid, _, pos = spots[0]
            if tid not in corr:
                corr[tid] = folding.correspondence(tid)
            mapped = lru_cache(maxsize=None)(partial(_map_cone, cone, corr[tid], gm, nodes))
            choices.append(Choice(f"{tid}/{pos}", tid, len(folding.template(tid).instances), mapped, unit))
        elif spots[0] is not None and len(folding.template(spots[0][0]).instances) > 1:
            raise _Crossing(cone.nodes[0])
        else:  # outside blocks (or reaching into one): priced as outside
            choices.append(Choice(f"c{i}", None, 1, partial(_map_cone, cone, None, gm, nodes),
                                  replace(unit, act_outside=unit.act_bytes)))
            home = next(j for j, r in enumerate(folding.regions) if cone.nodes[0] in r.nodes)
            regions[home].keys.append(choices[-1].key)
    for r in regions:
        if r.template is not None:
            r.keys = [c.key for c in choices if c.template == r.template]
    count = {t: len(folding.template(t).instances) for t in one}
    units = (base.params - sum(count[t] * w.params for t, w in one.items()),
             max((w.params for w in one.values()), default=0.0), sum(count.values()))
    return Space(tp, base, block_inputs, block_acts, choices, regions, transient, units, folding)


def _graph_facts(gm) -> tuple[dict, frozenset, float]:
    """(node by name, names of the attention cores' nodes, :func:`backward_transient`) of ``gm``, the
    same for every tp degree: computed once (kept in ``gm.meta``). Writes each core's first node's
    ``meta["core_freed"]``: what checkpointing the core frees, net of the inputs it then keeps alive."""
    if "space_facts" not in gm.meta:
        nodes = {n.name: n for n in gm.graph.nodes}
        cores = attention_cores(gm)
        for c in cores:
            freed, kept = checkpoint_bytes(gm, c, nodes)
            nodes[c[0]].meta["core_freed"] = freed - kept
        gm.meta["space_facts"] = (nodes, frozenset(n for c in cores for n in c), backward_transient(gm))
    return gm.meta["space_facts"]


def backward_transient(gm) -> float:
    """Bytes the backward holds on top of the saved activations at its worst node: twice the larger of a
    differentiable node's output and its largest input (the gradient arriving and the one leaving, or an
    op's own temporaries: cross-entropy's backward makes the softmax and the logits' gradient while the
    saved log-softmax is alive). Measured on CPU: the step's peak is the forward's saved bytes plus
    twice the logits for a GPT or Llama with V=8192 (``bench/run_recompute.py``). Kept in ``gm.meta``."""
    if "backward_transient" in gm.meta:
        return gm.meta["backward_transient"]
    worst = 0.0
    for node in gm.graph.nodes:
        info = node.meta.get("autopar")
        if info is None or not info.bwd_flops:
            continue
        ins = [_val_bytes(a) for a in node.all_input_nodes if a.op != "get_attr"]
        worst = max(worst, 2 * max(float(info.output_bytes), *ins, 0.0))
    gm.meta["backward_transient"] = worst
    return worst


@dataclass
class MegatronSP:
    """What Megatron sequence parallelism changes in the full Megatron layout of a tp degree: the
    token-wise nodes between cones run on 1/tp of the sequence (``delta``), at the price of the
    boundary all-gathers (``gathers``: logical bytes) and the all-reduce of the gradients of the
    replicated weights they read (``grad_sums``: parameter elements, over ``grad_sum_count`` weights:
    one all-reduce each)."""

    delta: Work
    gathers: tuple[float, ...]
    grad_sums: int
    grad_sum_count: int


def megatron_sp(mg: ModelGraph, space: "Space") -> MegatronSP | None:
    """Megatron-SP for the full layout of ``space`` (``search.placement.propagate(sequence=True)``),
    or None when the graph does not allow it. Propagated on the folding's :class:`search.fold.Excerpt`
    (three instances per template, weighted), so its cost does not grow with depth."""
    if space.tp == 1:
        return None
    ex = excerpt(mg.gm, space.folding)
    styles = {m: s for c in space.choices for j in excerpt_instances(c.instances)  # the excerpt's linears
              for m, s in c.cone(j).styles}
    try:
        layout = propagate(ex.gm, styles, space.tp, sequence=True)
    except Unsupported:
        return None
    nodes = {n.name: n for n in ex.gm.graph.nodes}
    closers = set(layout.reduce_after)
    delta = Work()
    for name in layout.seq_dims:
        node = nodes[name]
        if name not in closers and "autopar" in node.meta:
            in_block = bool(node.meta["autopar"].scope)
            one = node_work(node, space.tp, in_block) - node_work(node, 1, in_block)
            delta = delta + one.scaled(ex.weight.get(name, 1))
    gathers = tuple(_val_bytes(nodes[n]) for n in [*layout.seq_split, *layout.seq_gather]
                    for _ in range(ex.weight.get(n, 1)))
    summed = [(nodes[n], ex.weight.get(n, 1)) for n in layout.seq_grad_sum if nodes[n].op == "get_attr"]
    grad_sums = sum(k * math.prod(mg.param_shapes.get(n.target, ())) for n, k in summed)
    return MegatronSP(replace(delta, allreduces=(), attention=()), gathers, grad_sums, sum(k for _, k in summed))


def _region_work(mg: ModelGraph, nodes: dict, names, in_block: bool, core: frozenset) -> Work:
    """The replicated work of the nodes ``names`` and the parameters they read (a tied weight counts
    in every region that reads it); ``core``: the names of attention-core nodes."""
    fqns = {p for n in names for p in nodes[n].meta["autopar"].params}
    work = Work(params=sum(math.prod(mg.param_shapes[p]) for p in fqns))
    for name in names:
        work = work + node_work(nodes[name], 1, in_block, name in core)
    return work


def _map_cone(cone: Cone, corr: dict[str, tuple[str, ...]] | None, gm, nodes: dict, j: int) -> Cone:
    """``cone`` of a template's first instance, moved to instance ``j`` by node position."""
    if j == 0:
        return cone
    modules = {}
    for name in cone.nodes:
        w = weight_of(gm, nodes[name])
        if w is not None:
            modules[module_of(w)] = module_of(weight_of(gm, nodes[corr[name][j]]))
    return Cone(styles=tuple((modules[m], style) for m, style in cone.styles),
                nodes=tuple(corr[n][j] for n in cone.nodes))


def _cone_delta(mg: ModelGraph, cone: Cone, tp: int, nodes: dict, core: frozenset) -> Work:
    """What sharding ``cone`` changes: its nodes run on 1/tp, its weights are split, all-reduces added."""
    delta = Work()
    for name in cone.nodes:
        node = nodes[name]
        if "autopar" in node.meta:
            delta = delta + node_work(node, tp, True, name in core) - node_work(node, 1, True, name in core)
    styles = dict(cone.styles)
    style = {n: styles[module_of(weight_of(mg.gm, nodes[n]))][0] for n in cone.nodes
             if weight_of(mg.gm, nodes[n]) and module_of(weight_of(mg.gm, nodes[n])) in styles}
    reduce_outputs = [n for n in cone.nodes if style.get(n) == "rowwise"]   # forward all-reduce
    copy_inputs = sorted({_linear_input_name(nodes[n]) for n in cone.nodes if style.get(n) == "colwise"})  # backward
    sizes = [_val_bytes(nodes[n]) for n in reduce_outputs + copy_inputs]
    ar = tuple(sorted((s, sizes.count(s)) for s in set(sizes)))
    split = {weight_of(mg.gm, nodes[n]) for n in style}
    split |= {b.target for n, st in style.items() if st == "colwise" and (b := bias_of(nodes[n])) is not None}
    shrink = sum(math.prod(shape) - math.prod(shape) // tp for fqn, shape in mg.param_shapes.items() if fqn in split)
    return replace(delta, params=-shrink, allreduces=ar)


def _linear_input_name(node) -> str:
    return (node.args[0] if op_name(node) == "linear" else node.args[1]).name


def node_work(node, div: int, in_block: bool, core: bool = False) -> Work:
    """One node's share of the per-rank work when its data is split ``div`` ways (``core``: it is in
    an attention core, ``search.recompute.attention_cores``)."""
    info = node.meta["autopar"]
    op = op_name(node)
    compute_bound = op in COMPUTE_BOUND
    moved = 0.0 if compute_bound or op in NO_ACTIVATION else (info.bytes_read + info.bytes_written) / div
    w = Work(mem_bytes=moved * (3 if info.bwd_flops else 1))  # backward of an element-wise op reads and writes ~2x
    if compute_bound:
        w.fwd_flops, w.bwd_flops = info.fwd_flops / div, info.bwd_flops / div
        if info.params and info.bwd_flops:  # a matmul with a weight: its wgrad costs one forward
            w.wgrad_flops = info.fwd_flops / div
    if in_block:
        w.block_fwd_flops = info.fwd_flops / div if compute_bound else 0.0
        w.block_fwd_bytes = moved
    if op == "scaled_dot_product_attention":
        w.attention = ((_attn(node, div), 1),)
    if "saved_bytes" not in node.meta:  # the census of the whole graph, once
        annotate_saved(node.graph.owning_module)
    w.act_bytes = node.meta["saved_bytes"] / div  # search.saved: what autograd keeps of it
    if not in_block:
        w.act_outside = w.act_bytes
    if core:
        w.core_fwd_flops = info.fwd_flops / div if compute_bound else 0.0
        w.core_fwd_bytes, w.act_core = moved, node.meta.get("core_freed", 0) / div  # on the core's first node
    return w


def _attn(node, div: int) -> Attn:
    """An attention call's shapes per rank when its heads are split ``div`` ways."""
    info = node.meta["autopar"]
    q, k, v = (a.meta["val"] for a in node.args[:3])
    causal = bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))
    return Attn(q.numel() * q.element_size() / div, (k.numel() * k.element_size() + v.numel() * v.element_size()) / div,
                q.shape[-3] // div, k.shape[-3] // div, info.fwd_flops / div, info.bwd_flops / div, causal)


def _val_bytes(node) -> float:
    info = node.meta.get("autopar")
    if info is not None:
        return float(info.output_bytes)
    v = node.meta.get("val")
    return float(v.numel() * v.element_size()) if hasattr(v, "numel") else 0.0
