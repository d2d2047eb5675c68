"""Process groups for a plan: the default group (`init_distributed`) and named mesh axes (`Mesh`).

The mesh is a factorisation of the world into ordered named axes, last axis innermost, so
`Mesh({"dp": 2, "tp": 2})` puts tp ranks on contiguous global ranks ({0,1}, {2,3}) and dp ranks
strided ({0,2}, {1,3}) — tp gets the fastest links (DESIGN §2).

    mesh = Mesh({"dp": 2, "tp": 2})          # inside torchrun with 4 ranks
    mesh.group("tp"), mesh.size("tp"), mesh.local_rank("dp"), mesh.shape
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from search.errors import BadInput

__all__ = ["Mesh", "init_distributed"]


def init_distributed(timeout_s: float = 60) -> tuple[int, int]:
    """Initialise the default process group from torchrun's env vars unless already initialised.

    gloo on CPU, nccl when CUDA is available; every group gets `timeout_s`. Returns (rank, world).
    """
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise BadInput(
                f"torch.distributed is not initialised and {', '.join(missing)} not set; "
                "launch with torchrun (e.g. `torchrun --nproc-per-node 4 train.py`)"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


class Mesh:
    """Named process-group axes over the default group (a thin layer on DeviceMesh)."""

    def __init__(self, axes: dict[str, int]):
        if not axes:
            raise BadInput("mesh needs at least one axis, e.g. {'dp': 2}")
        for name, size in axes.items():
            if not isinstance(size, int) or size < 1:
                raise BadInput(f"mesh axis {name!r} has size {size!r}; sizes must be positive integers")
        self.axes = dict(axes)
        need = math.prod(self.axes.values())
        if not dist.is_initialized():
            raise BadInput("Mesh needs torch.distributed initialised; call runtime.mesh.init_distributed() first")
        world = dist.get_world_size()
        if world != need:
            desc = " × ".join(f"{k}={v}" for k, v in self.axes.items())
            raise BadInput(
                f"plan needs {need} ranks ({desc}) but torchrun started {world}; "
                f"relaunch with --nproc-per-node {need} (times nodes) or re-plan for {world} devices"
            )
        from torch.distributed.device_mesh import init_device_mesh

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self._joint: dict[tuple[str, ...], object] = {}
        self.device_mesh = init_device_mesh(
            device_type, tuple(self.axes.values()), mesh_dim_names=tuple(self.axes.keys())
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.axes.values())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.axes.keys())

    def _check(self, axis: str) -> None:
        if axis not in self.axes:
            raise BadInput(f"mesh has no axis {axis!r}; axes are {list(self.axes)}")

    def group(self, axis: str):
        """The ProcessGroup of this rank along `axis`."""
        self._check(axis)
        return self.device_mesh.get_group(axis)

    def size(self, axis: str) -> int:
        self._check(axis)
        return self.axes[axis]

    def all_groups(self, axis: str) -> list[list[int]]:
        """Global ranks of every group along ``axis`` (every rank gets the same list, same order)."""
        self._check(axis)
        moved = self.device_mesh.mesh.movedim(self.names.index(axis), -1)
        return moved.reshape(-1, self.axes[axis]).tolist()

    def joint_group(self, axes: tuple[str, ...]):
        """The ProcessGroup of this rank over several axes at once (e.g. ("dp", "sp"): the ranks that hold
        the same parameters). Every rank creates every such group, in the same order (a collective)."""
        for a in axes:
            self._check(a)
        if len(axes) == 1:
            return self.group(axes[0])
        key = tuple(axes)
        if key not in self._joint:
            keep = [self.names.index(a) for a in axes]
            rest = [i for i in range(len(self.names)) if i not in keep]
            grid = self.device_mesh.mesh.permute(*rest, *keep).reshape(-1, math.prod(self.axes[a] for a in axes))
            me = dist.get_rank()
            for ranks in grid.tolist():
                g = dist.new_group(ranks)
                if me in ranks:
                    self._joint[key] = g
        return self._joint[key]

    def local_rank(self, axis: str) -> int:
        """This rank's coordinate on `axis`."""
        self._check(axis)
        return self.device_mesh.get_local_rank(axis)

    def __repr__(self) -> str:
        return f"Mesh({self.axes})"
