"""Capture a model as an aten-level fx graph annotated with the facts the search prices.

    >>> from examples.zoo import build
    >>> model, args, kwargs = build("gpt-tiny", batch=2)          # on the meta device
    >>> mg = capture(model, args, kwargs, name="gpt-tiny")
    >>> sum(n.meta["autopar"].fwd_flops for n in mg.nodes()) > 0
    True

torch.export (non-strict, training IR) works on meta and fake tensors, so a 175B model is captured
without allocating it. ``ep.module()`` keeps parameters as ``get_attr`` nodes with their original
FQNs, which is what the passes rewrite and what checkpoints are keyed by. :func:`capture_symbolic`
exports with ``torch.export.Dim`` batch and sequence dimensions: the same formulas then give every
fact as a sympy expression in B and S (``search.symbolic``).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
import os
import sys
import sysconfig
import re
import traceback
from fractions import Fraction
from operator import attrgetter

import torch
import torch.fx as fx
from torch.export import Dim

from search.errors import BadInput, CaptureError
from search.fold import fold
from search.graph import ModelGraph, NodeInfo
from search.graph import expression
from search.saved import annotate_saved
from search.symbolic import FACTS, SYMBOLS

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
_MATMUL_BWD = 2  # a matmul's backward is dgrad + wgrad: twice its forward FLOPs
_SDPA_BWD = Fraction(5, 2)  # flash-style attention backward recomputes scores: ~2.5x forward (exact: B, S symbolic)
MAX_BATCH = 2**20  # symbolic sizes: 1 <= B <= MAX_BATCH, 2 <= S <= MAX_SEQ (at S = 1 a transpose is
MAX_SEQ = 2**21    # already contiguous and a concrete capture drops the copy the symbolic graph keeps)
_SPECIALIZED = re.compile(r"(?:You marked|Not all values of) (B|S)\b")


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, name: str = "model") -> ModelGraph:
    """Export ``model`` on ``args``/``kwargs`` and annotate every node with :class:`NodeInfo`."""
    kwargs = kwargs or {}
    gm = _export(model, args, kwargs)
    batch, seq = example_sizes(args, kwargs)
    mg = _model_graph(gm, name, batch, seq)
    annotate(gm)
    return mg


def capture_symbolic(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, name: str = "model",
                     batch_dim: int | None = 0, seq_dims: tuple[int, ...] = (1,), folded: bool = False) -> ModelGraph:
    """:func:`capture` with the batch and sequence sizes as the symbols ``search.symbolic.B`` and ``S``.

    Dimension ``batch_dim`` of every top-level tensor argument is the batch B, dimensions ``seq_dims``
    (those it has) are the sequence S: ``seq_dims=(1, 2)`` for an Evoformer pair tensor [B, N, N, C],
    ``seq_dims=()`` to keep the sequence concrete, ``batch_dim=None`` to keep the batch concrete (fewer
    symbols trace faster: a range over S needs only S). The example sizes must agree across arguments and be
    at least 2 (torch.export specialises sizes 0 and 1). Facts and shapes in ``NodeInfo`` are sympy
    expressions in B and S (integer, positive), and so are the saved-activation bytes of
    ``search.saved`` (``node.meta["saved_bytes"]``); ``mg.batch_size``/``mg.seq_len`` are the symbols.
    Raises :class:`CaptureError` naming the user's line when the model's code compares B or S with a
    constant (a table sized by the config broadcast against the input, a ``view`` with a literal, a
    pooling window over the sequence), and when a size depends on data (``nonzero``). Limits and the
    evaluation of the expressions: ``search/symbolic.py``. ``folded``: the census executes one instance
    per repeated block (``search.fold``; what a folded search reads, in a fraction of the time).
    """
    kwargs = kwargs or {}
    bound = _bind(model, args, kwargs)
    marked = _marked_dims(bound, batch_dim, tuple(seq_dims))
    dims = {"B": Dim("B", min=1, max=MAX_BATCH), "S": Dim("S", min=2, max=MAX_SEQ)}
    dynamic = {arg: ({d: dims[sym] for d, sym in marked[arg].items()} if arg in marked else None)
               for arg in bound.arguments}
    gm = _export(model, args, kwargs, dynamic)
    symbols = {}  # export's shape-env symbol (named by a hash of its source, e.g. s24) -> B or S
    for node in gm.graph.find_nodes(op="placeholder"):  # target: the forward argument's name
        for d, sym in marked.get(node.target, {}).items():
            symbols[node.meta["val"].shape[d].node.expr] = SYMBOLS[sym]
    batch, seq = example_sizes(args, kwargs)
    mg = _model_graph(gm, name, SYMBOLS["B"] if batch_dim is not None else batch, SYMBOLS["S"] if seq_dims else seq)
    annotate(gm, number=lambda v: expression(v, symbols))
    for node in mg.nodes():
        info = node.meta["autopar"]
        free = set().union(*(getattr(info, f).free_symbols for f in FACTS)) - set(SYMBOLS.values())
        if free:
            raise CaptureError(f"could not capture {type(model).__name__} symbolically: {node.name} "
                               f"({info.op} at {info.source or info.scope}) has a size that depends on data, "
                               f"not only on the batch and sequence ({', '.join(map(str, sorted(free, key=str)))}); "
                               "capture it at concrete shapes with capture().")
    annotate_saved(gm, number=lambda v: expression(v, symbols),  # saved activations: expressions too
                   folding=fold(mg) if folded else None)
    gm.meta["symbols"] = symbols  # read by search.specialize
    return mg


def _bind(model: torch.nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    try:
        return inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise BadInput(f"the example inputs do not match {type(model).__name__}.forward: {exc}") from None


def _marked_dims(bound: inspect.BoundArguments, batch_dim: int | None,
                 seq_dims: tuple[int, ...]) -> dict[str, dict[int, str]]:
    """Argument name -> {dim: "B" | "S"} for every top-level tensor argument; sizes checked."""
    if batch_dim is not None and batch_dim in seq_dims:
        raise BadInput(f"batch_dim {batch_dim} is also in seq_dims {seq_dims}")
    pairs = ([(batch_dim, "B")] if batch_dim is not None else []) + [(d, "S") for d in seq_dims]
    if not pairs:
        raise BadInput("capture_symbolic needs a batch_dim or seq_dims to make symbolic")
    first_dim = min(d for d, _ in pairs)
    marked: dict[str, dict[int, str]] = {}
    sizes: dict[str, tuple[str, int, int]] = {}  # "B"/"S" -> (argument, dim, example size) of its first use
    for arg, value in bound.arguments.items():
        if not isinstance(value, torch.Tensor) or value.dim() <= first_dim:
            continue
        marked[arg] = {d: sym for d, sym in pairs if d < value.dim()}
        for d, sym in marked[arg].items():
            size = int(value.shape[d])
            first = sizes.setdefault(sym, (arg, d, size))
            if size != first[2]:
                raise BadInput(f"{sym} is {first[2]} in dim {first[1]} of {first[0]!r} but {size} in dim {d} of "
                               f"{arg!r}: pass batch_dim/seq_dims that name the same size in every tensor argument")
            if size < 2:
                raise BadInput(f"{sym} is {size} in dim {d} of {arg!r}: export fixes sizes 0 and 1, so capture "
                               "symbolically from example inputs with batch and sequence of at least 2")
    if not marked:
        raise BadInput(f"no tensor argument has dim {first_dim} to make symbolic")
    return marked


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: dict | None = None) -> fx.GraphModule:
    """``torch.export`` (non-strict) -> ``ep.module()`` without its input guards; failures -> CaptureError."""
    _disable_kv_cache(model)
    # torch.export prints the partial graph to stderr when tracing fails; our message replaces that
    printed = io.StringIO()
    sites = _GuardSites()
    try:
        with contextlib.redirect_stderr(printed), (sites if dynamic else contextlib.nullcontext()), _user_lines():
            ep = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # noqa: BLE001 - any export failure becomes one actionable message
        specialized = _SPECIALIZED.findall(str(exc)) if dynamic else []
        if specialized:
            raise CaptureError(_explain_specialization(model, specialized, sites.guards)) from None
        raise CaptureError(_explain_export_failure(model, exc)) from None
    if printed.getvalue():
        sys.stderr.write(printed.getvalue())
    # no input checks: the graph describes the model at the captured shapes, and the passes change
    # them (a sequence-parallel rank sees a part of every sequence)
    gm = ep.module(check_guards=False)
    gm.validate_inputs = False
    return gm


@contextlib.contextmanager
def _user_lines():
    """Trace with each node's ``stack_trace`` cut to the one frame :func:`_source` reads, the user's
    innermost ``forward`` line: torch's own extracts and formats the whole stack for every node, a
    fifth of a large model's export."""
    tracer, config = fx.proxy.TracerBase, torch.fx.config
    create_node, recorded = tracer.create_node, config.do_not_emit_stack_traces

    def with_line(self, *args, **kwargs):
        node = create_node(self, *args, **kwargs)
        if not node.stack_trace and (line := _user_line(sys._getframe(1))):
            node.stack_trace = line
        return node

    tracer.create_node, config.do_not_emit_stack_traces = with_line, True
    try:
        yield
    finally:
        tracer.create_node, config.do_not_emit_stack_traces = create_node, recorded


def _user_line(frame) -> str:
    """``File "...", line N, in forward`` of the innermost ``forward`` outside torch (the model's line that
    made the node, as torch's own forward-only trace names it), or "" when none runs."""
    while frame is not None:
        if frame.f_code.co_name == "forward" and not frame.f_code.co_filename.startswith(_TORCH_DIR):
            return f'File "{frame.f_code.co_filename}", line {frame.f_lineno}, in forward'
        frame = frame.f_back
    return ""


def _model_graph(gm: fx.GraphModule, name: str, batch, seq) -> ModelGraph:
    params = dict(gm.named_parameters())
    param_shapes = {k: tuple(v.shape) for k, v in params.items()}
    param_dtypes = {k: _dtype_name(v.dtype) for k, v in params.items()}
    return ModelGraph(gm=gm, name=name, param_shapes=param_shapes, param_dtypes=param_dtypes,
                      layers=_count_layers(param_shapes), batch_size=batch, seq_len=seq)


def annotate(gm: fx.GraphModule, number=int) -> None:
    """Write ``node.meta["autopar"]`` for every call_function node of ``gm`` that computes tensors.

    One rule set for both captures: the FLOP and byte formulas run on the traced sizes (ints, or
    ``torch.SymInt`` for a symbolic capture) and ``number`` turns each fact and output size into what
    ``NodeInfo`` stores (``int``, or :func:`search.symbolic.expression`).
    """
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
        if node.op != "call_function" or isinstance(node.meta.get("val"), _SIZES):
            continue  # a symbolic capture's size arithmetic (sym_size, B * S for a view) moves no tensor
        node.meta["autopar"] = _node_info(gm, node, node in needs_grad, canonical, number)


def _canonical_param_names(gm: fx.GraphModule) -> dict[str, str]:
    """Every name of a parameter -> its first name, as ``named_parameters()`` lists it (tied weights
    such as an LM head sharing the embedding are reported under the one FQN ``param_shapes`` has)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out


def _node_info(gm: fx.GraphModule, node: fx.Node, grad: bool, canonical: dict[str, str] | None = None,
               number=int) -> NodeInfo:
    op = _op_name(node.target)
    out = node.meta.get("val")
    out_t = _first_tensor(out)
    in_bytes = sum(_tensor_bytes(a.meta.get("val")) for a in node.all_input_nodes)
    out_bytes = sum(_tensor_bytes(t) for t in _tensors(out))
    fwd = _flops(op, node, out_t)
    if op in ("linear", "addmm", "mm", "bmm", "matmul", "baddbmm"):
        bwd = _MATMUL_BWD * fwd
    elif op == "scaled_dot_product_attention":
        bwd = fwd * _SDPA_BWD.numerator // _SDPA_BWD.denominator
    else:
        bwd = fwd
    canonical = canonical or {}
    params = tuple(canonical.get(a.target, a.target) for a in node.all_input_nodes
                   if a.op == "get_attr" and isinstance(attrgetter(a.target)(gm), torch.nn.Parameter))
    return NodeInfo(
        op=op,
        shape=tuple(number(d) for d in out_t.shape) if out_t is not None else None,
        dtype=_dtype_name(out_t.dtype) if out_t is not None else None,
        fwd_flops=number(fwd),
        bwd_flops=number(bwd if grad else 0),
        bytes_read=number(in_bytes),
        bytes_written=number(out_bytes),
        params=params,
        scope=_scope(node),
        source=_source(node),
        output_bytes=number(out_bytes),
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


_SIZES = (torch.SymInt, torch.SymFloat, torch.SymBool)
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


def example_sizes(args, kwargs) -> tuple[int, int]:
    """(batch, sequence) of the example inputs: the first two dims of the first tensor with two or more."""
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
    user = _user_frames(traceback.extract_tb(exc.__traceback__))
    where = f" at {user[-1].filename.rsplit('/', 1)[-1]}:{user[-1].lineno} ({user[-1].line})" if user else ""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"could not capture {type(model).__name__} with torch.export{where}: {type(exc).__name__}: {first[:300]}. "
            + _advice(exc))


def _explain_specialization(model: torch.nn.Module, names: list[str], guards: list[tuple[str, str]]) -> str:
    """Which of B/S the model's code ties to a constant, and the user's line that does it."""
    which = " and ".join(dict.fromkeys(names))
    # the first guard that compares a symbol with a number (not two symbols: the batch of two inputs is equal)
    site = next((f" at {where} (guard {expr})" for expr, where in guards
                 if where and re.search(r"\d", re.sub(r"\bs\d+\b", "", expr))), "")
    return (f"could not capture {type(model).__name__} with {which} symbolic: its code compares {which} with a "
            f"constant{site}, which fixes or bounds it. Keep that dimension concrete (capture_symbolic(..., seq_dims=()) for the "
            "sequence, capture() for both), or size what it is compared with by the input instead of the "
            "config (e.g. slice a position table to the length).")


class _GuardSites(logging.Handler):
    """While attached, records (guard, "file.py:line (code)") for every guard torch.export adds: the
    ShapeEnv logs each one at INFO from inside the traced call, so the stack at ``emit`` holds the
    user's frame (export's own error names the dimension only)."""

    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")

    def __init__(self):
        super().__init__(logging.INFO)
        self.guards: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "[guard added]" in str(record.msg):
            user = _user_frames(traceback.extract_stack())
            where = f"{user[-1].filename.rsplit('/', 1)[-1]}:{user[-1].lineno} ({user[-1].line})" if user else ""
            self.guards.append((str(record.args[1]), where))

    def __enter__(self) -> "_GuardSites":
        log = self.logger
        self.saved = log.level, log.propagate, log.handlers
        # ours alone: torch's handlers (on this logger and its parents) would print every INFO record
        log.setLevel(logging.INFO)
        log.propagate, log.handlers = False, [self]
        return self

    def __exit__(self, *exc) -> None:
        log = self.logger
        log.propagate, log.handlers = self.saved[1:]
        log.setLevel(self.saved[0])  # setLevel, not assignment: it clears the loggers' isEnabledFor caches


def _user_frames(frames) -> list:
    """The frames of ``frames`` in the user's code: not torch's, Python's or this module's."""
    here = os.path.abspath(__file__)
    return [f for f in frames if not f.filename.startswith(("<", _TORCH_DIR, _STDLIB_DIR))
            and "site-packages/torch" not in f.filename and os.path.abspath(f.filename) != here]


def _advice(exc: Exception) -> str:
    """What to do about the usual causes of an export failure."""
    text = f"{type(exc).__name__} {exc}"
    if "device" in text.lower() and ("meta" in text or "Device" in text):
        return ("The model's parameters and the example inputs are on different devices: build both on the "
                "same device (e.g. `with torch.device('meta'):` around the model and meta inputs).")
    return ("Data-dependent Python control flow (if/for on tensor values, .item(), .tolist()) cannot be traced: "
            "replace it with torch.where/torch.cond, or move it out of forward().")
