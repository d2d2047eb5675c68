"""Data-parallel gradient averaging that fires once at the end of every backward pass.

    sync = GradSync(model.parameters(), dp_group)
    loss.backward()                 # grads are averaged over dp_group when backward returns
    with sync.no_sync():            # gradient accumulation: skip the all-reduce
        loss2.backward()

Mechanism: a `register_post_accumulate_grad_hook` on every parameter; the first hook that fires in a
backward pass queues an autograd-engine callback, which runs after the whole graph has finished.
The callback issues one counted SUM all-reduce per bucket, divides by the group size and writes the
result to every parameter's `.grad`. Buckets (at most `bucket_bytes`, per dtype) are fixed at
construction, so every rank issues the same all-reduces even if a parameter got no gradient on some
rank: the missing gradient counts as zeros, and the parameter receives the average like the others
(one that no rank used gets a zero gradient, not None).

``ShardedGradSync`` is the same interface for a module sharded by FSDP2 (``passes.zero``): FSDP2
reduce-scatters the gradients itself; ``no_sync`` says a backward is not the step's last.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from runtime.collectives import all_reduce, group_size

__all__ = ["GradSync", "ShardedGradSync"]

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


class GradSync:
    """Average gradients of `params` over `group` at the end of each backward (no-op on size 1)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        seen: set[int] = set()
        self.params = []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        self.group = group
        self.world = group_size(group)
        self.bucket_bytes = int(bucket_bytes)
        self.buckets = self._buckets(self.params)  # fixed: the same all-reduces on every rank, every step
        self._enabled = True
        self._queued = False
        self.syncs = 0  # number of completed sync rounds (for tests / logging)
        self._handles = []
        if self.world > 1:
            for p in self.params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    def _on_grad_ready(self, _param) -> None:
        if not self._enabled or self._queued:
            return
        self._queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self.sync)

    def _buckets(self, params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        out = []
        for group in by_dtype.values():
            bucket, size = [], 0
            for p in group:
                nb = p.numel() * p.element_size()
                if bucket and size + nb > self.bucket_bytes:
                    out.append(bucket)
                    bucket, size = [], 0
                bucket.append(p)
                size += nb
            if bucket:
                out.append(bucket)
        return out

    @torch.no_grad()
    def sync(self) -> None:
        """Average the gradients now (the end-of-backward callback; call it by hand after a
        ``no_sync`` block whose backward passes ran elsewhere, e.g. inside a pipeline schedule)."""
        self._queued = False
        for bucket in self.buckets:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = _flatten_dense_tensors(grads)
            all_reduce(flat, self.group)
            flat.div_(self.world)
            for p, synced in zip(bucket, _unflatten_dense_tensors(flat, grads)):
                if p.grad is None:
                    p.grad = synced.clone()
                else:
                    p.grad.copy_(synced)
        self.syncs += 1

    @contextlib.contextmanager
    def no_sync(self):
        """Skip gradient averaging inside the block (local accumulation); the next synced backward
        averages the accumulated gradients."""
        prev, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = prev

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class ShardedGradSync:
    """Gradient accumulation on a ZeRO (FSDP2) module: ``no_sync`` marks backwards that are not a step's
    last. ZeRO-1 then skips the reduce-scatter (full gradients accumulate) and keeps the parameters
    gathered; ZeRO-2 reduce-scatters every backward but keeps the parameters gathered; ZeRO-3 changes
    nothing. ``blocks``: the module paths sharded as their own FSDP groups."""

    def __init__(self, module, zero: int, blocks: list[str]):
        self.module, self.zero, self.blocks = module, zero, list(blocks)

    @contextlib.contextmanager
    def no_sync(self):
        if self.zero == 1:
            self.module.set_requires_gradient_sync(False)
        if self.zero < 3:
            self.module.set_reshard_after_backward(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)
            self.module.set_reshard_after_backward(True)
