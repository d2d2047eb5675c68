"""DistributedModule: what auto_parallelize returns on each rank.

It takes the *global* batch (every rank passes the same inputs), keeps its data-parallel slice
(``BatchSplit``), runs the rewritten graph, and returns the loss averaged over data-parallel ranks
(its gradient is the local one; ``GradSync`` averages the gradients, or FSDP2 reduce-scatters them
under ZeRO). Parameters keep their original names. ``step`` runs forward and backward of a whole
step, over the plan's microbatches (gradient accumulation) when it has several.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from runtime.attention import shard_sequence
from runtime.collectives import all_gather, all_reduce_mean_scalar
from search.errors import BadInput


@dataclass(frozen=True)
class BatchSplit:
    """Which inputs carry the batch (positions ``args``, keywords ``kwargs``) and this rank's slice of them.

    Recorded once from the example inputs by :meth:`from_example`; every call is then checked against
    it, so an input is never sliced because its size happens to match.
    """

    global_batch: int
    dp: int
    dp_rank: int
    args: tuple[int, ...]
    kwargs: tuple[str, ...]
    sp: int = 1                  # sequence-parallel ranks: batched inputs with seq_len at dim 1 are dealt
    sp_rank: int = 0             # out by ``runtime.attention.positions`` (layout)
    seq_len: int = 0
    layout: str = "contiguous"

    @classmethod
    def from_example(cls, args: tuple, kwargs: dict, global_batch: int, dp: int, dp_rank: int,
                     **sequence) -> BatchSplit:
        """Batched inputs are the example's tensors whose first dimension is ``global_batch``;
        ``sequence`` (sp, sp_rank, seq_len, layout) shards their tokens too."""
        if global_batch % dp:
            raise BadInput(f"global batch {global_batch} does not split over dp={dp} data-parallel ranks; "
                           "re-plan, or use a global batch divisible by dp")

        def batched(x):
            return isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == global_batch

        split = cls(global_batch, dp, dp_rank, tuple(i for i, a in enumerate(args) if batched(a)),
                    tuple(k for k, v in kwargs.items() if batched(v)), **sequence)
        if not split.args and not split.kwargs:
            raise BadInput(f"no example input has the plan's global batch {global_batch} as its first dimension; "
                           "pass example inputs holding the global batch the plan was made for")
        return split

    def microbatches(self, m: int) -> list[BatchSplit]:
        """The ``m`` splits of this rank's data-parallel slice into microbatches (same batched inputs)."""
        local = self.global_batch // self.dp
        if local % m:
            raise BadInput(f"this rank's {local} samples do not split into {m} microbatches; re-plan")
        return [BatchSplit(local, m, i, self.args, self.kwargs) for i in range(m)]

    def __call__(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """This rank's slice of the batched inputs of one call (others pass through): its data-parallel
        samples and, under sequence parallelism, its tokens of them."""
        return self._map(args, kwargs, self._take)

    def replica(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The data-parallel slice only (whole sequences: what the graph is captured on)."""
        return self._map(args, kwargs, self._samples)

    def _map(self, args, kwargs, take) -> tuple[tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        for i in self.args:
            if i >= len(args):
                raise BadInput(f"positional input {i} holds the batch in the example but is missing in this call")
            args[i] = take(args[i], f"positional input {i}")
        for k in self.kwargs:
            if k not in kwargs:
                raise BadInput(f"keyword input {k!r} holds the batch in the example but is missing in this call")
            kwargs[k] = take(kwargs[k], f"keyword input {k!r}")
        return tuple(args), kwargs

    def _samples(self, x, where: str):
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != self.global_batch:
            got = f"first dimension {x.shape[0]}" if isinstance(x, torch.Tensor) and x.dim() else type(x).__name__
            raise BadInput(f"{where} has {got}, but the plan was made for global batch {self.global_batch}; "
                           "every rank passes the same global batch (re-plan for another batch size)")
        n = self.global_batch // self.dp
        return x.narrow(0, self.dp_rank * n, n)

    def _take(self, x, where: str):
        x = self._samples(x, where)
        if self.sp == 1 or x.dim() < 2:
            return x
        if x.shape[1] != self.seq_len:
            raise BadInput(f"{where} has sequence length {x.shape[1]}, but the plan was made for "
                           f"{self.seq_len}; re-plan for this sequence length")
        return shard_sequence(x, 1, self.sp, self.sp_rank, self.layout)


class DistributedModule(torch.nn.Module):
    def __init__(self, gm: torch.fx.GraphModule, plan, mesh, grad_sync, param_shards: dict[str, tuple[int, int]],
                 batch: BatchSplit, replica_group):
        super().__init__()
        self.gm = gm
        self.plan = plan
        self.mesh = mesh
        self.grad_sync = grad_sync
        self.param_shards = dict(param_shards)
        self.batch = batch
        self.replicas = batch.dp * batch.sp   # ranks holding the same parameters: the loss is their mean
        self.replica_group = replica_group
        self.microbatches = plan.pipeline["microbatches"]
        self._micro = batch.microbatches(self.microbatches)

    def forward(self, *args, **kwargs):
        if self.microbatches > 1:
            raise BadInput(f"the plan accumulates gradients over {self.microbatches} microbatches: call "
                           "loss = module.step(*inputs), which runs forward and backward of each, then opt.step()")
        args, kwargs = self.batch(args, kwargs)
        out = self.gm(*args, **kwargs)
        if self.replicas == 1:
            return out
        group = self.replica_group
        if isinstance(out, torch.Tensor) and out.dim() == 0:
            return out + (all_reduce_mean_scalar(out, group) - out.detach())
        if getattr(out, "loss", None) is not None:
            out.loss = out.loss + (all_reduce_mean_scalar(out.loss, group) - out.loss.detach())
        return out

    def step(self, *args, **kwargs) -> torch.Tensor:
        """Forward and backward of the global batch in the plan's microbatches, gradients accumulated
        (averaged over the replicas once, at the last); returns the step's loss, the mean over
        microbatches and replicas (detached). The model must return a mean-reduced loss."""
        args, kwargs = self.batch(args, kwargs)
        m = self.microbatches
        losses = []
        for i, micro in enumerate(self._micro):
            margs, mkwargs = micro(args, kwargs)
            with self.grad_sync.no_sync() if i < m - 1 else contextlib.nullcontext():
                loss = _loss(self.gm(*margs, **mkwargs))
                (loss / m).backward()
            losses.append(loss.detach())
        loss = torch.stack(losses).mean()
        return loss if self.replicas == 1 else all_reduce_mean_scalar(loss, self.replica_group)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """Original parameter names (the graph module keeps the model's FQNs)."""
        return self.gm.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def state_dict(self, *args, **kwargs):
        """Local shards under the original names (under ZeRO, DTensors sharded over the replicas); see
        :meth:`full_state_dict` for unsharded tensors."""
        return self.gm.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Copy local shards (original names) into the parameters: this rank's tensor-parallel shards,
        whole over the replicas (under ZeRO each rank keeps its part). ``assign=True`` is refused: it
        would replace the parameters, dropping gradient averaging and untying shared ones."""
        if assign:
            raise BadInput("DistributedModule.load_state_dict(assign=True) would replace the parameters, which "
                           "drops gradient averaging and unties shared ones (e.g. tied embeddings); "
                           "load with assign=False, which copies into the local shards")
        return load_local_parts(self.gm, state_dict, strict)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded tensors under the original names (collective: every rank must call it);
        loads into the plain model or into a module emitted from another plan."""
        tp_group = self.mesh.group("tp")
        tp = self.mesh.size("tp")
        out = {}
        for name, t in self.gm.state_dict().items():
            if isinstance(t, DTensor):  # ZeRO: gather the replicas' parts
                t = t.full_tensor()
            if name in self.param_shards and tp > 1:
                t = unshard(t, *self.param_shards[name], tp_group)
            out[name] = t.detach().clone()
        return out


class PlacedModule(torch.nn.Module):
    """What ``auto_parallelize`` returns for a per-op plan (``passes.placements``): the captured graph on
    DTensors. Every rank passes the same global batch (each keeps the shards its placements say) and
    gets the whole outputs; parameters are DTensors under their original names, and after backward each
    gradient is placed like its parameter (a partial gradient is all-reduced or reduce-scattered then:
    the data-parallel sync, priced by the plan as ``gradient_sync``)."""

    def __init__(self, gm: torch.fx.GraphModule, plan, mesh):
        super().__init__()
        self.gm, self.plan, self.mesh = gm, plan, mesh
        self.shapes = [tuple(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor) else None
                       for n in gm.graph.find_nodes(op="placeholder")]
        for p in gm.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(_place_grad)

    def forward(self, *args, **kwargs):
        flat = [a for a in (*args, *kwargs.values())]
        got = [tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in flat]
        if got != self.shapes:
            raise BadInput(f"inputs of shapes {got} but the plan was made for {self.shapes}: a per-op plan "
                           "is specialised to the global batch it was planned for; re-plan for these shapes")
        return self.gm(*args, **kwargs)

    def step(self, *args, **kwargs) -> torch.Tensor:
        """Forward and backward of the global batch; returns the loss (detached)."""
        loss = _loss(self(*args, **kwargs))
        loss.backward()
        return loss.detach()

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.gm.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def state_dict(self, *args, **kwargs):
        """DTensor shards under the original names; see :meth:`full_state_dict`."""
        return self.gm.state_dict(*args, **kwargs)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors under the original names (collective: every rank must call it)."""
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                for k, v in self.gm.state_dict().items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Copy whole tensors (original names) into this rank's shards."""
        if assign:
            raise BadInput("PlacedModule.load_state_dict(assign=True) would replace the DTensor parameters; "
                           "load with assign=False, which copies into the local shards")
        return load_local_parts(self.gm, state_dict, strict)


def _place_grad(p: torch.Tensor) -> None:
    """After accumulation: the gradient placed like its parameter (sums partial gradients)."""
    if isinstance(p.grad, DTensor) and tuple(p.grad.placements) != tuple(p.placements):
        p.grad = p.grad.redistribute(p.device_mesh, p.placements)


def _loss(out) -> torch.Tensor:
    """The loss a model returned: the output itself, or its ``loss`` field (Hugging Face)."""
    loss = out if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise BadInput("module.step needs the model to return its loss (a scalar, or an output with .loss); "
                       "pass the targets among the inputs")
    return loss


def load_local_parts(gm: torch.nn.Module, state_dict: dict, strict: bool):
    """Load ``state_dict`` into ``gm``, each DTensor entry as this rank's part of the given tensor."""
    own = gm.state_dict(keep_vars=True)
    return gm.load_state_dict({k: replica_part(v, own[k]) if k in own else v for k, v in state_dict.items()},
                              strict=strict)


def replica_part(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` as ``like`` holds it: this rank's part of it when ``like`` is a DTensor (ZeRO), ``t`` otherwise."""
    if isinstance(like, DTensor) and not isinstance(t, DTensor):
        return distribute_tensor(t.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return t


def unshard(t: torch.Tensor, dim: int, groups: int, group) -> torch.Tensor:
    """The full tensor whose ``passes.tp.shard_tensor`` pieces the ranks of ``group`` hold (collective)."""
    pieces = all_gather(t.detach().unsqueeze(0), group, dim=0)  # [tp, ...local]
    pieces = pieces.unflatten(dim + 1, (groups, -1))
    return torch.cat(list(pieces), dim=dim + 1).flatten(dim, dim + 1)
