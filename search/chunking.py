"""Chunkable regions (AutoChunk): where a captured model can run a region as a loop over chunks of one
axis, and what that saves and costs. Pure analysis; ``passes.chunk.apply_chunking`` applies a plan's
entries, finding each region again with :func:`find_regions` (the same rules), so what is priced is what runs.

    >>> from examples.zoo import build
    >>> from planner.capture import capture
    >>> mg = capture(*build("gpt-tiny", batch=2), name="gpt-tiny")
    >>> [(r.kind, r.scope, r.instances, r.dim) for r in chunk_regions(mg, fold(mg))]
    [('attention', 'blocks.*.attn', 2, 1), ('mlp', 'blocks.*.mlp', 2, 1), ('lm_head_loss', 'lm_head', 1, 1)]

Regions are found on the first instance of each folding template (and in the nodes outside blocks), by
module scope, never by node names, and each is verified with :func:`search.chunkflow.chunk_flow` along
its longest sequence-like dim (not the batch, not the channels: the sequence, the pair rows); a
candidate that does not chunk is skipped. Kinds, in priority order
(a node belongs to at most one region):

* ``mlp``: a module (any depth inside a block, the block itself included) with two or more chained
  linears of its own, no attention or einsum between them, reading one tensor: the MLP, a feed-forward,
  an Evoformer transition, BERT's fc/proj. Region: its nodes from the first of those linears to the last, in graph
  order (so a norm before it and collectives another pass put around it stay outside).
* ``pair``: a child module of a block whose input is a pair representation [B, N, N, c] (Evoformer
  triangle updates and triangle attention). Its leading children that every row needs whole (the input
  norm, the "right" edge, the attention bias) are left out: the region is the module minus the fewest
  leading units (children or own ops, in graph order) for which the rows chunk. Chunked along rows.
* ``attention``: the module that calls ``scaled_dot_product_attention``, query-chunked: the query path
  inside it (the nodes only q depends on, the shared projection and split left out), the attention and
  the nodes from it to the module's output projection. k and v are read whole.
* ``lm_head_loss`` (outside blocks): the last linear whose output feeds the loss, through the loss (a
  mean cross-entropy/MSE/mean/sum of the graph's first output): per chunk a partial sum and a count.

Memory model (one rule set; what the planner and ``bench/run_chunk.py`` use). Each region's first
instance is run once, unchunked, forward and backward, on fake CPU tensors (``FakeTensorMode``: shapes
only, nothing allocated, the kernels torch picks on a CPU, e.g. flash attention for a plain causal SDPA,
the math path that materialises the weights for a masked 5-D one), counting storages like an allocator:

* ``saved_bytes`` S: what autograd saves for the region's backward (``saved_tensors_hooks``), the
  region's inputs, parameters and outputs left out: also what ops save internally, which a graph node's
  output does not show (``cross_entropy_loss`` saves its log_softmax, dropout a mask, math attention its
  weights, layer norm its statistics).
* ``transient_bytes`` T: the peak of live bytes during the region's backward above what was alive
  when it began (gradients arriving and leaving while the saved tensors live, temporaries; parameter
  gradients excluded): ~2u for a region whose largest saved tensor is u (the LM head: the gradient of
  the log_softmax and of the logits).
* ``grad_input_bytes`` I: the gradient-carrying inputs sliced along the axis (their gradient leaving is
  part of T). Chunked, the backward of each chunk's slice is a full-size zero-padded gradient, added to
  the sum of the previous chunks': with two or more chunks the two and their new sum, 3I, coexist.

Chunked k ways (:func:`chunk_memory`), an instance keeps nothing after the forward (the chunk loop keeps
views of its inputs, alive anyway; its outputs are the same tensors either way), and its backward holds
one recomputed chunk and that chunk's transient, (S + T - I) / k, plus the input gradient: 3I (I if
k = 1). A region that ends in one scalar loss (``scalar_loss``: the LM head + loss) takes each chunk's
gradients in the forward instead (``passes.chunk``): it keeps the input gradient I and the gradients
of its parameters P (the head's weight) after the forward, and one chunk's forward and backward,
(S + T - I) / k, and that chunk's P run on top of them (P does not scale with the batch). :func:`chunk_drop` is the fall of the step's activation peak, taken as the largest over the
regions of what is alive when the backward reaches the region's last instance plus its transient:
alive is every instance's saved bytes (S, or 0 chunked), less one instance of each region after it in
graph order (their last instances ran backward already; the blocks before still hold theirs). What
is not in a region adds the same to both peaks and cancels. Measured (``bench/run_chunk.py``, fp32,
batch 1; drop of the step's activation peak, predicted / measured, MiB):

* GPT h=256, 4 layers, V=8192, seq 4096, unchunked peak 552.6: S = 4.1 (attention: q and the
  logsumexp of the flash kernel), 8.0 (MLP), 128 (LM head: the log_softmax), T = 20, 8, 256, I = 4.
  Every region k ways: k=1 (checkpoint alone) 48.2 / 48.2, k=2 230.3 / 228.2, k=4 325.3 / 324.2, k=8
  372.8 / 372.2, k=16 396.5 / 396.2; one kind at k=4: attention 16.2 / 16.2, MLP 32.0 / 32.0, LM head
  277.0 / 276.0; the planner's choice (LM head k=16) 348.3 / 348.0.
* Evoformer-like, 256 residues, c_z=32, 2 blocks, unchunked peak 2028.5: S = 56.5 (triangle update),
  304 (each triangle attention: 256 of them the weights of the masked 5-D SDPA, which runs the math
  kernel on a CPU), 32 (transition), 8 (head), T = 24, 504, 72, 16, I = 8. Every region: k=1 1057 /
  1053, k=2 1441 / 1444, k=4 1641 / 1644, k=8 1741 / 1744, k=16 1791 / 1794; one kind at k=4: pair
  1609 / 1612, transition 32 / 32, head 0 / 0 (its saved bytes are freed before the attention's
  backward sets the peak); the planner's choice (both triangle attentions k=2) 1296 / 1299.

The previous model (a node's output is a saved activation when it has backward FLOPs and is not a view)
predicted 141 MiB for the GPT at k=4 and 538 MiB for the Evoformer: it missed the internal saves and the
transients. ``search.space`` counts saved activations with ``search.saved`` (meta tensors, SDPA by a
flash-kernel rule) and no backward transient, so the planner's unchunked activations can be below what
``chunk_drop`` frees (``search.baseline._chunked`` floors them at zero).

Time model (:func:`chunk_seconds`): the backward recomputes the chunked nodes' forward once,
``fwd_flops`` (matmul/attention FLOPs) and ``fwd_mem_bytes`` (bytes the memory-bound ops move) per
instance (a scalar loss recomputes nothing), and each of the ``len(nodes)`` kernels is launched k times
on 1/k of the data in the forward, the recompute (if any) and the backward, each launch costing the cluster's ``kernel_launch_s`` (measured for the
``cpu`` profile by ``runtime.calibrate``: 17-19 us here, forward + backward, one thread).
:func:`select` picks regions and chunk counts for a memory gap. Measured (the planner's choices above,
predicted / measured extra step time): GPT 0.32 / 0.26 s (LM head recompute, step 1.87 s); Evoformer
0.26 / 1.48 s: the masked 5-D attention runs the math kernel, whose softmax and mask traffic over the
[.., N, N] weights ``search.space`` does not count (an SDPA is priced by its FLOPs alone).

Limitations: attention is chunked only where it is one ``scaled_dot_product_attention`` (not after
``passes.sp`` replaced it; not eager matmul-softmax attention); a pattern is per template, and a model
whose instances differ in several path components at once is skipped. The probe runs the kernels a CPU
would (a GPU's may save less, e.g. a memory-efficient attention for a masked SDPA).
"""
from __future__ import annotations

import operator
import re
import weakref
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from search.chunkflow import (MEAN_OPS, ChunkError, ChunkFlow, _kwargs, _op, _scope, _shape, _val, chunk_flow,
                              region_between)
from search import cost
from search.cluster import Cluster
from search.fold import Folding, fold
from search.graph import ModelGraph, expression
from search.space import node_work

__all__ = ["ChunkRegion", "Scale", "chunk_regions", "chunk_memory", "chunk_drop", "chunk_seconds", "select",
           "find_regions", "matching_scopes", "KINDS"]

KINDS = ("mlp", "pair", "attention", "lm_head_loss")  # priority order: a node belongs to one region at most
aten = torch.ops.aten
_SDPA = "scaled_dot_product_attention"
_MIXERS = {_SDPA, "einsum", "bmm", "matmul"}  # ops that make a module more than an MLP
_LOSSES = set(MEAN_OPS) | {aten.sum.default, aten.sum.dim_IntList}


@dataclass(frozen=True)
class ChunkRegion:
    """One chunkable region of a template (every instance alike) or outside blocks. Bytes and FLOPs are
    for one instance at the captured batch, replicated (global shapes)."""

    kind: str                 # "mlp" | "attention" | "lm_head_loss" | "pair"
    scope: str                # module scope pattern, "*" where instances differ: "blocks.*.mlp", "lm_head"
    template: str | None      # folding template id; None outside blocks
    instances: int            # how many instances the pattern matches (the template's instance count)
    nodes: tuple[str, ...]    # the region's node names in the first instance (graph order)
    dim: int                  # chunked dim of the region's anchor (first tensor input of its first node)
    size: int                 # length of the chunked axis: chunk counts 1 .. size
    saved_bytes: float        # S: what autograd saves for its backward (inputs, parameters, outputs excluded)
    transient_bytes: float    # T: its backward's peak above what was alive when that began
    grad_input_bytes: float   # I: gradient-carrying inputs sliced along the axis
    fwd_flops: float          # forward matmul/attention FLOPs of the chunked nodes: the backward's recompute
    fwd_mem_bytes: float      # forward bytes moved by its memory-bound ops (recomputed too)
    scalar_loss: bool = False  # ends in one scalar sum/mean: chunked, its gradients are taken in the forward
    param_grad_bytes: float = 0.0  # P: gradients of the parameters it reads (held from forward when scalar_loss)
    instance_scopes: tuple[str, ...] = ()  # each instance's concrete scope, graph order

    def first(self, n: int) -> "ChunkRegion":
        """This region on its first ``n`` instances only (itself for all of them): the ones whose backward
        runs last, when the least is alive. Its scope names them ("layers.{0,1}.mlp")."""
        if n >= self.instances or len(self.instance_scopes) != self.instances:
            return self
        return _first(self, n)

    def entry(self, chunks: int) -> dict:
        """This region chunked ``chunks`` ways as a plan's ``chunking`` entry (what ``passes.chunk`` applies)."""
        return {"kind": self.kind, "scope": self.scope, "dim": self.dim, "chunks": chunks}

    def holds(self, part: "ChunkRegion") -> bool:
        """Whether ``part`` is this region on some of its first instances (:meth:`first`)."""
        return (part.instances < self.instances and part.nodes == self.nodes and part.kind == self.kind
                and part.template == self.template and part.instance_scopes == self.instance_scopes[:part.instances])


@lru_cache(maxsize=4096)
def _first(region: ChunkRegion, n: int) -> ChunkRegion:
    """:meth:`ChunkRegion.first` (cached: the search asks for the same few instance counts of a region
    many times, and naming them is a pattern match over every instance's scope)."""
    head = region.instance_scopes[:n]
    return replace(region, scope=_pattern(head, list(region.instance_scopes)), instances=n, instance_scopes=head)


def chunk_memory(region: ChunkRegion, k: int | None) -> tuple[float, float]:
    """(bytes one instance keeps after the forward, the peak its backward adds above the rest) with
    ``k`` chunks; None: not chunked, (S, T). Chunked: (0, (S + T - I) / k + 3I), I for k = 1; a scalar
    loss, whose gradients are taken in the forward: (I, max((S + T - I) / k, I)), and its parameter
    gradients P on both, which :func:`chunk_drop` adds (they do not scale with the batch; see the module
    docstring)."""
    if k is None:
        return region.saved_bytes, region.transient_bytes
    k = max(1, min(int(k), region.size))
    grad_in = region.grad_input_bytes
    one_chunk = (region.saved_bytes + region.transient_bytes - grad_in) / k
    if region.scalar_loss:  # one chunk's forward and backward in the forward; the backward scales I into a new I
        return grad_in, max(one_chunk, grad_in)
    return 0.0, one_chunk + (3 if k > 1 else 1) * grad_in


class Scale(NamedTuple):
    """Bytes on one rank per byte of the captured graph: activations × ``activations``, parameter
    gradients × ``params``, both divided by ``tp`` inside blocks (whose regions run tp-sharded)."""

    activations: float = 1.0
    params: float = 1.0
    tp: int = 1

    def div(self, r: ChunkRegion) -> int:
        return self.tp if r.template is not None and self.tp > 1 else 1

    def __call__(self, r: ChunkRegion) -> tuple[float, float]:
        d = self.div(r)
        return self.activations / d, self.params / d


def chunk_drop(regions: list[ChunkRegion], chunks: dict[ChunkRegion, int], scale: Scale = Scale(),
               peaks: dict | None = None) -> float:
    """How much the step's activation peak falls when each region in ``chunks`` is chunked that many
    ways (every instance) and the other ``regions`` (graph order, as :func:`chunk_regions` lists them)
    are not: the peak (:meth:`_Peak.__call__`) unchunked minus chunked, on one rank as ``scale`` says
    (``peaks``: as :func:`select` takes it)."""
    return _peak(tuple(regions), scale, peaks).drop(chunks)


def _peak(regions: tuple[ChunkRegion, ...], scale: Scale, peaks: dict | None = None) -> "_Peak":
    """The :class:`_Peak` of ``regions`` at ``scale``, kept in ``peaks`` (one search's: it prices many
    configurations at one scale, ZeRO stages say, whose chunk selections evaluate the same choices)."""
    if peaks is None:
        return _Peak(regions, scale)
    if (regions, scale) not in peaks:
        peaks[regions, scale] = _Peak(regions, scale)
    return peaks[regions, scale]


class _Peak:
    """The step's activation peak for one region list and scale as a function of ``chunks``, each part's
    (kept, transient) bytes per instance and each choice's drop computed once."""

    def __init__(self, regions: tuple[ChunkRegion, ...], scale: Scale):
        self.regions, self.scale, self.bytes, self.drops = regions, scale, {}, {}
        self.unchunked = self({})

    def part(self, r: ChunkRegion, k: int | None) -> tuple[float, float]:
        if (r, k) not in self.bytes:
            ka, kp = self.scale(r)
            saved, transient = chunk_memory(r, k)
            held = r.param_grad_bytes * kp if r.scalar_loss and k is not None else 0.0  # the gradient buffers
            self.bytes[r, k] = (saved * ka + held, transient * ka + held)  # + one chunk's parameter gradients
        return self.bytes[r, k]

    def drop(self, chunks: dict[ChunkRegion, int]) -> float:
        """How much ``chunks`` lower the peak (:func:`chunk_drop`)."""
        key = frozenset(chunks.items())
        if key not in self.drops:
            self.drops[key] = self.unchunked - self(chunks)
        return self.drops[key]

    def __call__(self, chunks: dict[ChunkRegion, int]) -> float:
        """The peak, less what is not in a region, with ``chunks``: the largest, over the regions, of what
        is alive when the backward reaches its last instance (every instance's saved bytes, less one
        instance of each region listed after it, whose last instance ran backward already) plus its
        transient. A region whose first instances are chunked (a key made by :meth:`ChunkRegion.first`)
        counts as two: those instances, then the rest."""
        parts = []  # (instances, kept, peak)
        for r in self.regions:
            head = next((q for q in chunks if r.holds(q)), None)
            if head is None:
                parts.append((r.instances, *self.part(r, chunks.get(r))))
            else:
                parts += [(head.instances, *self.part(head, chunks[head])),
                          (r.instances - head.instances, *self.part(r, chunks.get(r)))]
        alive = sum(n * kept for n, kept, _ in parts)
        worst, later = 0.0, 0.0  # later: one instance of each region after i (its last ran backward)
        for _, kept, peak in reversed(parts):
            worst = max(worst, alive - later + peak)
            later += kept
        return worst


def chunk_seconds(region: ChunkRegion, k: int, cl: Cluster, dtype: str, work: float, launches: int = 1) -> float:
    """Extra step time of chunking every instance of ``region`` ``k`` ways: its forward recomputed
    (``work`` = instances times the share of the captured graph's work one device runs), and its
    kernels launched k times in the forward, the recompute and the backward, ``launches`` times a step
    (microbatches), at ``cl.kernel_launch_s`` each."""
    if region.scalar_loss:  # gradients taken in the forward: nothing recomputed, kernels launched 2k times
        return 2 * k * region.instances * len(region.nodes) * cl.kernel_launch_s * launches
    recompute = cost.compute_time(region.fwd_flops * work, dtype, cl) + cost.memory_time(region.fwd_mem_bytes * work, cl)
    return recompute + 3 * k * region.instances * len(region.nodes) * cl.kernel_launch_s * launches


def first_counts(instances: int) -> list[int]:
    """How many first instances of a template a plan may chunk: 1, 2, 4, ... and all of them. A ladder
    rather than every count: the fewest that close a memory gap grow with the batch and sequence, and
    each count is another plan, so a range plan over S (``search.range``) got a piece per count (423
    searches for llama2-7b on 64 H100s over S = 2k..1M, 283 on this ladder), for at most twice the
    recompute of the fewest."""
    return sorted({1 << j for j in range(instances.bit_length()) if 1 << j < instances} | {instances})


def select(regions: list[ChunkRegion], need: float, ks: tuple[int, ...], seconds, scale: Scale = Scale(),
           peaks: dict | None = None) -> tuple[dict[ChunkRegion, int], float]:
    """Which regions to chunk, on how many of their instances and how many ways, to lower the activation
    peak by ``need`` bytes: regions in order of bytes freed (alone, at ``ks[0]`` chunks) per second of
    ``seconds(region, k)``; each takes the cheapest (chunks of ``ks``, fewest first instances among
    :func:`first_counts`, :meth:`ChunkRegion.first`) that closes the remaining gap, or else all its
    instances with the chunks that free the most, until the gap closes; then, costliest first, leaves
    out each pick the others close the gap without. Bytes are one rank's as ``scale`` says; ``peaks``: a
    dict the caller keeps across the selections of one search (the drops of choices it evaluated before). Returns
    ({region or its first instances: chunks}, the predicted drop, :func:`chunk_drop`)."""
    drop = _peak(tuple(regions), scale, peaks).drop

    def ways(r):
        return [k for k in ks if k <= r.size] or [1]

    def fewest(r, k):  # the fewest first instances of r on the ladder that close the gap k ways
        ladder = first_counts(r.instances)
        lo, hi = 0, len(ladder) - 1  # the drop grows with the instances: bisect the ladder
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if drop({**chosen, r.first(ladder[mid]): k}) >= need else (mid + 1, hi)
        return r.first(ladder[lo])

    ranked = sorted(regions, key=lambda r: (-drop({r: ways(r)[0]}) / max(seconds(r, ways(r)[0]), 1e-12), r.scope))
    chosen: dict[ChunkRegion, int] = {}
    got = 0.0
    for r in ranked:
        if got >= need:
            break
        tried = [(drop({**chosen, r: k}), k) for k in ways(r)]
        closing = [(seconds(p, k), k, p) for d, k in tried if d >= need for p in [fewest(r, k)]]
        if closing:
            _, k, part = min(closing, key=lambda t: t[:2])
        else:
            part, k = r, max(tried, key=lambda t: (t[0], -t[1]))[1]
        if drop({**chosen, part: k}) > got:
            chosen[part] = k
            got = drop(chosen)
    for r in sorted(chosen, key=lambda r: (-seconds(r, chosen[r]), r.scope)):  # a later pick may do without it
        rest = {q: k for q, k in chosen.items() if q is not r}
        if got >= need and drop(rest) >= need:
            chosen, got = rest, drop(rest)
    return chosen, got


def parts_of(regions: list[ChunkRegion], key: tuple) -> dict[ChunkRegion, int] | None:
    """The choice :func:`select` would return for a plan's ((kind, scope, chunks), ...) (``Candidate.chunk_key``)
    among ``regions`` and their first instances on the :func:`first_counts` ladder; None when one is not there."""
    parts = {(p.kind, p.scope): p for r in regions for n in first_counts(r.instances) for p in [r.first(n)]}
    if any((kind, scope) not in parts for kind, scope, _ in key):
        return None
    return {parts[kind, scope]: k for kind, scope, k in key}


def chunk_regions(mg: ModelGraph, folding: Folding | None = None) -> list[ChunkRegion]:
    """The chunkable regions of ``mg`` (see the module docstring), in graph order of their first node.

    On a symbolic capture (``planner.capture.capture_symbolic``) the numbers are sympy expressions in B
    and S and ``transient_bytes`` is the probe's timeline (:func:`peak_above` of it at a point);
    ``search.specialize`` evaluates them, and a graph it specialises carries its regions so (in
    ``gm.meta["chunk_regions"]``): the same regions and numbers as probing the point, without probing."""
    gm = mg.gm
    if "chunk_regions" in gm.meta:
        return gm.meta["chunk_regions"]()
    folding = folding if folding is not None else fold(mg)
    symbols = gm.meta.get("symbols")
    number = float if symbols is None else (lambda v: expression(v, symbols))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_name = {n.name: n for n in gm.graph.nodes}
    taken: set[fx.Node] = set()
    grad = _requires_grad(gm)
    out: list[tuple[int, ChunkRegion]] = []
    block_scopes: dict[int, list[str]] = {}  # depth -> the scopes of the blocks at that depth
    for r in folding.regions:
        if r.template is not None:
            block_scopes.setdefault(len(r.scope.split(".")), []).append(r.scope)

    def add(kind, pattern, template, scopes, names, dim, flow):
        taken.update(by_name[n] for n in names)
        region = _priced(kind, pattern, template, scopes, names, dim, flow, grad, number)
        out.append((order[by_name[names[0]]], region))

    for r in folding.regions:
        if r.template is None or r.instance != 0:
            continue
        instances = folding.template(r.template).instances
        prefix = _pattern(instances, block_scopes.get(len(r.scope.split(".")), []))
        if prefix is None:
            continue
        nodes = [by_name[n] for n in r.nodes]
        for kind in KINDS[:3]:
            for scope in _scopes(kind, nodes, r.scope):
                found = _verified(gm, kind, scope, taken, nodes, by_name)
                if found is not None:
                    suffix = scope[len(r.scope):]
                    add(kind, prefix + suffix, r.template, tuple(i + suffix for i in instances), *found)
    outside = [by_name[n] for r in folding.regions if r.template is None for n in r.nodes]
    for scope in _scopes("lm_head_loss", outside, None):
        found = _verified(gm, "lm_head_loss", scope, taken, outside, by_name)
        if found is not None:
            add("lm_head_loss", scope, None, (scope,), *found)
    return [region for _, region in sorted(out, key=lambda x: x[0])]


def find_regions(gm: fx.GraphModule, kind: str, scope: str, dim: int,
                 taken: set[str] = frozenset()) -> list[tuple[str, list[str]]]:
    """(concrete scope, node names) of every instance of ``scope`` (a pattern, see :func:`matching_scopes`)
    in ``gm`` that holds a ``kind`` region chunkable along ``dim``, by the rules :func:`chunk_regions`
    found it with; candidates with a node in ``taken`` (regions of higher-priority kinds) are passed
    over, as there. A scope whose candidates all fail raises the first ChunkError (naming the node).
    What ``passes.chunk.apply_chunking`` rewrites."""
    if kind not in KINDS:
        raise ChunkError(f"unknown chunking kind {kind!r}; one of {', '.join(KINDS)}")
    out = []
    for concrete in matching_scopes(gm, scope):
        failure = None
        for names in _candidates(gm, kind, concrete):
            if taken and not taken.isdisjoint(names):
                continue
            try:
                flow = chunk_flow(gm, names, dim)
            except ChunkError as exc:
                failure = failure or exc
                continue
            if _accepted(kind, flow):
                out.append((concrete, names))
                break
            failure = failure or ChunkError(f"{kind} region of {concrete} along dim {dim}: "
                                            + ("not query-chunked" if kind == "attention" else "nothing to chunk"))
        else:
            if failure is not None:
                raise failure
    return out


def matching_scopes(gm: fx.GraphModule, pattern: str) -> list[str]:
    """The module scopes (prefixes of ``gm``'s node scopes) that ``pattern`` matches, in graph order:
    "*" matches any one path component, "{0,2}" one of those; "" matches the root (nodes of no module)."""
    depth = len(pattern.split(".")) if pattern else 0
    rx = _scope_regex(pattern) if pattern else None
    seen = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        parts = _scope(n).split(".") if _scope(n) else []
        if len(parts) >= depth:
            head = ".".join(parts[:depth])
            if rx is None or rx.fullmatch(head):
                seen.setdefault(head, None)
    return list(seen)


# --------------------------------------------------------------------------------------- candidates

def _scopes(kind: str, nodes: list[fx.Node], block: str | None) -> list[str]:
    """Module scopes among ``nodes`` that may hold a ``kind`` region, in graph order."""
    seen: dict[str, None] = {}
    for n in nodes:
        s = _scope(n)
        if kind == "pair" and block is not None and _under(s, block) and s != block:
            seen.setdefault(_child(s, block), None)
        elif kind == "mlp" and _op(n) == "linear" and "." in s:
            seen.setdefault(s.rsplit(".", 1)[0], None)
        elif kind == "attention" and _op(n) == _SDPA:
            seen.setdefault(s, None)
        elif kind == "lm_head_loss" and _op(n) == "linear":
            seen.setdefault(s, None)
    if block is not None:
        return [s for s in seen if _under(s, block)]
    return list(seen)


def _verified(gm, kind, scope, taken, pool: list[fx.Node], nodes: dict[str, fx.Node]
              ) -> tuple[list[str], int, ChunkFlow] | None:
    """The first candidate region of ``kind`` in ``scope`` among ``pool`` (the folding region that holds
    it; disjoint from ``taken``) that chunks along a sequence-like dim: (names, dim, flow), or None.
    ``nodes``: the graph's nodes by name."""
    for names in _candidates(gm, kind, scope, pool):
        if any(nodes[x] in taken for x in names):
            continue
        got = _chunk_dim(gm, kind, names)
        if got is not None:
            return (names, *got)
    return None


def _candidates(gm: fx.GraphModule, kind: str, scope: str, pool=None) -> list[list[str]]:
    """Candidate regions (node names) of ``kind`` in the module ``scope``, best first, among ``pool``
    (default: every node of ``gm``)."""
    pool = gm.graph.nodes if pool is None else pool
    nodes = [n for n in pool if n.op == "call_function" and _under(_scope(n), scope)]
    if not nodes:
        return []
    if kind == "pair":
        return _pair_candidates(nodes, scope)
    if kind == "mlp":
        return _mlp(nodes, scope)
    if kind == "attention":
        sdpa = [n for n in nodes if _op(n) == _SDPA and _scope(n) == scope]
        return [r] if len(sdpa) == 1 and (r := _attention(nodes, sdpa[0])) else []
    return [r] if (r := _lm_head(gm, nodes, scope)) else []


def _pair_candidates(nodes: list[fx.Node], scope: str) -> list[list[str]]:
    """The module minus its first j units (children, own ops) for j = 0, 1, ..., when its input is a pair
    representation [B, N, N, c]."""
    anchor = nodes[0].all_input_nodes[0] if nodes[0].all_input_nodes else None
    shape = _shape(anchor) if anchor is not None and isinstance(_val(anchor), torch.Tensor) else ()
    if len(shape) != 4 or shape[1] != shape[2]:
        return []
    units: dict[str, list[fx.Node]] = {}
    for n in nodes:
        s = _scope(n)
        units.setdefault(_child(s, scope) if s != scope else f"#{n.name}", []).append(n)
    groups = list(units.values())
    kept = [{n for g in groups[j:] for n in g} for j in range(len(groups))]
    return [[n.name for n in nodes if n in keep] for keep in kept]


def _mlp(nodes: list[fx.Node], scope: str) -> list[list[str]]:
    """Per run of the module's own linears (its direct children, in graph order, split where an attention
    or einsum runs between two of them): its nodes from the run's first linear to its last, if they read
    one tensor from outside (a gated attention output reads two) and the last linear needs the first."""
    runs, run = [], []
    for i, n in enumerate(nodes):
        if _op(n) in _MIXERS:
            runs, run = runs + [run], []
        elif _op(n) == "linear" and _scope(n).rsplit(".", 1)[0] == scope:
            run.append(i)
    out = []
    for run in runs + [run]:
        region = nodes[run[0]:run[-1] + 1] if len(run) >= 2 else []
        inside = set(region)
        reads = {a for n in region for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
        if len(reads) == 1 and nodes[run[0]] in _ancestors(nodes[run[-1]], inside):
            out.append([n.name for n in region])
    return out


def _attention(nodes: list[fx.Node], sdpa: fx.Node) -> list[str] | None:
    """The query path (nodes only q depends on), the attention, and the path to the output projection."""
    inside = set(nodes)
    kw = _kwargs(sdpa)
    shared = set()
    for key in ("key", "value", "attn_mask"):
        if isinstance(kw.get(key), fx.Node):
            shared |= _ancestors(kw[key], inside)
    q = _ancestors(kw["query"], inside) - shared
    # a getitem of a split shared with k and v cannot start the region (its anchor is a tuple)
    q = {n for n in q if not (n.target is operator.getitem and n.args[0] not in q)}
    below = _descendants(sdpa, inside)
    after = [n for n in nodes if n in below]
    linears = [n for n in after if _op(n) == "linear"]
    last = linears[-1] if linears else after[-1]
    path = set(region_between(sdpa, last))
    return [n.name for n in nodes if n in q or n.name in path]


def _lm_head(gm: fx.GraphModule, nodes: list[fx.Node], scope: str) -> list[str] | None:
    """The last linear of ``scope`` that feeds the loss, through the loss."""
    loss = _loss(gm)
    if loss is None:
        return None
    up = _ancestors(loss, None)
    linears = [n for n in nodes if _op(n) == "linear" and _scope(n) == scope and n in up]
    if not linears:
        return None
    names = region_between(linears[-1], loss)
    if sum(_op(n) == "linear" for n in gm.graph.nodes if n.name in set(names)) > 1:
        return None  # another linear follows: this one is not the head
    return names


def _loss(gm: fx.GraphModule) -> fx.Node | None:
    """The last reduction (mean cross-entropy / MSE / mean / sum) the graph's first output depends on."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    first = output.args[0]
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if not isinstance(first, fx.Node):
        return None
    up = _ancestors(first, None)
    losses = [n for n in gm.graph.nodes if n in up and n.target in _LOSSES]
    return losses[-1] if losses else None


def _chunk_dim(gm, kind, names) -> tuple[int, ChunkFlow] | None:
    """The longest sequence-like dim of the anchor along which ``names`` chunks (dims 1 .. rank-2, the
    first of equals; dim 0 for a flattened [B*S, h] anchor)."""
    first = next(n for n in gm.graph.nodes if n.name in set(names))
    if not first.all_input_nodes or not isinstance(_val(first.all_input_nodes[0]), torch.Tensor):
        return None
    rank = len(_shape(first.all_input_nodes[0]))
    best = None
    for dim in [*range(1, rank - 1), *([0] if rank == 2 else [])]:
        try:
            flow = chunk_flow(gm, names, dim)
        except ChunkError:
            continue
        if _accepted(kind, flow) and (best is None or flow.size > best[1].size):
            best = dim, flow
    return best


def _accepted(kind: str, flow: ChunkFlow) -> bool:
    """A region worth chunking: an axis of 2 or more, a matmul in the loop; attention query-chunked."""
    if flow.size < 2 or not any(_op(n) in _MIXERS | {"linear"} for n in flow.body):
        return False
    if kind == "attention":
        sdpa = [n for n in flow.body if _op(n) == _SDPA]
        return len(sdpa) == 1 and flow.dims[sdpa[0]].pos == len(_shape(sdpa[0])) - 2
    return True


# --------------------------------------------------------------------------------------- pricing

def _priced(kind, pattern, template, scopes, names, dim, flow: ChunkFlow, grad, number) -> ChunkRegion:
    """The region's numbers: memory probed (:func:`_probe`), FLOPs and bytes moved counted over the nodes
    the loop runs (the body) like ``search.space``. ``number``: ``float``, or for a symbolic capture the
    conversion of a size to a sympy expression (then ``transient_bytes`` is the probe's timeline)."""
    flops = moved = 0.0
    for n in flow.body:
        if "autopar" in n.meta:
            w = node_work(n, 1, True)
            flops += w.block_fwd_flops
            moved += w.block_fwd_bytes
    saved, timeline, grad_in = _probe(flow, grad, number)
    if number is float:
        size, transient = flow.size, float(peak_above(timeline))
    else:  # symbolic: evaluated at a point by search.specialize
        size, transient = number(flow.size), timeline
    params = sum(_bytes(_val(n)) for n in flow.inputs if n.op == "get_attr" and grad[n])
    return ChunkRegion(kind, pattern, template, len(scopes), tuple(names), dim, size, saved, transient, grad_in, flops,
                       moved, flow.scalar_loss, float(params), scopes)


def peak_above(timeline) -> float:
    """T from a probe's ``timeline`` = (live bytes when the backward begins less what was alive then,
    then each storage allocated (+) or freed (-) during it): the highest point reached, at least 0."""
    live, peak = timeline[0], 0
    for delta in timeline[1:]:
        live += delta
        peak = max(peak, live)
    return peak


def _nonzero(n) -> bool:
    """``n != 0`` without a guard on a symbolic size (a size expression that is not the constant 0)."""
    return n != 0 if isinstance(n, int) else n.node.expr != 0


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _LiveBytes(TorchDispatchMode):
    """Storages aten ops create (not those in ``exclude``) as a timeline of (storage id, +bytes | -bytes)."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude = exclude
        self.refs: dict[int, list[int]] = {}  # storage -> [bytes, live tensors, storage id]
        self.events: list[tuple[int, int]] = []
        self.sids = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _nonzero(t.untyped_storage().nbytes()) and _key(t) not in self.exclude:
                key = _key(t)
                if key not in self.refs:
                    self.refs[key] = [t.untyped_storage().nbytes(), 0, self.sids]
                    self.events.append((self.sids, self.refs[key][0]))
                    self.sids += 1
                self.refs[key][1] += 1
                weakref.finalize(t, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[1] -= 1
        if not entry[1]:
            self.events.append((entry[2], -entry[0]))
            del self.refs[key]


def _probe(flow: ChunkFlow, grad: dict[fx.Node, bool], number=float) -> tuple[float, tuple, float]:
    """(S, the backward's timeline for :func:`peak_above`, I) of the module docstring: the region's body
    run once, unchunked, forward and backward, on fake CPU tensors shaped like the graph's (``grad``:
    :func:`_requires_grad` of the graph). A symbolic capture's graph runs in its own fake mode, so
    sizes stay ``torch.SymInt``: ``number`` makes each byte count what is returned (``float``, or a
    sympy expression in B and S)."""
    cpu = torch.device("cpu")

    def arg(a):
        return cpu if isinstance(a, torch.device) else a

    def fake(v, grad):
        if not isinstance(v, torch.Tensor):
            return v
        return torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=cpu).requires_grad_(grad)

    shapes = [v for n in flow.inputs for v in tree_leaves(_val(n)) if isinstance(v, torch.Tensor)]
    symbolic = next((v.fake_mode for v in shapes if any(isinstance(d, torch.SymInt) for d in v.shape)), None)
    with symbolic or FakeTensorMode():
        env = {n: tree_map(lambda v, n=n: fake(v, grad[n]), _val(n)) for n in flow.inputs}
        inputs = {_key(t) for t in tree_leaves(list(env.values())) if isinstance(t, torch.Tensor)}
        saved: dict[int, int] = {}

        def pack(t):
            if _key(t) not in inputs:
                saved[_key(t)] = t.untyped_storage().nbytes()
            return t

        mode = _LiveBytes(inputs)
        with mode:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                for n in flow.body:
                    args = tree_map(arg, fx.map_arg((n.args, n.kwargs), env.__getitem__))
                    env[n] = n.target(*args[0], **args[1])
            del args
            outs = [env[n] for n in flow.outputs if env[n].requires_grad]
            for n in flow.body:
                del env[n]
            alive = sum(entry[0] for entry in mode.refs.values())
            start = len(mode.events)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            weights = {mode.refs[_key(t.grad)][2] for n, t in env.items()
                       if n.op == "get_attr" and t.grad is not None and _key(t.grad) in mode.refs}
        before = sum(number(d) for sid, d in mode.events[:start] if sid not in weights)
        after = [number(d) for sid, d in mode.events[start:] if sid not in weights]
        s = sum(b for k, b in saved.items() if k not in {_key(o) for o in outs})
        sliced = sum(_bytes(_val(n)) for n in flow.inputs if n in flow.dims and grad[n] and n.op != "get_attr")
    return number(s), (before - number(alive), *after), number(sliced)


def _requires_grad(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """Whether each node's value carries a gradient: a parameter, or floating and computed from one."""
    out: dict[fx.Node, bool] = {}
    for n in gm.graph.nodes:
        v = _val(n)
        if n.op == "get_attr":
            out[n] = isinstance(v, torch.Tensor) and v.requires_grad
        else:
            floating = any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tree_leaves(v))
            out[n] = floating and any(out.get(a, False) for a in n.all_input_nodes)
    return out


def _bytes(val):
    """Bytes of a traced value's tensors (an int, or a ``torch.SymInt`` on a symbolic capture)."""
    if isinstance(val, torch.Tensor):
        return val.numel() * val.element_size()
    if isinstance(val, (list, tuple)):
        return sum(_bytes(v) for v in val)
    return 0


# --------------------------------------------------------------------------------------- helpers

def _pattern(instances: tuple[str, ...], scopes: list[str]) -> str | None:
    """The instances' scopes as one pattern: "*" where they differ ("blocks.0", "blocks.1" -> "blocks.*"),
    or the alternatives ("blocks.{0,2}") where "*" would also match another of the graph's ``scopes``;
    None if even that matches more (instances differing in several components)."""
    parts = [s.split(".") for s in instances]
    if len({len(p) for p in parts}) != 1:
        return None
    columns = list(zip(*parts))
    star = ".".join(c[0] if len(set(c)) == 1 else "*" for c in columns)
    alts = ".".join(c[0] if len(set(c)) == 1 else "{" + ",".join(dict.fromkeys(c)) + "}" for c in columns)
    for pattern in (star, alts):
        rx = _scope_regex(pattern)
        if {s for s in scopes if rx.fullmatch(s)} <= set(instances):
            return pattern
    return None


def _scope_regex(pattern: str) -> re.Pattern:
    """A scope pattern as a regex over whole scopes: "*" is one path component, "{a,b}" one of them."""
    def part(p):
        if p == "*":
            return "[^.]+"
        if p.startswith("{") and p.endswith("}"):
            return "(?:" + "|".join(re.escape(a) for a in p[1:-1].split(",")) + ")"
        return re.escape(p)
    return re.compile(r"\.".join(part(p) for p in pattern.split(".")))


def _under(scope: str, prefix: str) -> bool:
    return scope == prefix or scope.startswith(prefix + ".") or prefix == ""


def _child(scope: str, parent: str) -> str:
    """The child of ``parent`` that ``scope`` lies in: ("blocks.0.tri_mul.left.proj", "blocks.0") ->
    "blocks.0.tri_mul"."""
    rest = scope[len(parent) + 1:] if parent else scope
    return (parent + "." if parent else "") + rest.split(".", 1)[0]


def _ancestors(node: fx.Node, inside: set | None) -> set[fx.Node]:
    """``node`` and what it depends on (only through ``inside`` nodes when given)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or (inside is not None and n not in inside):
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _descendants(node: fx.Node, inside: set) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or n not in inside:
            continue
        seen.add(n)
        stack.extend(n.users)
    return seen
