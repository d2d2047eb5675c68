"""Data-parallel gradient averaging that fires once at the end of every backward pass.

    sync = GradSync(model.parameters(), dp_group)
    loss.backward()                 # grads are averaged over dp_group when backward returns
    with sync.no_sync():            # gradient accumulation: skip the all-reduce
        loss2.backward()

Mechanism: a `register_post_accumulate_grad_hook` on every parameter; the first hook that fires in a
backward pass queues an autograd-engine callback, which runs after the whole graph has finished.
The callback flattens every existing `.grad` into buckets of at most `bucket_bytes` (per dtype),
issues one counted SUM all-reduce per bucket, divides by the group size and copies back.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from runtime.collectives import all_reduce, group_size

__all__ = ["GradSync"]

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
        torch.autograd.Variable._execution_engine.queue_callback(self._sync)

    def _buckets(self, grads):
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            bucket, size = [], 0
            for g in group:
                nb = g.numel() * g.element_size()
                if bucket and size + nb > self.bucket_bytes:
                    yield bucket
                    bucket, size = [], 0
                bucket.append(g)
                size += nb
            if bucket:
                yield bucket

    @torch.no_grad()
    def _sync(self) -> None:
        self._queued = False
        grads = [p.grad for p in self.params if p.grad is not None]
        for bucket in self._buckets(grads):
            flat = _flatten_dense_tensors(bucket)
            all_reduce(flat, self.group)
            flat.div_(self.world)
            for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(synced)
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
