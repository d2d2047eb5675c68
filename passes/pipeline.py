"""split_stages: cut a captured training graph into contiguous pipeline stages.

    >>> stages = split_stages(gm, ["layer_norm_2"])    # stage 1 starts at blocks.1's first node
    >>> acts = stages[0](idx=ids, targets=tgt)          # tuple of the values stage 1 reads
    >>> loss = stages[1](*acts, idx=ids, targets=tgt)   # the model's scalar loss

A stage is a plain ``fx.GraphModule``:

- **positional inputs** are the previous stage's outputs. A stage returns every value produced in it
  or before it that a later stage reads, so a value that skips stages is passed through the stages
  between: every send goes to the next stage, the only pattern torch's multi-stage pipeline runtime
  supports. The last stage returns the scalar loss (for a Hugging Face output, its ``loss``).
- **keyword inputs** are the model's root inputs by placeholder name (``idx``, ``targets``;
  ``input_ids``, ``labels``), default ``None``. The schedule hands each microbatch's keyword inputs to
  every stage (as Megatron's first and last stages both read the batch), so the targets never travel
  through the pipe.
- values that depend on no trainable parameter (positions, rope tables, masks, reshaped targets) are
  recomputed in every stage that reads them instead of being sent; random ops are never recomputed.
- a graph rewritten by ``passes.tp`` keeps its collectives (``call_module`` nodes) in the stage of their
  position; one on parameters only (Megatron-SP's gradient sum of a norm weight, which the rewrite
  places at the top of the graph) runs in the stage of its first reader.
- parameters and buffers stay ``get_attr`` nodes with their original FQNs, sharing ``gm``'s tensors.
  A weight read in two stages (GPT's tied ``wte``/``lm_head``) appears in both; ``runtime.pipeline``
  sums its gradient over the ranks that hold those stages (Megatron's embedding group).

The graph is specialised to its capture shapes: capture at the *microbatch* size.
"""
from __future__ import annotations

from operator import attrgetter

import torch
import torch.fx as fx

from search.errors import BadInput


def split_stages(gm: fx.GraphModule, cuts: list[str]) -> list[fx.GraphModule]:
    """Split ``gm`` (forward returns a scalar loss) into ``len(cuts) + 1`` stages; each cut names the
    first node of a new stage, in graph order."""
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module")]
    position = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    missing = [c for c in cuts if c not in by_name]
    if missing:
        raise BadInput(f"cut nodes {missing} are not computations of the graph; cuts name call_function "
                       f"nodes such as {[n.name for n in nodes[1:4]]}")
    starts = [position[by_name[c]] for c in cuts]
    if any(b <= a for a, b in zip([0] + starts, starts)):
        raise BadInput(f"cuts {cuts} must be distinct, in graph order, and not the first node "
                       f"({nodes[0].name}): each one starts a new non-empty stage")
    loss = _loss_node(gm)
    free = _parameter_free(gm)
    stage_of = {n: sum(p >= s for s in starts) for n, p in position.items() if n not in free}
    for n in nodes:  # a collective on parameters only (tp's gradient sum of a norm weight, inserted at the
        readers = [stage_of[u] for u in n.users if u in stage_of]  # top of the graph): its first reader's stage
        if n.op == "call_module" and readers and all(a.op == "get_attr" for a in n.all_input_nodes):
            stage_of[n] = min(readers)
    num = len(cuts) + 1

    last_read = {}  # sent value -> last stage that reads it
    for n, s in stage_of.items():
        for a in n.all_input_nodes:
            if a in stage_of and stage_of[a] < s:
                last_read[a] = max(last_read.get(a, 0), s)
    if stage_of.get(loss, num - 1) < num - 1:
        last_read[loss] = num - 1
    for s in range(num):
        if not any(stage_of.get(n) == s for n in nodes):
            raise BadInput(f"stage {s} of cuts {cuts} has no computation that depends on a parameter")
    sent = [n for n in nodes if n in last_read]
    inputs = [[v for v in sent if stage_of[v] < s <= last_read[v]] for s in range(num)]
    roots = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [_build_stage(gm, nodes, stage_of, free, s, inputs[s], inputs[s + 1] if s + 1 < num else loss, roots)
            for s in range(num)]


def _build_stage(gm, nodes, stage_of, free, s, inputs, outputs, roots) -> fx.GraphModule:
    own = [n for n in nodes if stage_of.get(n) == s]
    needed = set(own) | ({outputs} if isinstance(outputs, fx.Node) else set())
    for n in reversed(nodes):  # the parameter-free values this stage recomputes
        if n in needed and (n in free or stage_of.get(n) == s):
            needed.update(a for a in n.all_input_nodes if a in free)
    g = fx.Graph()
    env = {}
    for v in inputs:
        env[v] = g.placeholder(v.name)
        env[v].meta = dict(v.meta)
    for r in roots:
        env[r] = g.placeholder(r.name, default_value=None)
        env[r].meta = dict(r.meta)  # "val": the capture shape, which tells the runner how to split a batch
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            env[n] = g.get_attr(n.target)
        elif n in needed and (n in free or stage_of.get(n) == s):
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[outputs] if isinstance(outputs, fx.Node) else tuple(env[v] for v in outputs))
    g.eliminate_dead_code(is_impure_node=_kept)  # drops the parameters this stage does not read
    stage = fx.GraphModule(gm, g, class_name=f"Stage{s}")
    stage.in_spec = getattr(gm, "_in_spec", None)  # how (args, kwargs) flatten to the root placeholders
    return stage


def _kept(n: fx.Node) -> bool:
    """Nodes dead-code elimination keeps: inputs, output, impure ops, and submodule calls (the
    tensor-parallel collectives of ``passes.tp``, which every rank of their group must issue)."""
    return n.op in ("placeholder", "output", "call_module") or (n.op == "call_function" and n.is_impure())


def _loss_node(gm: fx.GraphModule) -> fx.Node:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = torch.utils._pytree.tree_leaves(out.args[0])
    scalars = [n for n in leaves if isinstance(n, fx.Node) and isinstance(v := n.meta.get("val"), torch.Tensor)
               and v.dim() == 0 and v.is_floating_point()]
    if len(scalars) != 1:
        raise BadInput(f"pipeline stages need a graph returning one scalar loss; its outputs hold {len(scalars)} "
                       "scalar tensors (pass targets/labels so the model computes its loss)")
    return scalars[0]


def _parameter_free(gm: fx.GraphModule) -> set[fx.Node]:
    """Computations that read no trainable parameter, directly or through their inputs, and draw no
    random numbers: cheap to recompute in every stage (positions, masks, rope tables)."""
    trainable = {id(p) for p in gm.parameters() if p.requires_grad}
    free: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or (n.op == "get_attr" and id(attrgetter(n.target)(gm)) not in trainable):
            free.add(n)
        elif n.op == "call_function" and all(a in free for a in n.all_input_nodes) and not _random(n):
            free.add(n)
    return {n for n in free if n.op == "call_function"}


def _random(n: fx.Node) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())
