"""DTensor carriers for per-op placement plans (``search.opspace``): placement strings to DTensor
placements, one reshard helper the emitted graph calls before every op, and the sharding rule torch
lacks for the CPU flash-attention kernel.

A placement string has one entry per mesh axis, ``"R"``, ``"P"`` or ``"S<d>"``: ``"R,S1"`` is
replicated over the first axis and sharded on dim 1 over the second (``search.opspace.describe``).
"""
from __future__ import annotations

import threading

import torch
from torch._prims_common import make_contiguous_strides_for
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding
from torch.utils._python_dispatch import TorchDispatchMode

from runtime.collectives import algorithmic_bytes, comm_stats
from runtime.dsp import switch_shard
from search.opspace import reshard_steps

aten = torch.ops.aten
_lock = threading.Lock()
_registered = False


def parse(spec: str) -> tuple:
    """``"R,S1"`` -> (Replicate(), Shard(1))."""
    return tuple(_placement(p if p in ("R", "P") else int(p[1:])) for p in spec.split(","))


def _placement(p):
    """One axis as ``search.opspace`` writes it (a dim, ``"R"`` or ``"P"``) as a DTensor placement."""
    return Replicate() if p == "R" else Partial() if p == "P" else Shard(p)


def to_placement(x, mesh, spec: str, grad: str | None = None):
    """``x`` as a DTensor placed as ``spec`` (a plain tensor is every rank's same whole value: its
    shards are local slices). ``grad``: where the gradient must be when it leaves here in backward (the
    plan's pricing: where the producer's backward needs it, or the hub's summing placement), whatever
    the reader's backward made; default: where ``x`` is (partial read as replicated). Both directions
    take the moves the plan priced (:class:`_Place`)."""
    if not isinstance(x, torch.Tensor):
        return x
    want = parse(spec)
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, [Replicate()] * mesh.ndim, run_check=False)
    back = parse(grad) if grad is not None else tuple(Replicate() if p.is_partial() else p for p in x.placements)
    return _Contiguous.apply(_Place.apply(x, want, back))


def _reshard(x: DTensor, mesh, want: tuple) -> DTensor:
    """``x`` placed as ``want`` by the one-axis moves the plan priced (``search.opspace.reshard_steps``):
    a Shard(i) -> Shard(j) move is one all-to-all of the local shard on its axis, forward and backward
    (``runtime.dsp.switch_shard``; DTensor on CPU process groups would gather the whole tensor), any
    other move one DTensor redistribute on one axis."""
    cur = list(x.placements)
    for a, s, d in reshard_steps(_spec(cur), _spec(want), tuple(mesh.shape)):
        cur[a] = _placement(d)
        if isinstance(s, int) and isinstance(d, int):
            local = switch_shard(x.to_local(), mesh.get_group(a), s, d)
            x = DTensor.from_local(local, mesh, cur, run_check=False, shape=x.shape,
                                   stride=make_contiguous_strides_for(x.shape))
        else:
            x = x.redistribute(mesh, cur)
    return x


def _spec(placements) -> tuple:
    """DTensor placements as ``search.opspace`` writes them: a dim, ``"R"`` or ``"P"``."""
    return tuple(p.dim if p.is_shard() else "P" if p.is_partial() else "R" for p in placements)


class _Place(torch.autograd.Function):
    """``x`` resharded to ``want`` (:func:`_reshard`); backward places the gradient as ``back`` with
    :func:`_reshard` too, in one go, as the plan prices an edge's backward. DTensor's own backward of a
    redistribute would move the gradient back in its own order (e.g. gather a shard, then all-reduce the
    whole tensor, where the plan reduces the shard first). A partial target on an axis where the
    gradient is not partial keeps it as it is there (nothing to sum)."""

    @staticmethod
    def forward(ctx, x, want, back):
        ctx.back = back
        return x.view_as(x) if tuple(x.placements) == want else _reshard(x, x.device_mesh, want)

    @staticmethod
    def backward(ctx, g):
        if not isinstance(g, DTensor):
            return g, None, None
        want = tuple(cur if w.is_partial() and not cur.is_partial() else w
                     for cur, w in zip(g.placements, ctx.back))
        return (g if tuple(g.placements) == want else _reshard(g, g.device_mesh, want)), None, None


def _contiguous(x):
    """``x`` with a contiguous shard: DTensor's view rules check the global strides, not the shard's, so
    a view of a strided shard (after a reshard, or a transpose's gradient) would fail."""
    if isinstance(x, DTensor) and not x._local_tensor.is_contiguous():
        return aten.clone.default(x, memory_format=torch.contiguous_format)
    return x


class _Contiguous(torch.autograd.Function):
    """Contiguous shards forward and backward (gradients reach the producer through here too)."""

    @staticmethod
    def forward(ctx, x):
        return _contiguous(x)

    @staticmethod
    def backward(ctx, g):
        return _contiguous(g)


def expect(x, mesh, spec: str, counter: dict):
    """``x`` as the plan placed it: DTensor's own propagation may place an op's output otherwise
    (``counter["mismatch"]`` counts those); a partial output is left partial when the plan says P."""
    if not isinstance(x, DTensor):
        return x
    want = parse(spec)
    got = tuple(x.placements)
    if all(g == w or (g.is_partial() and w.is_partial()) for g, w in zip(got, want)):
        return x
    counter["mismatch"] = counter.get("mismatch", 0) + 1
    return x.redistribute(mesh, want)


def whole(x):
    """A graph output as every rank's whole tensor."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def register_rules() -> None:
    """Batch and head sharding for torch's CPU flash attention (forward and backward), which has no
    DTensor rule in torch 2.13 (``F.scaled_dot_product_attention`` on DTensors fails without it).
    Idempotent."""
    global _registered
    with _lock:
        if _registered:
            return

        def mask(m, d):   # an explicit mask is sharded with q where it is not broadcast
            if m is None:
                return []
            k = d - (4 - len(m.shape))
            return [Shard(k) if k >= 0 and m.shape[k] > 1 else Replicate()]

        @register_sharding(aten._scaled_dot_product_flash_attention_for_cpu.default)
        def _fwd(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
            r = [Replicate()] * (4 if attn_mask is not None else 3)
            return [([Replicate()] * 2, r)] + [([Shard(d)] * 2, [Shard(d)] * 3 + mask(attn_mask, d)) for d in (0, 1)]

        @register_sharding(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
        def _bwd(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None, scale=None):
            r = [Replicate()] * (7 if attn_mask is not None else 6)
            return [([Replicate()] * 3, r)] + [([Shard(d)] * 3, [Shard(d)] * 6 + mask(attn_mask, d)) for d in (0, 1)]

        _registered = True


_FUNCOL = {"all_reduce": "all_reduce", "all_reduce_": "all_reduce", "all_gather_into_tensor": "all_gather",
           "reduce_scatter_tensor": "reduce_scatter", "all_to_all_single": "all_to_all"}


class CountCollectives(TorchDispatchMode):
    """While active, DTensor's functional collectives (forward and backward) are counted into
    ``runtime.collectives.comm_stats`` with the ring bytes the cost model prices (an all-gather by the
    gathered size, the others by the buffer's); anything else of theirs as ``other:<op>`` with 0 bytes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "_c10d_functional" and not func.__name__.startswith("wait_tensor"):
            op = func._schema.name.split("::")[-1]
            kind = _FUNCOL.get(op)
            if kind is None:
                comm_stats.add(f"other:{op}", 0)
            else:
                t = args[0]
                p = _resolve_process_group(args[-1] if isinstance(args[-1], str) else kwargs["group_name"]).size()
                n = t.numel() * t.element_size() * (p if kind == "all_gather" else 1)
                comm_stats.add(kind, algorithmic_bytes(kind, n, p))
        return func(*args, **kwargs)
