"""Tensor-parallel strategy space: the Megatron cones of a graph and the per-rank work each one changes.

For a tensor-parallel degree ``tp`` every cone (``search.placement.megatron_cones``: colwise linears,
the region they shard, the rowwise linears that close it) is a binary choice: replicated or split
``tp`` ways. Work is additive over nodes, so a layout's :class:`Work` is the all-replicated base plus
the delta of each sharded cone. The ILP (``search.strategy``) picks the cones; the enumerator
(``search.baseline``) shards them all.

Folding (``search.fold``): cones at the same position of instances of one template are one choice
with a multiplicity, priced once on a representative instance.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from search.graph import ModelGraph
from search.placement import Cone, bias_of, megatron_cones, module_of, op_name, weight_of

COMPUTE_BOUND = {"linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "scaled_dot_product_attention", "convolution"}
NO_ACTIVATION = {"view", "reshape", "_unsafe_view", "transpose", "permute", "expand", "unsqueeze", "squeeze",
                 "slice", "select", "split", "chunk", "getitem", "t", "alias", "detach", "_assert_tensor_metadata",
                 "arange", "zeros", "ones", "full", "empty", "new_ones", "lift_fresh_copy"}
_LAYER = re.compile(r"^(.*?)\.(\d+)(\.|$)")


@dataclass
class Work:
    """Per tensor-parallel rank, for the captured batch: what a layout costs. Additive."""

    fwd_flops: float = 0.0          # matmul/attention FLOPs
    bwd_flops: float = 0.0
    mem_bytes: float = 0.0          # bytes moved by memory-bound ops, forward + backward
    block_fwd_flops: float = 0.0    # forward work inside repeated blocks (recomputed under full recompute)
    block_fwd_bytes: float = 0.0
    params: int = 0                 # parameters one tp rank holds
    act_bytes: float = 0.0          # saved activations
    act_outside: float = 0.0        # activations outside repeated blocks
    act_blocks: dict[str, float] = field(default_factory=dict)  # block -> its saved activations
    allreduce_bytes: tuple[float, ...] = ()  # logical bytes of each tp all-reduce

    def __add__(self, o: "Work") -> "Work":
        blocks = dict(self.act_blocks)
        for b, v in o.act_blocks.items():
            blocks[b] = blocks.get(b, 0.0) + v
        return Work(self.fwd_flops + o.fwd_flops, self.bwd_flops + o.bwd_flops, self.mem_bytes + o.mem_bytes,
                    self.block_fwd_flops + o.block_fwd_flops, self.block_fwd_bytes + o.block_fwd_bytes,
                    self.params + o.params, self.act_bytes + o.act_bytes, self.act_outside + o.act_outside,
                    blocks, self.allreduce_bytes + o.allreduce_bytes)

    def scaled(self, k: int) -> "Work":
        """``k`` copies (an instance count); per-block activations are not copied."""
        return Work(k * self.fwd_flops, k * self.bwd_flops, k * self.mem_bytes, k * self.block_fwd_flops,
                    k * self.block_fwd_bytes, k * self.params, k * self.act_bytes, k * self.act_outside,
                    {}, self.allreduce_bytes * k)


@dataclass
class Choice:
    """One ILP decision: how many of these cones (one per instance of a template position) to shard.
    Instances are identical, so only the count matters; the first ``n`` instances are sharded."""

    key: str                 # "t0/2": cone 2 of template t0; "c17": a cone outside repeated blocks
    cones: list[Cone]
    unit: Work               # what sharding one instance changes (activations not attributed to a block)
    blocks: list[str | None]  # each instance's block, whose activations shrink by ``unit.act_bytes``

    def delta(self, n: int) -> Work:
        """What sharding the first ``n`` instances changes."""
        out = self.unit.scaled(n)
        for block in self.blocks[:n]:
            if block:
                out.act_blocks[block] = out.act_blocks.get(block, 0.0) + self.unit.act_bytes
        return out

    def styles(self, n: int) -> dict[str, tuple[str, int]]:
        return {m: s for cone in self.cones[:n] for m, s in cone.styles}


@dataclass
class TPStats:
    """A priced tensor-parallel layout: its styles and per-rank work."""

    tp: int
    styles: dict[str, tuple[str, int]]
    work: Work
    block_inputs: float      # bytes of each repeated block's input, summed (what full recompute keeps)

    @property
    def act_max_block(self) -> float:
        return max(self.work.act_blocks.values(), default=0.0)


@dataclass
class Space:
    tp: int
    base: Work               # everything replicated
    block_inputs: float
    choices: list[Choice]

    def layout(self, picks: dict[str, int]) -> TPStats:
        """The layout that shards the first ``picks[key]`` instances of each choice."""
        work, styles = self.base, {}
        for c in self.choices:
            n = picks.get(c.key, 0)
            if n:
                work = work + c.delta(n)
                styles.update(c.styles(n))
        return TPStats(self.tp, styles, work, self.block_inputs)

    def all_sharded(self) -> dict[str, int]:
        return {c.key: len(c.cones) for c in self.choices}


def block_of(scope: str) -> str | None:
    """``"blocks.3"`` for a scope inside a numbered repeated module, else None."""
    m = _LAYER.match(scope)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def build_space(mg: ModelGraph, tp: int, folding=None) -> Space:
    """The cone choices for ``tp``; with ``folding`` (``search.fold.Folding``) cones at the same
    template position share one choice, priced on the template's first instance."""
    gm = mg.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    base = Work(params=sum(_numel(s) for s in mg.param_shapes.values()))
    block_inputs: dict[str, float] = {}
    for node in mg.nodes():
        base = base + _node_work(node, 1)
        block = block_of(node.meta["autopar"].scope)
        if block and block not in block_inputs:
            block_inputs[block] = max((_val_bytes(a) for a in node.all_input_nodes if a.op != "get_attr"), default=0)
    cones = megatron_cones(gm, tp)
    keys = _fold_keys(cones, folding) if folding is not None else [f"c{i}" for i in range(len(cones))]
    grouped: dict[str, list[Cone]] = {}
    for key, cone in zip(keys, cones):
        grouped.setdefault(key, []).append(cone)
    choices = []
    for key, members in grouped.items():
        unit = replace(_cone_delta(mg, members[0], tp, nodes), act_blocks={})
        blocks = [block_of(nodes[cone.nodes[0]].meta["autopar"].scope) for cone in members]
        choices.append(Choice(key=key, cones=members, unit=unit, blocks=blocks))
    return Space(tp=tp, base=base, block_inputs=sum(block_inputs.values()), choices=choices)


def _fold_keys(cones: list[Cone], folding) -> list[str]:
    """Template position of the first node of a cone that lies inside one instance (``t0/5``); a
    unique key for a cone outside templates or spanning instances."""
    where = {n: (r.template, r.instance, k) for r in folding.regions if r.template is not None
             for k, n in enumerate(r.nodes)}
    keys = []
    for i, cone in enumerate(cones):
        spots = [where.get(n) for n in cone.nodes]
        inside = all(s is not None and s[:2] == spots[0][:2] for s in spots)
        keys.append(f"{spots[0][0]}/{spots[0][2]}" if inside else f"c{i}")
    return keys


def _cone_delta(mg: ModelGraph, cone: Cone, tp: int, nodes: dict) -> Work:
    """What sharding ``cone`` changes: its nodes run on 1/tp, its weights are split, all-reduces added."""
    delta = Work()
    for name in cone.nodes:
        node = nodes[name]
        if "autopar" in node.meta:
            delta = delta + _sub(_node_work(node, tp), _node_work(node, 1))
    styles = dict(cone.styles)
    style = {n: styles[module_of(weight_of(mg.gm, nodes[n]))][0] for n in cone.nodes
             if weight_of(mg.gm, nodes[n]) and module_of(weight_of(mg.gm, nodes[n])) in styles}
    reduce_outputs = [n for n in cone.nodes if style.get(n) == "rowwise"]   # forward all-reduce
    copy_inputs = sorted({_linear_input_name(nodes[n]) for n in cone.nodes if style.get(n) == "colwise"})  # backward
    ar = tuple(_val_bytes(nodes[n]) for n in reduce_outputs + copy_inputs)
    split = {weight_of(mg.gm, nodes[n]) for n in style}
    split |= {b.target for n, st in style.items() if st == "colwise" and (b := bias_of(nodes[n])) is not None}
    shrink = sum(_numel(shape) - _numel(shape) // tp for fqn, shape in mg.param_shapes.items() if fqn in split)
    return replace(delta, params=-shrink, allreduce_bytes=ar)


def _linear_input_name(node) -> str:
    return (node.args[0] if op_name(node) == "linear" else node.args[1]).name


def _node_work(node, div: int) -> Work:
    """One node's share of the per-rank work when its data is split ``div`` ways."""
    info = node.meta["autopar"]
    op = op_name(node)
    compute_bound = op in COMPUTE_BOUND
    moved = 0.0 if compute_bound or op in NO_ACTIVATION else (info.bytes_read + info.bytes_written) / div
    block = block_of(info.scope)
    w = Work(mem_bytes=moved * (3 if info.bwd_flops else 1))  # backward of an element-wise op reads and writes ~2x
    if compute_bound:
        w.fwd_flops, w.bwd_flops = info.fwd_flops / div, info.bwd_flops / div
    if block:
        w.block_fwd_flops = info.fwd_flops / div if compute_bound else 0.0
        w.block_fwd_bytes = moved
    if info.bwd_flops and op not in NO_ACTIVATION:
        b = info.output_bytes / div
        w.act_bytes = b
        if block:
            w.act_blocks = {block: b}
        else:
            w.act_outside = b
    return w


def _sub(a: Work, b: Work) -> Work:
    blocks = {k: a.act_blocks.get(k, 0.0) - b.act_blocks.get(k, 0.0) for k in set(a.act_blocks) | set(b.act_blocks)}
    return Work(a.fwd_flops - b.fwd_flops, a.bwd_flops - b.bwd_flops, a.mem_bytes - b.mem_bytes,
                a.block_fwd_flops - b.block_fwd_flops, a.block_fwd_bytes - b.block_fwd_bytes, a.params - b.params,
                a.act_bytes - b.act_bytes, a.act_outside - b.act_outside, blocks, ())


def _val_bytes(node) -> float:
    info = node.meta.get("autopar")
    if info is not None:
        return float(info.output_bytes)
    v = node.meta.get("val")
    return float(v.numel() * v.element_size()) if hasattr(v, "numel") else 0.0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
