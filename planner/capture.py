"""Capture a model as an aten-level fx graph annotated with the facts the search prices.

    >>> from examples.zoo import build
    >>> model, args, kwargs = build("gpt-tiny", batch=2)          # on the meta device
    >>> mg = capture(model, args, kwargs, name="gpt-tiny")
    >>> sum(n.meta["autopar"].fwd_flops for n in mg.nodes()) > 0
    True

torch.export (non-strict, training IR) works on meta and fake tensors, so a 175B model is captured
without allocating it. ``ep.module()`` keeps parameters as ``get_attr`` nodes with their original
FQNs, which is what the passes rewrite and what checkpoints are keyed by.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import re
import traceback
from operator import attrgetter

import torch
import torch.fx as fx

from search.errors import CaptureError
from search.graph import ModelGraph, NodeInfo

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_MATMUL_BWD = 2  # a matmul's backward is dgrad + wgrad: twice its forward FLOPs
_SDPA_BWD = 2.5  # flash-style attention backward recomputes scores: ~2.5x forward


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, name: str = "model") -> ModelGraph:
    """Export ``model`` on ``args``/``kwargs`` and annotate every node with :class:`NodeInfo`."""
    kwargs = kwargs or {}
    _disable_kv_cache(model)
    # torch.export prints the partial graph to stderr when tracing fails; our message replaces that
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
    except Exception as exc:  # noqa: BLE001 - any export failure becomes one actionable message
        raise CaptureError(_explain_export_failure(model, exc)) from None
    if printed.getvalue():
        sys.stderr.write(printed.getvalue())
    gm = _without_guards(ep.module())
    params = dict(gm.named_parameters())
    param_shapes = {k: tuple(v.shape) for k, v in params.items()}
    param_dtypes = {k: _dtype_name(v.dtype) for k, v in params.items()}
    batch, seq = _batch_and_seq(args, kwargs)
    mg = ModelGraph(gm=gm, name=name, param_shapes=param_shapes, param_dtypes=param_dtypes,
                    layers=_count_layers(param_shapes), batch_size=batch, seq_len=seq)
    annotate(gm)
    return mg


def _without_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop the export's input-shape guard: the graph describes the model at the captured shapes, and
    the passes change them (a sequence-parallel rank sees a part of every sequence)."""
    for guard in gm.graph.find_nodes(op="call_module", target="_guards_fn"):
        gm.graph.erase_node(guard)
    gm.recompile()
    return gm


def annotate(gm: fx.GraphModule) -> None:
    """Write ``node.meta["autopar"]`` for every call_function node of ``gm``."""
    needs_grad = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            attr = attrgetter(node.target)(gm)
            if isinstance(attr, torch.nn.Parameter) and attr.requires_grad:
                needs_grad.add(node)
        elif node.op == "placeholder":
            continue
        elif node.op == "call_function" and any(a in needs_grad for a in node.all_input_nodes):
            needs_grad.add(node)
    canonical = _canonical_param_names(gm)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        node.meta["autopar"] = _node_info(gm, node, node in needs_grad, canonical)


def _canonical_param_names(gm: fx.GraphModule) -> dict[str, str]:
    """Every name of a parameter -> its first name, as ``named_parameters()`` lists it (tied weights
    such as an LM head sharing the embedding are reported under the one FQN ``param_shapes`` has)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out


def _node_info(gm: fx.GraphModule, node: fx.Node, grad: bool, canonical: dict[str, str] | None = None) -> NodeInfo:
    op = _op_name(node.target)
    out = node.meta.get("val")
    out_t = _first_tensor(out)
    in_bytes = sum(_tensor_bytes(a.meta.get("val")) for a in node.all_input_nodes)
    out_bytes = sum(_tensor_bytes(t) for t in _tensors(out))
    fwd = _flops(op, node, out_t)
    if op in ("linear", "addmm", "mm", "bmm", "matmul", "baddbmm"):
        bwd = _MATMUL_BWD * fwd
    elif op == "scaled_dot_product_attention":
        bwd = int(_SDPA_BWD * fwd)
    else:
        bwd = fwd
    canonical = canonical or {}
    params = tuple(canonical.get(a.target, a.target) for a in node.all_input_nodes
                   if a.op == "get_attr" and isinstance(attrgetter(a.target)(gm), torch.nn.Parameter))
    return NodeInfo(
        op=op,
        shape=tuple(out_t.shape) if out_t is not None else None,
        dtype=_dtype_name(out_t.dtype) if out_t is not None else None,
        fwd_flops=fwd,
        bwd_flops=bwd if grad else 0,
        bytes_read=in_bytes,
        bytes_written=out_bytes,
        params=params,
        scope=_scope(node),
        source=_source(node),
        output_bytes=out_bytes,
    )


def _flops(op: str, node: fx.Node, out) -> int:
    """Forward FLOPs from global shapes: 2·M·N·K for matmuls, 4·b·h·s_q·s_k·d for attention."""
    if out is None:
        return 0
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in node.args]
    if op == "linear":
        k = vals[0].shape[-1]
        return 2 * out.numel() * k
    if op == "addmm":
        return 2 * out.numel() * vals[1].shape[-1]
    if op in ("mm", "bmm", "matmul", "baddbmm"):
        a = vals[1] if op == "baddbmm" else vals[0]
        return 2 * out.numel() * a.shape[-1]
    if op == "scaled_dot_product_attention":
        q, k = vals[0], vals[1]
        return 4 * math.prod(q.shape[:-1]) * k.shape[-2] * q.shape[-1]
    if op in _VIEW_OPS:
        return 0
    return out.numel()  # element-wise, norms, reductions: one FLOP per output element (memory-bound)


_VIEW_OPS = {"view", "reshape", "_unsafe_view", "transpose", "permute", "expand", "unsqueeze", "squeeze",
             "slice", "select", "split", "chunk", "getitem", "t", "contiguous", "alias", "detach",
             "_assert_tensor_metadata", "to", "clone", "flatten", "unflatten"}


def _op_name(target) -> str:
    if hasattr(target, "_schema"):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _tensors(val):
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (tuple, list)):
        return [t for v in val for t in _tensors(v)]
    return []


def _first_tensor(val):
    ts = _tensors(val)
    return ts[0] if ts else None


def _tensor_bytes(val) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(val))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return re.sub(r"^L\['self'\]\.?", "", str(path))


def _source(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if not frames:
        return ""
    # the innermost frame outside torch itself: the user's `self.qkv(x)`, not nn/modules/linear.py
    user = [f for f in frames if not f[0].startswith(_TORCH_DIR)]
    path, line = (user or frames)[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}"


def _count_layers(param_shapes: dict) -> int:
    """Number of repeated blocks: the longest run of `<prefix>.<i>.` parameter prefixes."""
    indices: dict[str, set[int]] = {}
    for fqn in param_shapes:
        for m in re.finditer(r"^(.*?)\.(\d+)\.", fqn):
            indices.setdefault(m.group(1), set()).add(int(m.group(2)))
    return max((len(v) for v in indices.values()), default=0)


def _batch_and_seq(args, kwargs) -> tuple[int, int]:
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return int(t.shape[0]), int(t.shape[1])
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor) and t.dim() == 1:
            return int(t.shape[0]), 1
    return 1, 1


def _disable_kv_cache(model: torch.nn.Module) -> None:
    """Hugging Face models return a KV cache object export cannot flatten; training needs none."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False


def _explain_export_failure(model: torch.nn.Module, exc: Exception) -> str:
    """Name the failing op/module and the user's source line, and say what to do."""
    frames = traceback.extract_tb(exc.__traceback__)
    here = os.path.abspath(__file__)
    user = [f for f in frames if not f.filename.startswith("<") and not f.filename.startswith(_TORCH_DIR)
            and "site-packages/torch" not in f.filename and os.path.abspath(f.filename) != here]
    where = f" at {user[-1].filename.rsplit('/', 1)[-1]}:{user[-1].lineno} ({user[-1].line})" if user else ""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"could not capture {type(model).__name__} with torch.export{where}: {type(exc).__name__}: {first[:300]}. "
            + _advice(exc))


def _advice(exc: Exception) -> str:
    """What to do about the usual causes of an export failure."""
    text = f"{type(exc).__name__} {exc}"
    if "device" in text.lower() and ("meta" in text or "Device" in text):
        return ("The model's parameters and the example inputs are on different devices: build both on the "
                "same device (e.g. `with torch.device('meta'):` around the model and meta inputs).")
    return ("Data-dependent Python control flow (if/for on tensor values, .item(), .tolist()) cannot be traced: "
            "replace it with torch.where/torch.cond, or move it out of forward().")
