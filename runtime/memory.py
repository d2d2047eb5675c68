"""LiveBytes: measure activation memory on CPU, where torch keeps no allocator statistics.

Counts the storages aten ops create while the mode is active (inputs and anything made before it are
not counted, nor views of the ``exclude``d tensors: pass the parameters) and frees them when their last
tensor dies; ``peak`` is the most alive at once, ``live`` what is alive now, ``events`` the timeline.

    >>> import torch
    >>> x = torch.randn(256, 256, requires_grad=True)
    >>> with LiveBytes() as mem:
    ...     y = (x * 2).sin().sum()      # x * 2 is saved by sin's backward, sin's output is not
    ...     after_forward = mem.live
    ...     y.backward()
    >>> after_forward >= 256 * 256 * 4
    True
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Peak and current bytes of the storages created by aten ops under this mode that are still referenced."""

    def __init__(self, exclude=()):
        """``exclude``: tensors (parameters, buffers) whose storages are not counted, also when an op
        returns a view of them (``linear`` on CPU runs ``t`` of its weight)."""
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors, storage id]
        self.events: list[tuple[int, int]] = []  # (storage id, +bytes when created | -bytes when freed)
        self.live = self.peak = 0
        self.exclude = {u.untyped_storage().data_ptr() for t in exclude for u in _plain(t)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            for u in _plain(t) if isinstance(t, torch.Tensor) else ():
                if u.untyped_storage().nbytes() and u.untyped_storage().data_ptr() not in self.exclude:
                    self._track(u)
        return out

    def _track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        if key not in self.refs:
            nbytes = t.untyped_storage().nbytes()
            self.refs[key] = [nbytes, 0, len(self.events)]
            self.events.append((len(self.events), nbytes))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key][1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[1] -= 1
        if not entry[1]:
            self.live -= entry[0]
            self.events.append((entry[2], -entry[0]))
            del self.refs[key]


def _plain(t: torch.Tensor):
    """The plain tensors holding ``t``'s storage: itself, or a wrapper subclass's inner tensors (a DTensor's
    local shard: the mode sees the DTensor op, not the local ops under it)."""
    if is_traceable_wrapper_subclass(t):
        for attr in t.__tensor_flatten__()[0]:
            inner = getattr(t, attr)
            if isinstance(inner, torch.Tensor):
                yield from _plain(inner)
    else:
        yield t


def step_peak(module: torch.nn.Module, *args, **kwargs) -> int:
    """Peak live bytes of one training step (forward of a scalar loss, then backward), the module's
    parameters excluded; gradients are reset first."""
    for p in module.parameters():
        p.grad = None
    with LiveBytes(exclude=module.parameters()) as mode:
        module(*args, **kwargs).backward()
    return mode.peak
