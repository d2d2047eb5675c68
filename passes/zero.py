"""apply_zero: ZeRO stages 1-3 on torch's FSDP2 (``fully_shard``) over the ranks that share parameters.

Every parameter is sharded on dim 0 over the replica group (a ``DeviceMesh`` built from it), so the
optimizer built on the module's parameters holds 1/dp of the Adam state: that is ZeRO-1 already.
The stages differ in what stays unsharded during a step:

- ZeRO-1 keeps parameters unsharded from forward through backward and, over the microbatches of a
  step, accumulates full gradients, reduce-scattered once at the step's last backward.
- ZeRO-2 reduce-scatters the gradients after every microbatch (gradients are sharded).
- ZeRO-3 also frees the gathered parameters after forward and gathers them again for backward.

Per-step traffic is what ``search.candidate.dp_sync`` prices: one parameter all-gather plus one
gradient reduce-scatter (the all-reduce volume) for ZeRO-1; the reduce-scatter per microbatch for
ZeRO-2; and for ZeRO-3 two all-gathers and one reduce-scatter per microbatch.

FSDP2 gathers and frees one module's parameters at a time. The captured graph is flat, though, so
first each repeated block becomes its own submodule that owns its parameters (``own_block``). The
submodule is installed at the block's module path, so parameter names stay the model's. What is left
(embeddings, final norm, head, tied weights) forms the root's group.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from passes.outline import outline, region_io, scope_run
from runtime.dp import ShardedGradSync
from search.errors import BadInput

__all__ = ["apply_zero", "apply_zero_stages", "own_block"]


def apply_zero(gm: fx.GraphModule, group, zero: int, blocks: list[str]) -> ShardedGradSync:
    """Shard ``gm``'s parameters over ``group`` as ZeRO stage ``zero`` (1-3) says, one FSDP group per
    block of ``blocks`` (module scopes) that :func:`own_block` could outline, one for the rest."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = DeviceMesh.from_group(group, device, mesh_dim_names=("replica",))
    owned = [scope for scope in blocks if own_block(gm, scope)]
    gm.recompile()
    for scope in owned:
        fully_shard(gm.get_submodule(scope), mesh=mesh, reshard_after_forward=zero == 3)
    fully_shard(gm, mesh=mesh, reshard_after_forward=zero == 3)
    return ShardedGradSync(gm, zero, owned)


def apply_zero_stages(stages: list[fx.GraphModule], ranks: list[int], rank: int, group, zero: int,
                      blocks: list[str]) -> None:
    """ZeRO-1 on the pipeline stages ``rank`` holds (``ranks``: every stage's pipeline rank): each stage,
    and each block in it, an FSDP group over ``group``. torch.distributed.pipelining drives FSDP stages
    as ZeRO-1 wants: gradients accumulate unsharded and parameters stay gathered until the step's last
    backward, then reduce-scatter (``check_emittable`` refuses ZeRO-2/3 with pipelines). Every
    rank checks every stage first, so all raise alike."""
    owner: dict[tuple[int, int], int] = {}
    for i, stage in enumerate(stages):
        for name, t in stage.named_parameters():
            if owner.setdefault((id(t), ranks[i]), i) != i:
                raise BadInput(f"parameter {name} is held by two pipeline stages on one rank (a tied weight); "
                               "ZeRO cannot shard it twice: re-plan with --fix zero=0, or a schedule that puts "
                               "the first and last stages on different ranks (gpipe, 1f1b, interleaved)")
    for stage, r in zip(stages, ranks):
        if r == rank:
            apply_zero(stage, group, zero, blocks)


def own_block(gm: fx.GraphModule, scope: str) -> bool:
    """Outline the run of nodes of block ``scope`` into a GraphModule installed at ``scope`` that
    owns the block's parameters and buffers (the call's other inputs stay arguments), in place; the
    caller recompiles. False (``gm`` untouched) when that cannot keep every name: no module at
    ``scope``, a tensor of it read outside the run, not read at all or tied to one outside it, a
    nested module call, or a called module with parameters that other nodes call too."""
    run = scope_run(gm, scope)
    try:
        holder = gm.get_submodule(scope)
    except AttributeError:
        return False
    if not run or any(n.op == "call_module" and "." in n.target for n in run):
        return False
    prefix = scope + "."
    reads = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(prefix)]
    run = _parameter_nodes(gm, reads, run) + run
    members = set(run)
    if any(u not in members for n in reads for u in n.users):
        return False
    tensors = {**dict(holder.named_parameters(remove_duplicate=False)),
               **dict(holder.named_buffers(remove_duplicate=False))}
    if not set(tensors) <= {n.target[len(prefix):] for n in reads}:
        return False
    elsewhere = {id(t) for name, t in gm.named_parameters(remove_duplicate=False) if not name.startswith(prefix)}
    if any(id(t) in elsewhere for t in tensors.values()):  # tied to a tensor outside the block
        return False
    shared = {n.target for n in gm.graph.nodes if n.op == "call_module" and n not in members}
    if any(n.op == "call_module" and n.target in shared and next(gm.get_submodule(n.target).parameters(), None)
           is not None for n in run):
        return False
    inputs, outputs = region_io(run)
    g = fx.Graph()
    env = {a: g.get_attr(a.target[len(prefix):]) if a in reads else g.placeholder(a.name) for a in inputs}
    for n in run:
        env[n] = g.node_copy(n, env.__getitem__)
        if n.op == "call_module":  # a module a pass outlined (recompute, chunking) moves into the block
            holder.add_module(n.target, gm.get_submodule(n.target))
    g.output(tuple(env[n] for n in outputs))
    body = fx.GraphModule(holder, g, class_name="Block")
    for name in {n.target for n in run if n.op == "call_module"} - shared:
        delattr(gm, name)  # a module other blocks call too (holding no tensors) stays shared
    outline(gm, run, [a for a in inputs if a not in reads], outputs, body, scope, path=scope)
    for n in reads:
        gm.graph.erase_node(n)
    return True


def _parameter_nodes(gm: fx.GraphModule, reads: list[fx.Node], run: list[fx.Node]) -> list[fx.Node]:
    """Nodes outside ``run`` that compute only from the block's tensors ``reads`` for the block alone
    (e.g. the gradient all-reduce a replicated norm weight gets under Megatron-SP), graph order:
    they move into the block with the tensors."""
    inside, found = set(reads), []
    members = set(run)
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_module") and n not in members and n.all_input_nodes \
                and all(a in inside for a in n.all_input_nodes):
            inside.add(n)
            found.append(n)
    keep = set(run)
    for n in reversed(found):  # only those whose every use stays in the block
        if all(u in keep for u in n.users):
            keep.add(n)
    return [n for n in found if n in keep]
