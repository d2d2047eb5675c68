"""Saved-activation census: the bytes autograd keeps for backward, per node, measured by running the
captured graph once on meta tensors under ``torch.autograd.graph.saved_tensors_hooks``.

Which tensors an op saves is the op's business (linear saves its input, softmax its output, gelu its
input, add nothing, cross-entropy the log-softmax of the logits, dropout its mask, an eager matmul of
transposed operands the contiguous copies it makes), so autopar asks autograd instead of keeping a
table. Every saved storage is counted once and charged to the node that created it: a node's output
when a consumer (or the node itself) saves it, or a buffer the node made internally. Views share their
base's storage and are charged to the base's producer. Parameters and graph inputs are not activations;
the non-scalar outputs the model returns are kept (the caller holds them through backward).
:func:`checkpoint_bytes` reads the census to say what running a region under checkpoint frees and keeps.

``scaled_dot_product_attention`` is charged by rule, as the flash-style kernels CPUs and GPUs run save
it (q, k, v, an explicit mask, the output and the fp32 log-sum-exp per query row); on meta tensors torch would run the
math fallback, which saves the [.., L, S] weights no fused kernel keeps.

    >>> from examples.zoo import build
    >>> from planner.capture import capture
    >>> mg = capture(*build("gpt-tiny-eager", batch=2))
    >>> census = annotate_saved(mg.gm)
    >>> [n.meta["saved_bytes"] for n in mg.gm.graph.nodes if n.name == "softmax"]  # [2, 4, 32, 32] fp32
    [32768]
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves, tree_map

from search.placement import op_name


@dataclass
class Census:
    """Storage facts of one forward: ``owner`` (activation storage -> the node that created it),
    ``nbytes``, ``savers`` (saved storage -> the nodes whose backward saves it), ``out_storage`` (node ->
    the storage of its first output)."""

    owner: dict[int, str]
    nbytes: dict[int, int]
    savers: dict[int, frozenset]
    out_storage: dict[str, int]

    @functools.cached_property
    def saved_by_owner(self) -> dict[str, list[int]]:
        """Node -> the saved storages it created."""
        out: dict[str, list[int]] = {}
        for k in self.savers:
            if k in self.owner:
                out.setdefault(self.owner[k], []).append(k)
        return out


def annotate_saved(gm: fx.GraphModule, number=int, folding=None) -> Census:
    """Write ``node.meta["saved_bytes"]`` for every node of ``gm`` and return the census (kept in
    ``gm.meta["saved_census"]``: run once per graph). A symbolic capture (``planner.capture.capture_symbolic``)
    runs on its own fake tensors, so sizes stay ``torch.SymInt``; ``number`` turns each node's bytes into
    what is stored (``int``, or ``search.graph.expression`` with the capture's symbols).

    With a ``folding`` (``search.fold``), instances 2, 3, ... of a template are not executed (their
    outputs are fresh tensors of the recorded shapes) and every instance after the first gets the first
    one's bytes, node by node: instance 1 still runs, so the first instance's output is saved by its
    real consumer. The storage facts then describe the executed nodes only (first instances and the
    nodes outside blocks: what the search reads). O(template size + nodes outside blocks)."""
    if "saved_census" not in gm.meta:
        inputs = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
        fake = next((v.fake_mode for v in inputs if isinstance(v, torch.Tensor) and _symbolic(v)), None)
        copies = {}  # skipped or partly counted node -> the first instance's node at its position
        for t in folding.templates if folding is not None else ():
            for first, names in folding.correspondence(t.id).items():
                copies.update({name: first for name in names[1:]})
        skip = {name for t in folding.templates for names in folding.correspondence(t.id).values()
                for name in names[2:]} if folding is not None else set()
        run = _Census(gm, on_meta=fake is None, skip=skip)
        with fake or contextlib.nullcontext(), torch.autograd.graph.saved_tensors_hooks(run.pack, _unpack):
            run.run(*(v if fake else _meta_input(v) for v in inputs))
        for n in gm.graph.nodes:
            n.meta["saved_bytes"] = number(run.saved.get(copies.get(n.name, n.name), 0))
        gm.meta["saved_census"] = Census({k: o for k, o in run.owner.items() if o is not None}, run.nbytes,
                                         {k: frozenset(v) for k, v in run.savers.items()}, run.storage)
    return gm.meta["saved_census"]


def checkpoint_bytes(gm: fx.GraphModule, region: list[str], nodes: dict[str, fx.Node]) -> tuple[int, int]:
    """(freed, kept) if ``region`` runs under checkpoint: the bytes of saved storages its nodes created
    that only its nodes save, and the bytes of its activation inputs' storages that nothing saves (the
    checkpoint keeps them alive). ``nodes``: ``gm``'s nodes by name."""
    c = annotate_saved(gm)
    members = set(region)
    freed = sum(c.nbytes[k] for name in region for k in c.saved_by_owner.get(name, ()) if c.savers[k] <= members)
    inputs = {c.out_storage.get(a.name) for name in region for a in nodes[name].all_input_nodes
              if a.name not in members}
    kept = sum(c.nbytes[k] for k in inputs if k in c.owner and k not in c.savers)
    return freed, kept


class _Census(fx.Interpreter):
    """``on_meta``: run on meta tensors (a concrete capture); else on the capture's own fake tensors,
    on their devices."""

    def __init__(self, gm: fx.GraphModule, on_meta: bool, skip: set[str]):
        super().__init__(gm)
        self.on_meta = on_meta
        self.skip = skip
        self.owner: dict[int, str | None] = {}   # storage -> node that created it (None: not an activation)
        self.savers: dict[int, set[str]] = {}    # storage -> nodes whose backward saves it
        self.saved: dict[str, int] = {}          # node -> bytes of the saved storages it created
        self.storage: dict[str, int] = {}        # node -> the storage of its (first) output
        self.nbytes: dict[int, int] = {}
        self.alive: list[torch.Tensor] = []      # keeps storages (and their keys) alive during the run
        self.current: str | None = None

    def placeholder(self, target, args, kwargs):
        value = super().placeholder(target, args, kwargs)
        self._own(value, None)
        return value

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor):
            value = torch.empty_like(value, device=_META if self.on_meta else None).requires_grad_(value.requires_grad)
            self._own(value, None)
        return value

    def call_function(self, target, args, kwargs):
        if self.on_meta:  # factories (masks, positions) and moves (``x.to(device)``) of a model on a real device
            args = tuple(_META if isinstance(a, torch.device) else a for a in args)
            kwargs = {k: _META if isinstance(v, torch.device) else v for k, v in kwargs.items()}
        return super().call_function(target, args, kwargs)

    def output(self, target, args, kwargs):
        # what the model returns (logits next to the loss, say) stays alive until its backward: kept
        for t in tree_leaves(args):
            if isinstance(t, torch.Tensor) and t.dim():
                self.pack(t)
        return super().output(target, args, kwargs)

    def run_node(self, n: fx.Node):
        self.current = n.name
        if n.name in self.skip:  # a later instance of a template: only its outputs' shapes matter
            out = tree_map(self._fresh, n.meta.get("val"))
        elif n.op == "call_function" and op_name(n) == "scaled_dot_product_attention":
            out = self._flash_attention(n)
        else:
            out = super().run_node(n)
        self._own(out, n.name)
        first = next((t for t in tree_leaves(out) if isinstance(t, torch.Tensor)), None)
        if first is not None:
            self.storage[n.name] = _key(first)
        return out

    def _fresh(self, val):
        if not isinstance(val, torch.Tensor):
            return val
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=_META if self.on_meta else val.device,
                                   requires_grad=val.dtype.is_floating_point)

    def _flash_attention(self, n: fx.Node) -> torch.Tensor:
        args = [*n.args, *(n.kwargs[x] for x in ("query", "key", "value") if x in n.kwargs)][:3]
        q, k, v = (self.env[a] for a in args)
        mask = self.env.get(n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None))
        for t in (q, k, v, mask):
            if isinstance(t, torch.Tensor):
                self.pack(t)
        out = self._fresh(n.meta["val"])
        self._own(out, n.name)
        self.pack(out)
        lse = math.prod(q.shape[:-1]) * 4  # one fp32 per query row and head
        self.saved[n.name] = self.saved.get(n.name, 0) + lse
        return out

    def _own(self, value, name: str | None) -> None:
        for t in tree_leaves(value):
            if isinstance(t, torch.Tensor):
                key = _key(t)
                self.owner.setdefault(key, name)
                self.nbytes.setdefault(key, t.untyped_storage().nbytes())
                self.alive.append(t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _key(t)
        if key not in self.savers:
            self.savers[key] = set()
            self.alive.append(t)
            self.nbytes.setdefault(key, t.untyped_storage().nbytes())
            who = self.owner.get(key, self.current)
            self.owner.setdefault(key, who)
            if who is not None:
                self.saved[who] = self.saved.get(who, 0) + self.nbytes[key]
        self.savers[key].add(self.current)
        return t


_META = torch.device("meta")


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _symbolic(t: torch.Tensor) -> bool:
    return any(isinstance(d, torch.SymInt) for d in t.shape)


def _meta_input(val):
    if isinstance(val, torch.Tensor):
        return torch.empty(val.shape, dtype=val.dtype, device="meta")
    return val
