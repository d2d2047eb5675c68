"""apply_placements: run a per-op placement plan (``search.opspace``) on DTensor, on one rank.

Parameters become DTensors placed as the plan says (every rank holds the same whole weights, so each
keeps its own shards without communication; tied names keep one parameter). Before every op each
tensor input is resharded to the plan's input placement (``runtime.placements.to_placement``: a
no-op when it is already there, else DTensor's autograd-aware redistribute, whose backward reshards
the gradient); a value read by several ops is resharded once, to its hub placement, first. After an
op, ``expect`` checks that DTensor placed the output as the plan did (and reshards if not, counting
it in ``gm.placement_mismatches``). Graph inputs are placed like any value (a shard of an input every
rank holds is a local slice) and outputs are returned whole. Shapes in view arguments stay global:
DTensor ops take global shapes.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch.distributed.tensor import distribute_tensor
from torch.fx.node import map_arg

from runtime.module import PlacedModule
from runtime.placements import expect, parse, register_rules, to_placement, whole
from search.errors import BadInput
from search.opspace import SKIP
from search.oprules import tensor_inputs
from search.placement import op_name


def emit_placements(gm: fx.GraphModule, plan) -> PlacedModule:
    """This rank's module for a per-op plan: ``gm`` (captured on the plan's global batch) on a DeviceMesh
    of the plan's mesh, rewritten by :func:`apply_placements`."""
    from torch.distributed.device_mesh import init_device_mesh

    names = {n.name for n in gm.graph.nodes}
    missing = [n for n in plan.placements["nodes"] if n not in names]
    if missing:
        raise BadInput(f"the plan places nodes this model's graph does not have ({', '.join(missing[:3])}); "
                       "it was made for another model or other input shapes: re-plan for this model")
    device = "cuda" if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device, tuple(plan.mesh["shape"]), mesh_dim_names=tuple(plan.mesh["axes"]))
    return PlacedModule(apply_placements(gm, plan.placements, mesh), plan, mesh)


def apply_placements(gm: fx.GraphModule, placements: dict, mesh) -> fx.GraphModule:
    """Rewrite ``gm`` in place to run ``placements`` (the plan's section: nodes, hubs, params) on the
    DeviceMesh ``mesh``."""
    register_rules()
    _place_parameters(gm, placements["params"], mesh)
    gm.autopar_mesh = mesh
    gm.placement_mismatches = {}
    graph = gm.graph
    nodes, hubs = placements["nodes"], placements["hubs"]
    first = next(iter(graph.nodes))
    with graph.inserting_before(first), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # fx expects a module, parameter or buffer there
        mesh_node = graph.get_attr("autopar_mesh")
    for n in list(graph.nodes):
        if n.op == "call_function" and op_name(n) in SKIP and not n.users:
            graph.erase_node(n)
    placed: dict[fx.Node, fx.Node] = {}   # value -> what its readers take (after its check and hub)

    def _grad_pin(a: fx.Node) -> str | None:
        """Where a reader hands back the gradient of ``a``: its hub's summing placement, else where the
        producer's backward needs it (parameters: their own hooks place it)."""
        if a.name in hubs:
            return hubs[a.name]["grad"]
        return _need(nodes[a.name]["out"]) if a.name in nodes else None

    for n in list(graph.nodes):
        if n.op == "output":
            n.args = map_arg(n.args, lambda a: _call(graph, whole, (a,), before=n) if a in placed else a)
            continue
        spec = nodes.get(n.name)
        if spec is None:
            continue
        if n.op == "call_function":
            slots, k = spec["in"], [0]

            def reshard(a, n=n, slots=slots, k=k):
                j = k[0]
                k[0] += 1
                return _call(graph, to_placement, (placed.get(a, a), mesh_node, slots[j], _grad_pin(a)), before=n)
            n.args = map_arg(n.args, reshard)
            n.kwargs = map_arg(n.kwargs, reshard)
            if len(slots) != len(tensor_inputs(n)) or k[0] != len(slots):
                raise ValueError(f"plan for {n.name} lists {len(slots)} inputs, the graph has {k[0]}")
        out = n
        if n.op == "placeholder":
            out = _call(graph, to_placement, (n, mesh_node, spec["out"]), after=n)
        elif isinstance(n.meta.get("val"), torch.Tensor):
            out = _call(graph, expect, (n, mesh_node, spec["out"], gm.placement_mismatches), after=n)
        if n.name in hubs:
            out = _call(graph, to_placement, (out, mesh_node, hubs[n.name]["at"], _need(spec["out"])), after=out)
        placed[n] = out
    graph.lint()
    gm.recompile()
    return gm


def _need(spec: str) -> str:
    """Where a value's gradient must arrive for its producer's backward (``search.opspace.need``)."""
    return spec.replace("P", "R")


def _call(graph: fx.Graph, fn, args: tuple, *, before: fx.Node | None = None, after: fx.Node | None = None) -> fx.Node:
    ctx = graph.inserting_before(before) if before is not None else graph.inserting_after(after)
    with ctx:
        return graph.call_function(fn, args)


def _place_parameters(gm: fx.GraphModule, params: dict[str, str], mesh) -> None:
    """Each parameter as a DTensor parameter placed as planned; names that share it (tied weights) too."""
    names: dict[int, list[str]] = {}
    objs = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        objs[name] = p
    done = set()
    for fqn, spec in params.items():
        p = objs[fqn]
        if id(p) in done:
            continue
        done.add(id(p))
        new = torch.nn.Parameter(distribute_tensor(p.detach(), mesh, parse(spec), src_data_rank=None),
                                 requires_grad=p.requires_grad)
        for alias in names[id(p)]:
            owner, _, attr = alias.rpartition(".")
            setattr(gm.get_submodule(owner) if owner else gm, attr, new)
