"""Counted collectives and autograd-aware Megatron ops (copy_to_group / reduce_from_group, and the
sequence-parallel ones: reduce_scatter_to_sequence / gather_from_sequence / scatter_to_sequence).

Every collective issued by autopar's runtime goes through this module so that `comm_stats` can report
the bytes a rank sends, in the same units the cost model prices (DESIGN §4, ring algorithms), and a
real run can be checked against the plan's predicted `comm_bytes`.

Byte accounting (per call, n = bytes of the FULL buffer, p = group size):

    all_reduce                    2 (p-1) n / p
    all_gather, reduce_scatter      (p-1) n / p      (n = bytes of the gathered / unscattered tensor)
    send (p2p)                      n                 (recv counts nothing: the sender pays)
    all_to_all                      (p-1) n / p      (n = bytes of the tensor this rank holds)
    isend_irecv (p2p)               n per sent tensor (recvs count nothing)

Integer math: each call adds ``(k * (p - 1) * n) // p`` with k = 2 or 1, i.e. the exact product is
formed in integers and floored once per call (exact whenever p divides n, which holds for every
evenly sharded buffer). Size-1 groups issue no communication and are not counted.

    >>> from runtime.collectives import comm_stats
    >>> comm_stats.reset(); comm_stats.snapshot()
    {}
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist

__all__ = [
    "CommStats",
    "comm_stats",
    "algorithmic_bytes",
    "group_size",
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "send",
    "recv",
    "all_to_all",
    "isend_irecv",
    "copy_to_group",
    "reduce_from_group",
    "reduce_scatter_to_sequence",
    "gather_from_sequence",
    "scatter_to_sequence",
    "all_reduce_mean_scalar",
]

_FACTOR = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1, "all_to_all": 1}


def algorithmic_bytes(kind: str, nbytes: int, p: int) -> int:
    """Bytes one rank sends for a ring `kind` over `p` ranks on an `nbytes` full buffer."""
    if kind == "p2p":
        return int(nbytes)
    if p <= 1:
        return 0
    return (_FACTOR[kind] * (p - 1) * int(nbytes)) // p


class CommStats:
    """Per-process counter: kind -> {"calls": int, "bytes": int}."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, int]] = {}

    def reset(self) -> None:
        with self._lock:
            self._data = {}

    def add(self, kind: str, nbytes: int) -> None:
        with self._lock:
            entry = self._data.setdefault(kind, {"calls": 0, "bytes": 0})
            entry["calls"] += 1
            entry["bytes"] += int(nbytes)

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {k: dict(v) for k, v in sorted(self._data.items())}

    def total_bytes(self) -> int:
        with self._lock:
            return sum(v["bytes"] for v in self._data.values())


comm_stats = CommStats()


def group_size(group=None) -> int:
    """World size of `group` (1 when torch.distributed is not initialised)."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of `t` over `group`; returns `t`. Counted as 2(p-1)/p * bytes(t)."""
    p = group_size(group)
    if p == 1:
        return t
    dist.all_reduce(t, op=op, group=group)
    comm_stats.add("all_reduce", algorithmic_bytes("all_reduce", _nbytes(t), p))
    return t


def all_gather(t: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's `t` along `dim` (rank order). Counted as (p-1)/p * bytes(output)."""
    p = group_size(group)
    if p == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(p)]
    dist.all_gather(parts, t.contiguous(), group=group)
    out = torch.cat(parts, dim=dim)
    comm_stats.add("all_gather", algorithmic_bytes("all_gather", _nbytes(out), p))
    return out


def reduce_scatter(t: torch.Tensor, group=None, dim: int = 0, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum `t` over `group` and return this rank's chunk along `dim` (size must divide evenly).

    Counted as (p-1)/p * bytes(t) (the ring reduce-scatter the cost model prices). gloo has no
    native reduce-scatter on CPU, so the transport is an all-reduce followed by a local slice; the
    counter records the algorithm the plan runs on NCCL, not gloo's transport volume.
    """
    p = group_size(group)
    if p == 1:
        return t
    if t.shape[dim] % p:
        raise ValueError(f"reduce_scatter: dim {dim} of size {t.shape[dim]} is not divisible by {p}")
    buf = t.contiguous().clone()
    dist.all_reduce(buf, op=op, group=group)
    r = dist.get_rank(group)
    out = buf.chunk(p, dim=dim)[r].contiguous()
    comm_stats.add("reduce_scatter", algorithmic_bytes("reduce_scatter", _nbytes(t), p))
    return out


def send(t: torch.Tensor, dst: int, group=None) -> None:
    """Point-to-point send (dst is a global rank). Counted as bytes(t)."""
    dist.send(t.contiguous(), dst=dst, group=group)
    comm_stats.add("p2p", _nbytes(t))


def recv(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Point-to-point receive into `t` (src is a global rank). Not counted (the sender pays)."""
    dist.recv(t, src=src, group=group)
    return t


def all_to_all(t: torch.Tensor, group=None, scatter_dim: int = 0, gather_dim: int = 0) -> torch.Tensor:
    """Split `t` into p chunks along `scatter_dim`, send chunk j to group rank j, concatenate the received
    chunks along `gather_dim` (rank order). Counted as (p-1)/p * bytes(t)."""
    p = group_size(group)
    if p == 1:
        return t
    if t.shape[scatter_dim] % p:
        raise ValueError(f"all_to_all: dim {scatter_dim} of size {t.shape[scatter_dim]} is not divisible by {p}")
    inp = torch.stack(t.chunk(p, dim=scatter_dim))
    out = torch.empty_like(inp)
    dist.all_to_all_single(out, inp, group=group)
    comm_stats.add("all_to_all", algorithmic_bytes("all_to_all", _nbytes(t), p))
    return torch.cat(out.unbind(0), dim=gather_dim)


def isend_irecv(sends, recvs, group=None, tag: int = 0) -> list:
    """Post point-to-point sends and receives as one batch (`dist.batch_isend_irecv`); returns the works
    to wait on. `sends`/`recvs`: (contiguous tensor, peer rank within `group`) pairs; keep every tensor
    alive until the works complete. Counted as bytes of each sent tensor (receives count nothing)."""
    ops = [dist.P2POp(dist.isend, t, group=group, tag=tag, group_peer=peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, tag=tag, group_peer=peer) for t, peer in recvs]
    works = dist.batch_isend_irecv(ops) if ops else []
    for t, _ in sends:
        comm_stats.add("p2p", _nbytes(t))
    return works


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        all_reduce(grad, ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        all_reduce(out, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_group(x: torch.Tensor, group=None) -> torch.Tensor:
    """Megatron `f`: forward identity, backward all-reduce SUM of the gradient. No-op on size 1."""
    if group_size(group) == 1:
        return x
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group=None) -> torch.Tensor:
    """Megatron `g`: forward all-reduce SUM, backward identity. No-op on size 1."""
    if group_size(group) == 1:
        return x
    return _ReduceFromGroup.apply(x, group)


def _block(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous block of ``t`` along ``dim`` (its own compact storage)."""
    p = group_size(group)
    if t.shape[dim] % p:
        raise ValueError(f"dim {dim} of size {t.shape[dim]} is not divisible by {p}")
    n = t.shape[dim] // p
    return t.narrow(dim, dist.get_rank(group) * n, n).clone(memory_format=torch.contiguous_format)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied if it is a view keeping a larger buffer alive (a saved activation would hold it all)."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _owned(reduce_scatter(x, group, dim))

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad.contiguous(), ctx.group, ctx.dim), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, reduce_grad):
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return all_gather(x.contiguous(), group, dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return reduce_scatter(grad, ctx.group, ctx.dim), None, None, None
        return _block(grad, ctx.group, ctx.dim), None, None, None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _block(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad.contiguous(), ctx.group, ctx.dim), None, None


def reduce_scatter_to_sequence(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """Megatron-SP after a rowwise linear: forward reduce-scatter SUM along the sequence ``dim`` (this
    rank keeps its contiguous block), backward all-gather of the gradient. No-op on size 1."""
    if group_size(group) == 1:
        return x
    return _ReduceScatterToSequence.apply(x, group, dim)


def gather_from_sequence(x: torch.Tensor, group=None, dim: int = 1, reduce_grad: bool = True) -> torch.Tensor:
    """Megatron-SP: forward all-gather of the sequence blocks along ``dim``. Backward: reduce-scatter
    when the consumers' gradients are partial sums over the ranks (colwise linears, ``reduce_grad``),
    else keep this rank's block (replicated consumers: every rank holds the full gradient). No-op on size 1."""
    if group_size(group) == 1:
        return x
    return _GatherFromSequence.apply(x, group, dim, reduce_grad)


def scatter_to_sequence(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """Megatron-SP entry of a replicated value: forward this rank's block along ``dim`` (no
    communication), backward all-gather of the gradient. No-op on size 1."""
    if group_size(group) == 1:
        return x
    return _ScatterToSequence.apply(x, group, dim)


def all_reduce_mean_scalar(x, group=None) -> torch.Tensor:
    """Mean of a (detached) scalar/tensor over `group`, for reporting a global loss. Counted."""
    t = x.detach().clone() if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64)
    p = group_size(group)
    if p == 1:
        return t
    all_reduce(t, group)
    return t / p
