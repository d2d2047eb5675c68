"""Folding (TAPAS): find the repeated blocks of a captured graph so the search solves each once.

    >>> from examples.zoo import build
    >>> from planner.capture import capture
    >>> mg = capture(*build("gpt-tiny", batch=2), name="gpt-tiny")
    >>> f = fold(mg)
    >>> [(t.id, t.instances) for t in f.templates]
    [('t0', ('blocks.0', 'blocks.1'))]

How blocks are found:

1. **Propose** boundaries from module scopes only: a candidate block is a module path whose last
   component is a number (a ModuleList/Sequential child: ``blocks.3``, ``transformer.h.7``,
   ``encoder.block.2``, ``stages.1.blocks.0``). A node belongs to the candidates that prefix its
   ``NodeInfo.scope``; level k is the k-th numbered prefix (outermost first).
2. **Group** candidates by a structural hash that ignores names: per node in graph order its op target,
   output shapes and dtypes, and each argument encoded as an internal edge (producer index in the
   block), a parameter/buffer (shape, dtype), an outside input (index of first appearance, shape,
   dtype) or a constant; plus which nodes are read outside the block. Equal hash = one template.
3. **Outermost level that repeats**: level 0 is grouped first; a candidate whose hash occurs once
   (e.g. a Swin stage containing a downsample) gives its nodes back to level 1, and so on. So the
   blocks of a stack are folded rather than the experts inside them; experts fold only when their
   enclosing blocks are all distinct. Templates are matched within one level.

Nodes in no repeated block form singleton regions (embeddings, head, final norm, a Swin projection):
every maximal run of them between instances is one region. ``no_fold`` is the ``--no-fold`` baseline:
the same regions, each instance its own template.

Limitation: boundaries come from numbered module paths, so repeats that are not ModuleList/Sequential
children (``self.block_a``, ``self.block_b``) or a module called twice (weight sharing) stay singleton.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx

from search.graph import ModelGraph, expression

_NUMBERED = re.compile(r"(?:^|\.)\d+(?=\.|$)")


@dataclass(frozen=True)
class Template:
    """One block structure; the ILP solves it once and multiplies its costs by ``len(instances)``."""

    id: str                       # "t0", "t1", ... in order of first appearance
    hash: str                     # sha256 hex of the structure (stable across processes)
    instances: tuple[str, ...]    # scopes of the instances in graph order, e.g. ("blocks.0", "blocks.1")
    num_nodes: int                # call_function nodes per instance
    num_params: int               # parameter elements per instance


@dataclass(frozen=True)
class Region:
    """An instance of a template, or a run of nodes in no repeated block (a singleton region)."""

    template: str | None          # template id; None for a singleton region
    instance: int | None          # index into the template's instances
    scope: str                    # "blocks.3"; "" for a singleton region
    nodes: tuple[str, ...]        # node names in graph order (position k corresponds across instances)
    inputs: tuple[str, ...]       # outside nodes read by the region (no parameters), first use first
    outputs: tuple[str, ...]      # region nodes read outside it


@dataclass(frozen=True)
class Folding:
    """The repeated blocks of a graph; ``fold`` and ``no_fold`` both return one."""

    templates: tuple[Template, ...]
    regions: tuple[Region, ...]   # graph order
    # no_fold's: the folding it unrolls. Activation chunking chunks a region kind in every instance of
    # a block at once, so it groups regions by these templates either way (the same space to search)
    unrolled: "Folding | None" = field(default=None, compare=False)

    def template(self, tid: str) -> Template:
        return next(t for t in self.templates if t.id == tid)

    def instances(self, tid: str) -> list[Region]:
        """The regions of template ``tid``; the first is the representative."""
        return [r for r in self.regions if r.template == tid]

    def correspondence(self, tid: str) -> dict[str, tuple[str, ...]]:
        """Representative node name -> the node at the same position in every instance (itself first)."""
        insts = self.instances(tid)
        return {nodes[0]: nodes for nodes in zip(*(r.nodes for r in insts))}


def fold(mg: ModelGraph) -> Folding:
    """Templates and regions of ``mg``; zero templates when nothing repeats. A graph that carries its
    folding (a point of a symbolic capture, ``search.specialize``: the same repeats) returns it."""
    if "folding" in mg.gm.meta:
        return mg.gm.meta["folding"]
    nodes = list(mg.nodes())
    order = {n: i for i, n in enumerate(nodes)}
    chains = {n: _numbered_prefixes(n.meta["autopar"].scope) for n in nodes}
    attrs: dict[str, tuple] = {}
    assigned: dict[fx.Node, str] = {}           # node -> instance scope
    members: dict[str, list[str]] = {}          # hash -> instance scopes
    blocks: dict[str, list[fx.Node]] = {}       # instance scope -> nodes
    level = 0
    while True:
        cands: dict[str, list[fx.Node]] = {}
        for n in nodes:
            if n not in assigned and len(chains[n]) > level:
                cands.setdefault(chains[n][level], []).append(n)
        if not cands:
            break
        hashes = {s: _block_hash(mg, ns, attrs) for s, ns in cands.items()}
        counts = Counter(hashes.values())
        for scope, h in hashes.items():
            if counts[h] > 1:
                members.setdefault(h, []).append(scope)
                blocks[scope] = cands[scope]
                for n in cands[scope]:
                    assigned[n] = scope
        level += 1

    first = {s: order[ns[0]] for s, ns in blocks.items()}
    by_hash = sorted(members.items(), key=lambda kv: min(first[s] for s in kv[1]))
    templates, where = [], {}
    for i, (h, scopes) in enumerate(by_hash):
        scopes = sorted(scopes, key=first.__getitem__)
        rep = blocks[scopes[0]]
        params = {p for n in rep for p in n.meta["autopar"].params}
        templates.append(Template(f"t{i}", h, tuple(scopes), len(rep),
                                  sum(math.prod(mg.param_shapes[p]) for p in params)))
        where.update({s: (f"t{i}", k) for k, s in enumerate(scopes)})

    regions, run, done = [], [], set()
    for n in nodes:
        scope = assigned.get(n)
        if scope is None:
            run.append(n)
        elif scope not in done:
            if run:
                regions.append(_region(None, None, "", run))
                run = []
            done.add(scope)
            regions.append(_region(*where[scope], scope, blocks[scope]))
    if run:
        regions.append(_region(None, None, "", run))
    return Folding(tuple(templates), tuple(regions))


def no_fold(mg: ModelGraph) -> Folding:
    """The ``--no-fold`` baseline: the regions of :func:`fold`, every instance its own template."""
    folded = fold(mg)
    templates, regions = [], []
    for r in folded.regions:
        if r.template is not None:
            t = folded.template(r.template)
            tid = f"t{len(templates)}"
            templates.append(replace(t, id=tid, instances=(r.scope,)))
            r = replace(r, template=tid, instance=0)
        regions.append(r)
    return Folding(tuple(templates), tuple(regions), folded)


def _numbered_prefixes(scope: str) -> list[str]:
    """``"stages.1.blocks.0.attn"`` -> ``["stages.1", "stages.1.blocks.0"]``."""
    return [scope[:m.end()] for m in _NUMBERED.finditer(scope)]


def _region(tid, k, scope, ns) -> Region:
    inside = set(ns)
    inputs = {a.name: None for n in ns for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
    outputs = tuple(n.name for n in ns if any(u not in inside for u in n.users))
    return Region(tid, k, scope, tuple(n.name for n in ns), tuple(inputs), outputs)


def _block_hash(mg: ModelGraph, ns: list[fx.Node], attrs: dict[str, tuple]) -> str:
    """sha256 of the block's structure; names never enter it."""
    index = {n: i for i, n in enumerate(ns)}
    outside: dict[fx.Node, int] = {}

    def enc(a):
        if isinstance(a, fx.Node):
            if a in index:
                return ("n", index[a])
            if a.op == "get_attr":
                if a.target not in attrs:
                    attrs[a.target] = _attr_sig(mg.gm, a.target)
                return ("p",) + attrs[a.target]
            return ("x", outside.setdefault(a, len(outside))) + _val_sig(a.meta.get("val"))
        if isinstance(a, (list, tuple)):
            return tuple(enc(x) for x in a)
        if isinstance(a, dict):
            return tuple((k, enc(v)) for k, v in a.items())
        return repr(a)

    sha = hashlib.sha256()
    for n in ns:
        out = any(u not in index for u in n.users)
        sha.update(repr((_target_name(n.target), _val_sig(n.meta.get("val")), enc(n.args), enc(n.kwargs), out)).encode())
    return sha.hexdigest()


def _target_name(target) -> str:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"


def _val_sig(val) -> tuple:
    if isinstance(val, torch.Tensor):  # a symbolic size hashes as its simplified expression
        return (tuple(d if isinstance(d, int) else str(expression(d, {})) for d in val.shape), str(val.dtype))
    if isinstance(val, (list, tuple)):
        return tuple(_val_sig(v) for v in val)
    return (type(val).__name__,)


def _attr_sig(gm: fx.GraphModule, target: str) -> tuple:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return _val_sig(obj) if isinstance(obj, torch.Tensor) else (type(obj).__name__,)


@dataclass(frozen=True)
class Excerpt:
    """A smaller graph that stands for ``gm`` in analyses that look only at a block's neighbours (the
    Megatron-SP layout, ``search.space.megatron_sp``): every node outside repeated blocks, and of each
    template with k >= 4 instances the first, the second and the last (the second's inputs stay the
    first's outputs, the last reads the second's). ``weight[name]``: the nodes of ``gm`` a kept node
    stands for (k - 2 for the second instance, whose neighbours are blocks on both sides like those
    of the k - 3 dropped ones; 1 otherwise, and for every node when nothing is dropped)."""

    gm: fx.GraphModule
    weight: dict[str, int]


def excerpt(gm: fx.GraphModule, folding: Folding) -> Excerpt:
    """The :class:`Excerpt` of ``gm``: built once per folding (kept in ``gm.meta``), in O(nodes kept)
    plus one pass over the graph."""
    cached = gm.meta.get("excerpt")
    if cached is None or cached[0] is not folding:
        gm.meta["excerpt"] = cached = (folding, _excerpt(gm, folding))
    return cached[1]


def excerpt_instances(k: int) -> tuple[int, ...]:
    """Which of a template's ``k`` instances an :class:`Excerpt` keeps: the first, second and last (the
    second standing for those between), or all of them when there are fewer than four."""
    return tuple(range(k)) if k < 4 else (0, 1, k - 1)


def _excerpt(gm: fx.GraphModule, folding: Folding) -> Excerpt:
    stand: dict[str, str] = {}     # dropped node -> the second instance's node at its position
    weight: dict[str, int] = {}
    for t in folding.templates:
        k = len(t.instances)
        if len(excerpt_instances(k)) == k:
            continue
        for names in folding.correspondence(t.id).values():
            weight[names[1]] = k - 2
            stand.update((n, names[1]) for n in names[2:-1])
    if not stand:
        return Excerpt(gm, {})
    nodes = list(gm.graph.nodes)
    members = {n for r in folding.regions for n in r.nodes}
    for node in reversed(nodes):  # parameters and other helpers that only dropped nodes read
        if node.name not in members and node.users and node.op in ("get_attr", "call_function"):
            if all(u.name in stand for u in node.users):
                stand[node.name] = ""
            elif len(w := {weight.get(u.name, 1) for u in node.users}) == 1 and w != {1}:
                weight[node.name] = w.pop()
    graph, env = fx.Graph(), {}
    for node in nodes:
        if node.name not in stand:
            env[node.name] = graph.node_copy(node, lambda a: env[stand.get(a.name) or a.name])
            assert env[node.name].name == node.name, f"excerpt renamed {node.name}"
    return Excerpt(fx.GraphModule(gm, graph), weight)
