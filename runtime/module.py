"""DistributedModule: what auto_parallelize returns on each rank.

It takes the *global* batch (every rank passes the same inputs), keeps its data-parallel slice, runs
the rewritten graph, and returns the loss averaged over data-parallel ranks (its gradient is the
local one; ``GradSync`` averages the gradients). Parameters keep their original names.
"""
from __future__ import annotations

import torch

from runtime.collectives import all_gather, all_reduce_mean_scalar


class DistributedModule(torch.nn.Module):
    def __init__(self, gm: torch.fx.GraphModule, plan, mesh, grad_sync, param_shards: dict[str, tuple[int, int]]):
        super().__init__()
        self.gm = gm
        self.plan = plan
        self.mesh = mesh
        self.grad_sync = grad_sync
        self.param_shards = dict(param_shards)
        self.dp = mesh.size("dp")
        self.dp_rank = mesh.local_rank("dp")
        self.global_batch = plan.global_batch

    def local_batch(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """This rank's data-parallel slice of every input whose first dim is the global batch."""
        def take(x):
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == self.global_batch and self.dp > 1:
                return x.chunk(self.dp, dim=0)[self.dp_rank]
            return x
        return tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}

    def forward(self, *args, **kwargs):
        args, kwargs = self.local_batch(args, kwargs)
        out = self.gm(*args, **kwargs)
        if self.dp == 1:
            return out
        group = self.mesh.group("dp")
        if isinstance(out, torch.Tensor) and out.dim() == 0:
            return out + (all_reduce_mean_scalar(out, group) - out.detach())
        if getattr(out, "loss", None) is not None:
            out.loss = out.loss + (all_reduce_mean_scalar(out.loss, group) - out.loss.detach())
        return out

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """Original parameter names (the graph module keeps the model's FQNs)."""
        return self.gm.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def state_dict(self, *args, **kwargs):
        """Local shards under the original names; see :meth:`full_state_dict` for unsharded tensors."""
        return self.gm.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.gm.load_state_dict(state_dict, strict=strict, assign=assign)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded tensors under the original names (collective: every rank must call it);
        loads into the plain model or into a module emitted from another plan."""
        tp_group = self.mesh.group("tp")
        tp = self.mesh.size("tp")
        out = {}
        for name, t in self.gm.state_dict().items():
            if name in self.param_shards and tp > 1:
                dim, groups = self.param_shards[name]
                pieces = all_gather(t.detach().unsqueeze(0), tp_group, dim=0)  # [tp, ...local]
                pieces = pieces.unflatten(dim + 1, (groups, -1))
                t = torch.cat(list(pieces), dim=dim + 1).flatten(dim, dim + 1)
            out[name] = t.detach().clone()
        return out
