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

Memory model (what the planner uses), counted like ``search.space`` (a node's output is a saved
activation when it has backward FLOPs and is not a view): ``act_bytes`` are the saved activations of one
instance of the region, ``output_bytes`` the part of them that are its outputs. Chunked k ways, the
forward keeps only each chunk's inputs (views of tensors that are alive, and counted, anyway) and the
outputs: every intermediate is freed. The backward recomputes one chunk at a time, and one instance at a
time, so (act_bytes - output_bytes) / k is alive once per region, not once per instance.
:func:`chunk_memory` is one instance's share: output_bytes + (act_bytes - output_bytes) / (k * instances),
so ``instances * (act_bytes - chunk_memory(r, k))`` is what chunking every instance frees, a lower
bound of what it frees after the forward. Measured (live bytes of activations, parameters excluded;
GPT h=32, ffn 1024, seq 256, vocab 2048, batch 2, fp32; ``tests/test_chunking.py`` checks the first line):

* 4 layers, MLPs chunked: 16.0 MiB fewer alive after the forward, the counted internals exactly, and the
  step's peak falls as much, for k = 2, 4 and 8 alike (model: 14.0, 15.0, 15.5 MiB).
* 1 layer, LM head + loss chunked (u = ``peak_bytes`` = the logits, 4 MiB): 4.0 MiB fewer after the
  forward (model 2.0, 3.0, 3.5 MiB); the step's peak, set by this region's backward, falls by 5.7, 8.7
  and 9.7 MiB, close to 3u(1 - 1/k) = 6.0, 9.0, 10.5 MiB (the saved tensor, the gradient arriving and the
  gradient leaving, each cut k ways). The planner's sum of saved activations leaves such backward
  transients out, for chunked and unchunked regions alike.
* 4 layers, all regions: 20.3 MiB fewer after the forward (internals 20.25); peak 30.2 MiB falls by
  21.9, 24.9, 26.4 MiB for k = 2, 4, 8 (model 16.2, 18.2, 19.2).

Time model: the backward recomputes the chunked nodes' forward once, ``fwd_flops`` (matmul/attention
FLOPs) and ``fwd_mem_bytes`` (bytes the memory-bound ops move) per instance, and each of the
``len(nodes)`` kernels is launched k times on 1/k of the data in both passes and the recompute.

Limitations: attention is chunked only where it is one ``scaled_dot_product_attention`` (not after
``passes.sp`` replaced it; not eager matmul-softmax attention); a pattern is per template, and a model
whose instances differ in several path components at once is skipped.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from search.chunkflow import (MEAN_OPS, ChunkError, ChunkFlow, _kwargs, _op, _scope, _shape, _val, chunk_flow,
                              region_between)
from search.fold import Folding, fold
from search.graph import ModelGraph
from search.space import _node_work

__all__ = ["ChunkRegion", "chunk_regions", "chunk_memory", "find_regions", "matching_scopes", "KINDS"]

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
    act_bytes: float          # saved activations of the region's chunked nodes (as search.space counts)
    output_bytes: float       # the part of act_bytes that are the region's outputs (kept when chunked)
    input_bytes: float        # bytes of the region's inputs (kept by the chunk loop; parameters excluded)
    peak_bytes: float         # largest intermediate u: an unchunked backward peaks near 3u here
    fwd_flops: float          # forward matmul/attention FLOPs of the chunked nodes: the backward's recompute
    fwd_mem_bytes: float      # forward bytes moved by its memory-bound ops (recomputed too)


def chunk_memory(region: ChunkRegion, k: int) -> float:
    """Saved-activation bytes of one instance of ``region`` chunked ``k`` ways, as its share of the region:
    its outputs, plus 1 / instances of one chunk's intermediates, which are alive for one instance at a
    time while the backward recomputes it (inputs are counted where they are produced)."""
    k = max(1, min(int(k), region.size))
    return region.output_bytes + (region.act_bytes - region.output_bytes) / (k * max(region.instances, 1))


def chunk_regions(mg: ModelGraph, folding: Folding | None = None) -> list[ChunkRegion]:
    """The chunkable regions of ``mg`` (see the module docstring), in graph order of their first node."""
    folding = folding if folding is not None else fold(mg)
    gm = mg.gm
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_name = {n.name: n for n in gm.graph.nodes}
    taken: set[fx.Node] = set()
    out: list[tuple[int, ChunkRegion]] = []
    block_scopes: dict[int, list[str]] = {}  # depth -> the scopes of the blocks at that depth
    for r in folding.regions:
        if r.template is not None:
            block_scopes.setdefault(len(r.scope.split(".")), []).append(r.scope)

    def add(kind, scope, pattern, template, instances, names, dim, flow):
        taken.update(by_name[n] for n in names)
        region = _priced(kind, pattern, template, instances, names, dim, flow, by_name)
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
                found = _verified(gm, kind, scope, taken)
                if found is not None:
                    add(kind, scope, prefix + scope[len(r.scope):], r.template, len(instances), *found)
    outside = [by_name[n] for r in folding.regions if r.template is None for n in r.nodes]
    for scope in _scopes("lm_head_loss", outside, None):
        found = _verified(gm, "lm_head_loss", scope, taken)
        if found is not None:
            add("lm_head_loss", scope, scope, None, 1, *found)
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


def _verified(gm, kind, scope, taken) -> tuple[list[str], int, ChunkFlow] | None:
    """The first candidate region of ``kind`` in ``scope`` (disjoint from ``taken``) that chunks along a
    sequence-like dim: (names, dim, flow), or None."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for names in _candidates(gm, kind, scope):
        if any(nodes[x] in taken for x in names):
            continue
        got = _chunk_dim(gm, kind, names)
        if got is not None:
            return (names, *got)
    return None


def _candidates(gm: fx.GraphModule, kind: str, scope: str) -> list[list[str]]:
    """Candidate regions (node names) of ``kind`` in the module ``scope``, best first."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and _under(_scope(n), scope)]
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
    path = set(region_between(sdpa.graph.owning_module, sdpa.name, last.name))
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
    names = region_between(gm, linears[-1].name, loss.name)
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

def _priced(kind, pattern, template, instances, names, dim, flow: ChunkFlow, by_name) -> ChunkRegion:
    """The region's numbers, counted over the nodes the loop runs (the body) like ``search.space``."""
    act = out_act = flops = moved = peak = 0.0
    outputs = set(flow.outputs)
    for n in flow.body:
        if "autopar" in n.meta:
            w = _node_work(n, 1, True)
            act += w.act_bytes
            out_act += w.act_bytes if n in outputs else 0.0
            flops += w.block_fwd_flops
            moved += w.block_fwd_bytes
        peak = max(peak, _bytes(_val(n)))
    inputs = sum(_bytes(_val(n)) for n in flow.inputs if n.op != "get_attr")
    return ChunkRegion(kind, pattern, template, instances, tuple(names), dim, flow.size, act, out_act,
                       float(inputs), peak, flops, moved)


def _bytes(val) -> float:
    if isinstance(val, torch.Tensor):
        return float(val.numel() * val.element_size())
    if isinstance(val, (list, tuple)):
        return sum(_bytes(v) for v in val)
    return 0.0


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
