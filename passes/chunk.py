"""apply_chunk: run a region of the captured graph as a loop over chunks of one dimension (AutoChunk).

    >>> from examples.zoo import build
    >>> from planner.capture import capture
    >>> from search.chunkflow import scope_region
    >>> model, args, _ = build("gpt-tiny", batch=2, device="cpu")
    >>> gm = capture(model, args).gm
    >>> mlp = scope_region(gm, "blocks.0.mlp")                    # fc -> gelu -> proj
    >>> loss = apply_chunk(gm, mlp, dim=1, chunks=3)(*args)      # same loss, a third of the MLP alive

The analysis (which nodes run per chunk, which inputs are sliced along which dim, how outputs combine)
is :func:`search.chunkflow.chunk_flow`; this pass applies exactly what it verified. :func:`apply_chunking`
applies a plan's ``chunking`` entries ({kind, scope, dim, chunks}, from ``search.chunking``) to a per-rank
graph, finding each region again by module scope.

Execution (:class:`ChunkedRegion`): the per-chunk nodes become a body GraphModule called once per chunk
under non-reentrant ``torch.utils.checkpoint``. The forward keeps only each chunk's inputs (views of
tensors that are alive anyway); the backward recomputes one chunk at a time (the autograd engine runs a
chunk's whole graph before the previous chunk's: it goes in reverse creation order), so one chunk's
intermediates are alive at a time in both passes, for the price of a second forward of the region.
A region that ends in one scalar loss (LM head + cross-entropy) is not recomputed: each chunk's backward
runs in the forward and the backward scales the kept gradients (:class:`_GradientsInForward`).
Outputs are concatenated along their chunked dim. Chunk sizes follow ``torch.tensor_split`` (the first
``size % chunks`` chunks are one longer). A causal attention whose queries are chunked gets an explicit
mask for the chunk's rows and only the keys up to its last row.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.operator_schemas import normalize_function
from torch.utils.checkpoint import checkpoint

from passes.outline import outline
from search.chunkflow import (MEAN_OPS, ChunkDim, ChunkError, ChunkFlow, _op, _show, causal_queries, chunk_flow,
                              reduction_kind)
from search.chunking import KINDS, find_regions, matching_scopes
from search.errors import BadInput

__all__ = ["apply_chunk", "apply_chunking", "ChunkedRegion", "causal_query_chunk_attention"]

aten = torch.ops.aten


# --------------------------------------------------------------------------------------- rewrite

def apply_chunk(gm: fx.GraphModule, region: list[str], dim: int, chunks: int) -> fx.GraphModule:
    """Rewrite ``gm`` in place: ``region`` runs as a loop over ``chunks`` chunks of dim ``dim`` of its
    anchor (see the module docstring); outputs, gradients and parameter names are unchanged."""
    flow = chunk_flow(gm, region, dim)
    if not 1 <= chunks <= flow.size:
        raise ChunkError(f"chunks must be between 1 and the axis length {flow.size}, got {chunks}")
    body, pass_start = _body(flow)
    module = ChunkedRegion(body, [flow.dims.get(n) for n in flow.inputs], flow.combine, chunks, pass_start,
                           flow.scalar_loss)
    outline(gm, flow.body, flow.inputs, flow.outputs, module, "chunked_" + flow.body[0].name)
    gm.recompile()
    return gm


def apply_chunking(gm: fx.GraphModule, chunking: list[dict]) -> fx.GraphModule:
    """Apply a plan's ``chunking`` entries ({"kind", "scope", "dim", "chunks"}, from
    ``search.chunking.chunk_regions``) to ``gm``, a per-rank graph of the model they were planned on
    (possibly rewritten by ``passes.tp`` / ``passes.sp``). Each entry chunks every instance its scope
    pattern matches, found again by module scope with the planner's rules
    (:func:`search.chunking.find_regions`) and verified with ``chunk_flow``, never by node names (they
    differ between the planner's capture and this rank's). ``chunks`` is capped at this rank's length of
    the axis (shorter under sequence parallelism). BadInput if an entry matches nothing."""
    todo, taken = [], set()
    rank = {k: i for i, k in enumerate(KINDS)}
    for i in sorted(range(len(chunking)), key=lambda i: rank.get(chunking[i].get("kind"), len(KINDS))):
        entry = chunking[i]  # kinds in the planner's priority order: a region is found as it was priced
        missing = {"kind", "scope", "dim", "chunks"} - set(entry)
        if missing:
            raise BadInput(f"chunking[{i}] lacks {sorted(missing)}: {entry}")
        kind, scope, dim, chunks = entry["kind"], entry["scope"], entry["dim"], entry["chunks"]
        what = f"chunking[{i}] ({kind} {scope!r}, dim {dim}, {chunks} chunks)"
        found = find_regions(gm, kind, scope, dim, taken)
        if not found:
            scopes = matching_scopes(gm, scope)
            why = (f"no module matches the scope {scope!r}" if not scopes else
                   "it overlaps an earlier entry" if find_regions(gm, kind, scope, dim) else
                   f"{len(scopes)} module(s) match {scope!r} ({', '.join(scopes[:3])}{', ...' if len(scopes) > 3 else ''})"
                   f" but none holds {'an' if kind[0] in 'aeiou' else 'a'} {kind} region")
            raise BadInput(f"{what} matches nothing in this graph: {why}; was the plan made for this model (and, "
                           "for attention, without sequence parallelism, which replaces the attention)?")
        for _, names in found:
            taken.update(names)
            todo.append((names, dim, chunks))
    for names, dim, chunks in todo:  # regions are disjoint: applying one leaves the others' names alone
        apply_chunk(gm, names, dim, min(chunks, chunk_flow(gm, names, dim).size))
    return gm


class ChunkedRegion(torch.nn.Module):
    """Run ``body`` once per chunk under non-reentrant checkpoint and combine the chunks' outputs.

    ``in_dims``: per body input, the ChunkDim it is sliced along (None: whole). ``combine``: per output,
    the ChunkDim to concatenate along, "sum", or "mean" (the body returns (sum, count) pairs).
    ``pass_start``: the body takes the chunk's first index along the axis as a last argument.
    ``scalar_loss``: the body's one output is a scalar sum or mean; when gradients are wanted the loop
    then runs as :class:`_GradientsInForward` (no checkpoint, nothing recomputed)."""

    def __init__(self, body: fx.GraphModule, in_dims, combine, chunks: int, pass_start: bool,
                 scalar_loss: bool = False):
        super().__init__()
        self.body = body
        self.in_dims = tuple(in_dims)
        self.combine = tuple(combine)
        self.chunks = chunks
        self.pass_start = pass_start
        self.scalar_loss = scalar_loss

    def extra_repr(self) -> str:
        def short(d):
            return "whole" if d is None else d if isinstance(d, str) else _show(d)
        return (f"chunks={self.chunks}, inputs=[{', '.join(map(short, self.in_dims))}], "
                f"outputs=[{', '.join(map(short, self.combine))}]")

    def forward(self, *inputs):
        if self.scalar_loss and torch.is_grad_enabled() and any(
                isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
            return (_GradientsInForward.apply(self, *inputs),)
        results = [checkpoint(self.body, *args, use_reentrant=False) for _, _, args in self.chunk_args(inputs)]
        return tuple(_combine(how, [r[i] for r in results]) for i, how in enumerate(self.combine))

    def chunk_args(self, inputs):
        """(start, length, the body's arguments) per chunk: inputs sliced or whole, then the start."""
        x, d = next((x, d) for x, d in zip(inputs, self.in_dims) if d is not None)
        for start, length in _spans(x.shape[d.pos] // (d.outer * d.inner), self.chunks):
            args = [x if d is None else _narrow(x, d, start, length) for x, d in zip(inputs, self.in_dims)]
            yield start, length, [*args, *([start] if self.pass_start else [])]


class _GradientsInForward(torch.autograd.Function):
    """A scalar-loss region (LM head + cross-entropy) chunked without recomputing it: each chunk's
    forward is followed at once by its backward (``torch.autograd.grad`` of its part of the loss), the
    gradients of the sliced inputs written into their slice of a full-size buffer and those of whole
    inputs (the head's weight) summed; the chunk's logits die before the next chunk starts. The
    backward only scales the buffers by the gradient arriving at the loss, a number (the chain rule for
    a scalar output), divided by the token count for a mean. What the region keeps after the forward is
    these buffers: the input gradients, never the logits (Liger's fused linear cross-entropy, for any
    region that ends in one scalar sum or mean)."""

    @staticmethod
    def forward(ctx, region: ChunkedRegion, *inputs):
        wanted = ctx.needs_input_grad[1:]
        grads = [torch.zeros_like(x) if want else None for x, want in zip(inputs, wanted)]
        total = count = 0
        with torch.enable_grad():
            for start, length, args in region.chunk_args(inputs):
                args = [a.detach().requires_grad_(want) if isinstance(a, torch.Tensor) and i < len(wanted) else a
                        for i, (a, want) in enumerate(zip(args, [*wanted, False]))]
                (part,) = region.body(*args)
                part, n = part if region.combine[0] == "mean" else (part, 1)
                leaves = [a for a, want in zip(args, wanted) if want]
                for g, buf, d in zip(torch.autograd.grad(part, leaves, allow_unused=True),
                                     [b for b in grads if b is not None],
                                     [d for d, want in zip(region.in_dims, wanted) if want]):
                    if g is not None:
                        (buf if d is None else _slice_of(buf, d, start, length)).add_(
                            g if d is None else g.unflatten(d.pos, (d.outer, -1)))
                total, count = total + part.detach(), count + n
        for buf in grads:
            if buf is not None and region.combine[0] == "mean":
                buf.div_(count)
        ctx.save_for_backward(*[b for b in grads if b is not None])
        return total / count if region.combine[0] == "mean" else total

    @staticmethod
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        return None, *[grad * next(saved) if want else None for want in ctx.needs_input_grad[1:]]


def _spans(size: int, chunks: int) -> list[tuple[int, int]]:
    """(start, length) of each chunk, as ``torch.tensor_split`` cuts (empty chunks left out)."""
    q, r = divmod(size, chunks)
    lengths = [q + (i < r) for i in range(chunks)]
    return [(sum(lengths[:i]), n) for i, n in enumerate(lengths) if n]


def _narrow(x: torch.Tensor, d: ChunkDim, start: int, length: int) -> torch.Tensor:
    """Chunk ``start .. start + length`` of the axis, which ``x`` carries as ``d``."""
    if d.outer == 1:
        return x.narrow(d.pos, start * d.inner, length * d.inner)
    x = x.unflatten(d.pos, (d.outer, -1))
    return x.narrow(d.pos + 1, start * d.inner, length * d.inner).flatten(d.pos, d.pos + 1)


def _slice_of(buf: torch.Tensor, d: ChunkDim, start: int, length: int) -> torch.Tensor:
    """A writable view of chunk ``start .. start + length`` of ``buf``, the axis (carried as ``d``)
    unflattened to (outer, rest) at ``d.pos``."""
    return buf.unflatten(d.pos, (d.outer, -1)).narrow(d.pos + 1, start * d.inner, length * d.inner)


def _combine(how, parts: list):
    """The chunks' results of one output put together: concatenated along a ChunkDim, or summed."""
    if how == "sum":
        return sum(parts)
    if how == "mean":
        return sum(p[0] for p in parts) / sum(p[1] for p in parts)
    if how.outer == 1:
        return torch.cat(parts, how.pos)
    return torch.cat([p.unflatten(how.pos, (how.outer, -1)) for p in parts], how.pos + 1).flatten(how.pos, how.pos + 1)


def _body(flow: ChunkFlow) -> tuple[fx.GraphModule, bool]:
    """The per-chunk graph: one placeholder per input (then ``chunk_start`` if a node needs it)."""
    g = fx.Graph()
    env = {n: g.placeholder(n.name) for n in flow.inputs}
    start = None
    if any(causal_queries(n, flow.dims) for n in flow.body):
        start = g.placeholder("chunk_start")
    for n in flow.body:
        env[n] = _emit(g, n, env, flow.dims, start)
    g.output(tuple(env[n] for n in flow.outputs))
    return fx.GraphModule(torch.nn.Module(), g), start is not None


def _emit(g: fx.Graph, n: fx.Node, env: dict, dims: dict, start) -> fx.Node:
    """Copy ``n`` into the body, with the arguments that name the axis's full length made per-chunk."""
    args, kwargs = fx.map_arg(n.args, env.__getitem__), fx.map_arg(n.kwargs, env.__getitem__)
    op, d = _op(n), dims.get(n)
    target = aten.reshape.default if op in ("view", "_unsafe_view") else n.target  # chunks may be strided
    if op in ("view", "reshape", "_unsafe_view") and d is not None:
        args = (args[0], _chunk_sizes(g, args[1], d.pos, d, args[0], dims[n.args[0]]))
    elif op == "unflatten" and d is not None and args[1] <= d.pos < args[1] + len(args[2]):
        args = (*args[:2], _chunk_sizes(g, args[2], d.pos - args[1], d, args[0], dims[n.args[0]]))
    elif op == "expand" and d is not None:
        sizes = list(args[1])
        sizes[d.pos] = -1  # keep the input's (chunk) size
        args = (args[0], sizes)
    elif causal_queries(n, dims):
        kw = normalize_function(n.target, args, kwargs, normalize_to_only_use_kwargs=True).kwargs
        target, args = causal_query_chunk_attention, (kw["query"], kw["key"], kw["value"], start)
        kwargs = {k: kw[k] for k in ("dropout_p", "scale", "enable_gqa")}
    elif d is not None and d.reduced and reduction_kind(n) == "mean":
        target = _PARTS[n.target]
    return g.create_node("call_function", target, args, kwargs, name=n.name)


def _chunk_sizes(g: fx.Graph, sizes, at: int, d: ChunkDim, src: fx.Node, src_d: ChunkDim) -> list:
    """A view's ``sizes`` with entry ``at`` (the chunked one) read off the chunk at run time; the other
    sizes stay as the graph has them (after tensor parallelism they are already local)."""
    size = g.call_function(aten.sym_size.int, (src, src_d.pos))
    if src_d.outer * src_d.inner > 1:
        size = g.call_function(operator.floordiv, (size, src_d.outer * src_d.inner))
    if d.outer * d.inner > 1:
        size = g.call_function(operator.mul, (size, d.outer * d.inner))
    sizes = list(sizes)
    sizes[at] = size
    return sizes



def causal_query_chunk_attention(q, k, v, start: int, dropout_p: float = 0.0, scale=None, enable_gqa: bool = False):
    """``is_causal`` attention for the query rows ``start .. start + L`` of the full attention (top-left
    aligned, as SDPA's ``is_causal``): keys past the chunk's last row are dropped, the rest masked."""
    rows = q.shape[-2]
    keys = min(k.shape[-2], start + rows)
    mask = torch.arange(start, start + rows, device=q.device)[:, None] >= torch.arange(keys, device=q.device)
    return F.scaled_dot_product_attention(q, k[..., :keys, :], v[..., :keys, :], attn_mask=mask,
                                          dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)


def _mean_parts(x, dim=None, keepdim=False, dtype=None):
    """(sum, count) of a mean: the chunks' means combine as sum of sums / sum of counts."""
    total = x.sum(dim=dim, keepdim=keepdim, dtype=dtype) if dim else x.sum(dtype=dtype)
    return total, x.numel() // max(total.numel(), 1)


def _cross_entropy_parts(logits, target, weight=None, reduction=1, ignore_index=-100, label_smoothing=0.0):
    """(sum, count) of a mean cross-entropy: the mean is over the targets that are not ignored."""
    total = aten.cross_entropy_loss(logits, target, weight, 2, ignore_index, label_smoothing)
    return total, (target != ignore_index).sum()


def _mse_parts(a, b, reduction=1):
    return aten.mse_loss(a, b, 2), math.prod(torch.broadcast_shapes(a.shape, b.shape))


_PARTS = {aten.mean.default: _mean_parts, aten.mean.dim: _mean_parts,
          aten.cross_entropy_loss.default: _cross_entropy_parts, aten.mse_loss.default: _mse_parts}
assert set(_PARTS) == set(MEAN_OPS), "one (sum, count) part function per mean op the analysis splits"
