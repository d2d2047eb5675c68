"""Activation recompute: which nodes each choice recomputes (pure analysis; ``passes.recompute`` emits it).

* ``full`` (per block): every repeated block (an instance of a folding template) runs under checkpoint,
  so its forward keeps only the block's inputs and the backward reruns the block. A block is its module
  scope (the common module path of the instance's nodes, e.g. ``blocks.3``): :func:`block_scopes`.
* ``selective`` (Korthikanti et al.): only the attention core runs under checkpoint, the parameter-free
  part between the projections whose saved tensors grow with s² — :func:`attention_cores`:
  - eager attention: the nodes on the paths from the score matmul (q·kᵀ) through the softmax to the
    matmul with v; it saves the [b, heads, s, s] scores, softmax and mask (5 a s² b bytes-ish per layer in
    16-bit, the ``5as/h`` term of DESIGN §4);
  - a fused ``scaled_dot_product_attention``: the call alone. Flash-style kernels save no s² tensor,
    so selective recompute frees only the attention output and costs the attention forward again; the
    planner prices exactly that, and picks it only when it pays.

    >>> from examples.zoo import build
    >>> from planner.capture import capture
    >>> gm = capture(*build("gpt-tiny-eager", batch=2)).gm
    >>> [[n.split("_")[0] for n in core] for core in attention_cores(gm)][0]
    ['matmul', 'mul', 'masked', 'softmax', 'matmul']
"""
from __future__ import annotations

import os

import torch.fx as fx

from search.chunkflow import _scope, region_between
from search.fold import Folding
from search.graph import ModelGraph
from search.placement import op_name

RECOMPUTE = ("none", "selective", "full")
_MATMULS = {"matmul", "bmm", "einsum", "baddbmm"}
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax"}


def attention_cores(gm: fx.GraphModule) -> list[list[str]]:
    """Node names of every attention core of ``gm`` (see the module docstring), in graph order."""
    cores = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        op = op_name(node)
        if op == "scaled_dot_product_attention":
            cores.append([node.name])
        elif op in _SOFTMAX:
            score, av = _nearest(node, "up"), _nearest(node, "down")
            if score is not None and av is not None:
                cores.append(region_between(score, av))
    return cores


def _nearest(node: fx.Node, way: str) -> fx.Node | None:
    """The first matmul above (``up``: through first inputs) or below (``down``: through users) the
    softmax ``node``, crossing only parameter-free nodes; None if there is none."""
    seen, frontier = set(), [node]
    while frontier:
        nxt = []
        for n in frontier:
            for m in (n.all_input_nodes if way == "up" else n.users):
                if m in seen or m.op != "call_function":
                    continue
                seen.add(m)
                if op_name(m) in _MATMULS:
                    return m
                nxt.append(m)
        frontier = nxt
    return None


def block_scopes(mg: ModelGraph, folding: Folding) -> list[str]:
    """The module scope of every repeated block (instances of templates), graph order; a block whose
    nodes share no module path is left out (it cannot be found again after other passes)."""
    nodes = {n.name: n for n in mg.gm.graph.nodes}
    out = []
    for r in folding.regions:
        if r.template is None:
            continue
        common = os.path.commonprefix([_scope(nodes[n]).split(".") for n in r.nodes if _scope(nodes[n])])
        if common:
            out.append(".".join(common))
    return out
