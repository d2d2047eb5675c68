"""Outline a region of an fx graph into a submodule call (shared by ``passes.chunk``,
``passes.recompute`` and ``passes.zero``), and find a block's region again by module scope (``scope_run``).

A region is a list of call nodes of ``gm``. Its inputs are the values it reads from outside (parameters
included: ``get_attr`` nodes become arguments, so gradients flow through whatever runs the body); its
outputs are the values nodes outside it read. :func:`outline` inserts one ``call_module`` of the given
module before the first outside use of an output, routes every outside use through ``getitem`` nodes
that carry the outputs' metadata, and erases the region. The call node's ``meta["scope"]`` is the
module path the region's nodes share, so a later pass still finds the call inside its block.
"""
from __future__ import annotations

import operator
import os

import torch
import torch.fx as fx

from search.chunkflow import _scope


def region_io(region: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """(inputs, outputs) of ``region``, each in graph order of first appearance."""
    members = set(region)
    inputs, seen = [], set()
    for n in region:
        for a in n.all_input_nodes:
            if a not in members and a not in seen:
                seen.add(a)
                inputs.append(a)
    outputs = [n for n in region if any(u not in members for u in n.users)]
    return inputs, outputs


def copy_body(gm: fx.GraphModule, region: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.GraphModule:
    """A GraphModule running ``region`` of ``gm`` as it is: one placeholder per input, a tuple of the
    outputs; the submodules its ``call_module`` nodes call are shared with ``gm``."""
    g = fx.Graph()
    env = {n: g.placeholder(n.name) for n in inputs}
    for n in region:
        env[n] = g.node_copy(n, env.__getitem__)
    g.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(gm, g)


def outline(gm: fx.GraphModule, region: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node],
            module: torch.nn.Module, base_name: str, *, path: str | None = None) -> str:
    """Replace ``region`` of ``gm`` (in place) by a call of ``module`` on ``inputs`` returning a tuple of
    ``outputs``; returns the submodule's name: a fresh one from ``base_name``, or ``path`` (a dotted
    module path, replacing the module there). The caller recompiles."""
    graph, members = gm.graph, set(region)
    if path is None:
        name = free_name(gm, base_name)
        gm.add_module(name, module)
    else:
        name = path
        gm.set_submodule(path, module)
    order = {n: i for i, n in enumerate(graph.nodes)}
    first_user = min((u for n in outputs for u in n.users if u not in members), key=order.get)
    with graph.inserting_before(first_user):
        call = graph.call_module(name, tuple(inputs))
        call.meta["scope"] = common_scope(region)
        for i, out in enumerate(outputs):
            item = graph.call_function(operator.getitem, (call, i))
            item.meta = dict(out.meta)  # stands for ``out``: same value metadata
            out.replace_all_uses_with(item, delete_user_cb=lambda u: u not in members)
    for n in reversed(region):
        graph.erase_node(n)
    graph.lint()
    return name


def common_scope(region: list[fx.Node]) -> str:
    """The longest module path every node of ``region`` that has one lies in ("" if none)."""
    paths = [s.split(".") for s in map(_scope, region) if s]
    return ".".join(os.path.commonprefix(paths)) if paths else ""


def scope_run(gm: fx.GraphModule, scope: str) -> list[fx.Node]:
    """The call nodes from the first to the last node of module ``scope`` (and its children)."""
    run, last = [], None
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_module"):
            continue
        run.append(n)
        s = _scope(n)
        if s == scope or s.startswith(scope + "."):
            last = len(run)
        elif last is None:
            run.clear()
    return run[:last] if last else []


def free_name(gm: fx.GraphModule, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first name ``gm`` has no attribute of."""
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name
