"""Plan: the validated, deterministic Plan JSON v1 (docs/ARCHITECTURE.md "Plan JSON v1").

``Plan.from_dict`` / ``Plan.from_json`` validate and raise :class:`search.errors.BadInput` naming the
bad field (dotted path, e.g. ``degrees.tp``). Parsing uses :mod:`json` only (never pickle/eval),
rejects files over 50 MB, nesting deeper than 20 and NaN/Infinity.

Determinism (``to_json``): top-level and known nested keys in the fixed schema order (extra keys of
free-form nested dicts follow, sorted), every float rounded to 6 significant digits
(``float(f"{x:.6g}")``), ints kept exact, ``indent=2``, trailing newline. Optional sections that are
absent (``dtype``, ``tensor_parallel``, ``alternatives``, ``warnings``, ``predicted.breakdown``,
``search.candidates``) are filled with defaults, so two equal plans always serialise byte-identically.
Why 6 digits: the cost model is plain float arithmetic, so one machine reproduces it bit for bit; on
another CPU/BLAS or after a harmless reordering of a sum a float may move by a few ulps (~1e-16
relative), which rounding absorbs unless the value sits on a 6th-digit rounding boundary (odds ~1e-10
per value). Real cost changes (≥ 1e-6 relative) still show, so golden plans catch them.

The optional top-level ``case`` records the inputs that produced the plan ({model, cluster, devices,
global_batch, seq, dtype, memory_limit_gib, fix}), so ``autopar check`` and ``autopar explain --why``
can re-plan it (``planner.check.plan_case``).

The optional top-level ``range`` makes a range plan over sequence length S (or global batch B): the
top level is the plan at the range's low end; ``range.pieces`` tile [lo, hi], each with its own plan
(validated like the top level, without ``range``/``case``; null when nothing fits), sympy expression
strings for step time and peak memory (checked by a character whitelist, never evaluated), one
``breakpoints`` entry per boundary and ``samples`` of the predicted curve (``Plan.piece_for``).
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from search.errors import BadInput
from search.pipeline import SCHEDULES as PIPELINE_SCHEDULES
from search.recompute import RECOMPUTE
from search.seqpar import VARIANTS as SP_VARIANTS

MAX_BYTES = 50 * 1024 * 1024
MAX_DEPTH = 20

SCHEDULES = ("none", *PIPELINE_SCHEDULES)
TP_STYLES = ("colwise", "rowwise")
DTYPES = ("bf16", "fp16", "fp32", "bfloat16", "float16", "float32")

TOP_KEYS = (
    "version", "case", "model", "cluster", "global_batch", "seq_len", "dtype", "mesh", "degrees", "pipeline",
    "tensor_parallel", "megatron_sp", "sequence_parallel", "placements", "templates", "chunking", "recompute", "predicted", "search",
    "alternatives", "warnings", "range",
)
MODEL_KEYS = ("name", "params", "layers")
CLUSTER_KEYS = ("name", "devices", "devices_per_node")
MESH_KEYS = ("shape", "axes")
DEGREE_KEYS = ("dp", "tp", "pp", "sp", "zero")
PIPELINE_KEYS = ("schedule", "microbatches", "microbatch_size", "stages")
PREDICTED_KEYS = ("step_time_s", "peak_memory_bytes", "comm_bytes", "bubble_fraction",
                  "tflops_per_device", "mfu", "breakdown")
SEARCH_KEYS = ("seconds", "folded", "unique_blocks", "ilp_variables", "solver_status", "candidates")
TP_KEYS = ("style", "groups")
SP_KEYS = ("variant", "degree", "inner", "layout", "comm_bytes_per_step", "exposed_s_per_step", "options")
SP_OPTION_KEYS = ("variant", "inner", "exposed_s_per_step", "comm_bytes_per_step")
SP_LAYOUTS = ("contiguous", "zigzag")
CHUNK_KEYS = ("kind", "scope", "dim", "chunks")
CHUNK_KINDS = ("mlp", "attention", "lm_head_loss", "pair")
CASE_KEYS = ("model", "cluster", "devices", "global_batch", "seq", "dtype", "memory_limit_gib", "fix")
FIX_INT_KEYS = ("dp", "tp", "pp", "sp", "zero", "microbatches")
FIX_CHOICE_KEYS = {"schedule": SCHEDULES, "recompute": RECOMPUTE, "attention": SP_VARIANTS}
FIX_KEYS = FIX_INT_KEYS + tuple(FIX_CHOICE_KEYS)
ALT_KEYS = ("degrees", "zero", "microbatch_size", "recompute", "step_time_s", "peak_memory_bytes",
            "feasible", "why")
RANGE_KEYS = ("symbol", "lo", "hi", "step", "memory_limit_bytes", "pieces", "breakpoints", "samples")
RANGE_SYMBOLS = {"S": ("seq_len", "--seq"), "B": ("global_batch", "--global-batch")}  # field, plan option
RANGE_CAUSES = ("memory", "time", "plan")
PIECE_KEYS = ("lo", "hi", "plan", "infeasible", "step_time_s", "peak_memory_bytes")
BREAK_KEYS = ("at", "cause", "left", "right")
SIDE_KEYS = ("step_time_s", "peak_memory_bytes", "feasible")
SAMPLE_KEYS = ("at", "piece", "step_time_s", "peak_memory_bytes", "priced", "skipped")  # configurations
MAX_EXPR = 2000
_EXPR_CHARS = frozenset("0123456789eE.+-*/() ")

# Fixed key order for known nested dicts; other dicts (free-form) get sorted keys.
_ORDER: dict[tuple[str, ...], tuple[str, ...]] = {
    ("case",): CASE_KEYS,
    ("model",): MODEL_KEYS,
    ("cluster",): CLUSTER_KEYS,
    ("mesh",): MESH_KEYS,
    ("degrees",): DEGREE_KEYS,
    ("pipeline",): PIPELINE_KEYS,
    ("predicted",): PREDICTED_KEYS,
    ("search",): SEARCH_KEYS,
    ("sequence_parallel",): SP_KEYS,
    ("sequence_parallel", "options", "[]"): SP_OPTION_KEYS,
    ("chunking", "[]"): CHUNK_KEYS,
    ("range",): RANGE_KEYS,
    ("range", "pieces", "[]"): PIECE_KEYS,
    ("range", "breakpoints", "[]"): BREAK_KEYS,
    ("range", "breakpoints", "[]", "left"): SIDE_KEYS,
    ("range", "breakpoints", "[]", "right"): SIDE_KEYS,
    ("range", "samples", "[]"): SAMPLE_KEYS,
}

GIB = 1024 ** 3


# ---------------------------------------------------------------- helpers

def _round(x: float) -> float:
    """Round a float to 6 significant digits (the determinism rule)."""
    if x == 0:
        return 0.0
    return float(f"{x:.6g}")


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and not (isinstance(v, float) and not math.isfinite(v))


def _depth(obj: Any) -> int:
    """Nesting depth of containers, iteratively (no recursion on hostile input)."""
    best = 0
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            best = max(best, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            best = max(best, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((v, d + 1) for v in o)
    return best


class _V:
    """Small validation helpers; every failure raises BadInput naming the dotted field."""

    @staticmethod
    def fail(field: str, msg: str) -> None:
        raise BadInput(f"plan field '{field}': {msg}")

    @classmethod
    def dict_(cls, d: dict, key: str, field: str, *, required: bool = True) -> dict | None:
        if key not in d:
            if required:
                cls.fail(field, "missing")
            return None
        v = d[key]
        if not isinstance(v, dict):
            cls.fail(field, f"expected an object, got {_type_name(v)}")
        return v

    @classmethod
    def keys(cls, d: dict, keys: tuple[str, ...], field: str, required: tuple[str, ...] | None = None) -> None:
        for k in keys if required is None else required:
            if k not in d:
                cls.fail(f"{field}.{k}" if field else k, "missing")
        for k in d:
            if not isinstance(k, str):
                cls.fail(field, f"non-string key {k!r}")

    @classmethod
    def int_(cls, v: Any, field: str, minimum: int | None = None, maximum: int | None = None) -> int:
        if not _is_int(v):
            cls.fail(field, f"expected an integer, got {_type_name(v)}")
        if minimum is not None and v < minimum:
            cls.fail(field, f"must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            cls.fail(field, f"must be <= {maximum}, got {v}")
        return v

    @classmethod
    def num(cls, v: Any, field: str, minimum: float | None = None, nullable: bool = False) -> Any:
        if v is None and nullable:
            return v
        if not _is_num(v):
            cls.fail(field, f"expected a finite number, got {_type_name(v)}")
        if minimum is not None and v < minimum:
            cls.fail(field, f"must be >= {minimum}, got {v}")
        return v

    @classmethod
    def str_(cls, v: Any, field: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(v, str):
            cls.fail(field, f"expected a string, got {_type_name(v)}")
        if choices is not None and v not in choices:
            cls.fail(field, f"unknown value {v!r} (expected one of {', '.join(choices)})")
        return v

    @classmethod
    def bool_(cls, v: Any, field: str) -> bool:
        if not isinstance(v, bool):
            cls.fail(field, f"expected true/false, got {_type_name(v)}")
        return v

    @classmethod
    def list_(cls, v: Any, field: str) -> list:
        if not isinstance(v, list):
            cls.fail(field, f"expected a list, got {_type_name(v)}")
        return v


def _check_numbers(obj: Any, field: str) -> None:
    """Reject NaN/Infinity anywhere (they are not JSON and break determinism)."""
    stack = [(obj, field)]
    while stack:
        o, f = stack.pop()
        if isinstance(o, float) and not math.isfinite(o):
            _V.fail(f, "NaN/Infinity is not allowed")
        elif isinstance(o, dict):
            for k, v in o.items():
                if not isinstance(k, str):
                    _V.fail(f, f"non-string key {k!r}")
                stack.append((v, f"{f}.{k}" if f else k))
        elif isinstance(o, list):
            stack.extend((v, f"{f}[{i}]") for i, v in enumerate(o))
        elif not (o is None or isinstance(o, (str, int, float, bool))):
            _V.fail(f, f"not a JSON value ({type(o).__name__})")


def _validate(d: Any) -> dict:
    """Validate and return a normalised deep copy (defaults filled in)."""
    if not isinstance(d, dict):
        raise BadInput(f"plan: expected a JSON object at top level, got {_type_name(d)}")
    if _depth(d) > MAX_DEPTH:
        raise BadInput(f"plan: nesting deeper than {MAX_DEPTH} levels")
    _check_numbers(d, "")
    unknown = [k for k in d if k not in TOP_KEYS]
    if unknown:
        raise BadInput(f"plan field '{sorted(unknown)[0]}': unknown top-level key "
                       f"(known: {', '.join(TOP_KEYS)})")
    d = copy.deepcopy(d)
    V = _V

    if "version" not in d:
        V.fail("version", "missing")
    if not _is_int(d["version"]) or d["version"] != 1:
        V.fail("version", f"unsupported plan version {d['version']!r} (this autopar reads version 1)")

    if "case" in d:
        _validate_case(d["case"])

    m = V.dict_(d, "model", "model")
    V.keys(m, MODEL_KEYS, "model")
    V.str_(m["name"], "model.name")
    V.int_(m["params"], "model.params", 0)
    V.int_(m["layers"], "model.layers", 0)

    c = V.dict_(d, "cluster", "cluster")
    V.keys(c, CLUSTER_KEYS, "cluster")
    V.str_(c["name"], "cluster.name")
    devices = V.int_(c["devices"], "cluster.devices", 1)
    V.int_(c["devices_per_node"], "cluster.devices_per_node", 1)

    for k in ("global_batch", "seq_len"):
        if k not in d:
            V.fail(k, "missing")
        V.int_(d[k], k, 1)
    if "dtype" in d:
        V.str_(d["dtype"], "dtype", DTYPES)
    else:
        d["dtype"] = "bf16"

    mesh = V.dict_(d, "mesh", "mesh")
    V.keys(mesh, MESH_KEYS, "mesh")
    shape = V.list_(mesh["shape"], "mesh.shape")
    axes = V.list_(mesh["axes"], "mesh.axes")
    if not shape:
        V.fail("mesh.shape", "must not be empty")
    prod = 1
    for i, s in enumerate(shape):
        prod *= V.int_(s, f"mesh.shape[{i}]", 1)
    for i, a in enumerate(axes):
        V.str_(a, f"mesh.axes[{i}]")
    if len(axes) != len(shape):
        V.fail("mesh.axes", f"has {len(axes)} names for {len(shape)} mesh dimensions")
    if len(set(axes)) != len(axes):
        V.fail("mesh.axes", "duplicate axis names")
    if prod != devices:
        V.fail("mesh.shape", f"product {prod} != cluster.devices {devices}")

    deg = V.dict_(d, "degrees", "degrees")
    V.keys(deg, DEGREE_KEYS, "degrees")
    for k in ("dp", "tp", "pp", "sp"):
        V.int_(deg[k], f"degrees.{k}", 1)
    V.int_(deg["zero"], "degrees.zero", 0, 3)
    dprod = deg["dp"] * deg["tp"] * deg["pp"] * deg["sp"]
    if dprod != devices:
        V.fail("degrees", f"dp*tp*pp*sp = {deg['dp']}*{deg['tp']}*{deg['pp']}*{deg['sp']} = {dprod} "
                          f"!= cluster.devices {devices}")

    p = V.dict_(d, "pipeline", "pipeline")
    V.keys(p, PIPELINE_KEYS, "pipeline")
    V.str_(p["schedule"], "pipeline.schedule", SCHEDULES)
    V.int_(p["microbatches"], "pipeline.microbatches", 1)
    V.int_(p["microbatch_size"], "pipeline.microbatch_size", 1)
    V.list_(p["stages"], "pipeline.stages")

    tp = V.dict_(d, "tensor_parallel", "tensor_parallel", required=False)
    if tp is None:
        d["tensor_parallel"] = {}
    else:
        for fqn, spec in tp.items():
            f = f"tensor_parallel.{fqn}"
            if not isinstance(spec, dict):
                V.fail(f, f"expected an object, got {_type_name(spec)}")
            V.keys(spec, TP_KEYS, f)
            extra = [k for k in spec if k not in TP_KEYS]
            if extra:
                V.fail(f"{f}.{extra[0]}", "unknown key")
            V.str_(spec["style"], f"{f}.style", TP_STYLES)
            V.int_(spec["groups"], f"{f}.groups", 1)

    if "megatron_sp" in d:
        V.bool_(d["megatron_sp"], "megatron_sp")
        if d["megatron_sp"] and deg["tp"] == 1:
            V.fail("megatron_sp", "needs degrees.tp > 1")
    else:
        d["megatron_sp"] = False
    _validate_sp(d, deg["sp"])
    _validate_placements(d, len(shape))

    if "templates" not in d:
        V.fail("templates", "missing")
    if not isinstance(d["templates"], (dict, list)) and d["templates"] is not None:
        V.fail("templates", f"expected an object or list, got {_type_name(d['templates'])}")
    if "chunking" not in d:
        V.fail("chunking", "missing")
    for i, ch in enumerate(V.list_(d["chunking"], "chunking")):
        f = f"chunking[{i}]"
        if not isinstance(ch, dict):
            V.fail(f, f"expected an object, got {_type_name(ch)}")
        V.keys(ch, CHUNK_KEYS, f)
        V.str_(ch["kind"], f"{f}.kind", CHUNK_KINDS)
        V.str_(ch["scope"], f"{f}.scope")
        V.int_(ch["dim"], f"{f}.dim", 0)
        V.int_(ch["chunks"], f"{f}.chunks", 2)

    if "recompute" not in d:
        V.fail("recompute", "missing")
    r = d["recompute"]
    if isinstance(r, dict):
        for k, v in r.items():
            V.str_(v, f"recompute.{k}", RECOMPUTE)
    else:
        V.str_(r, "recompute", RECOMPUTE)

    pr = V.dict_(d, "predicted", "predicted")
    V.keys(pr, PREDICTED_KEYS, "predicted", required=PREDICTED_KEYS[:-1])
    V.num(pr["step_time_s"], "predicted.step_time_s", 0)
    V.int_(pr["peak_memory_bytes"], "predicted.peak_memory_bytes", 0)
    V.int_(pr["comm_bytes"], "predicted.comm_bytes", 0)
    V.num(pr["bubble_fraction"], "predicted.bubble_fraction", 0)
    V.num(pr["tflops_per_device"], "predicted.tflops_per_device", 0)
    V.num(pr["mfu"], "predicted.mfu", 0)
    if "breakdown" in pr:
        V.dict_(pr, "breakdown", "predicted.breakdown")
    else:
        pr["breakdown"] = {}

    s = V.dict_(d, "search", "search")
    V.keys(s, SEARCH_KEYS, "search", required=SEARCH_KEYS[:-1])
    V.num(s["seconds"], "search.seconds", 0, nullable=True)
    V.bool_(s["folded"], "search.folded")
    V.int_(s["unique_blocks"], "search.unique_blocks", 0)
    V.int_(s["ilp_variables"], "search.ilp_variables", 0)
    V.str_(s["solver_status"], "search.solver_status")
    if "candidates" in s:
        V.int_(s["candidates"], "search.candidates", 0)
    else:
        s["candidates"] = 0

    alts = d.setdefault("alternatives", [])
    V.list_(alts, "alternatives")
    for i, a in enumerate(alts):
        f = f"alternatives[{i}]"
        if not isinstance(a, dict):
            V.fail(f, f"expected an object, got {_type_name(a)}")
        if "degrees" in a:
            V.dict_(a, "degrees", f"{f}.degrees")
            for k, v in a["degrees"].items():
                V.int_(v, f"{f}.degrees.{k}", 0)
        for k in ("zero", "microbatch_size"):
            if k in a and a[k] is not None:
                V.int_(a[k], f"{f}.{k}", 0)
        for k in ("step_time_s", "peak_memory_bytes"):
            if k in a and a[k] is not None:
                V.num(a[k], f"{f}.{k}", 0)
        if "feasible" in a:
            V.bool_(a["feasible"], f"{f}.feasible")
        if "why" in a:
            V.str_(a["why"], f"{f}.why")

    w = d.setdefault("warnings", [])
    V.list_(w, "warnings")
    for i, x in enumerate(w):
        V.str_(x, f"warnings[{i}]")
    if "range" in d:
        _validate_range(d["range"])
    return d


def _obj(v: Any, keys: tuple[str, ...], field: str) -> dict:
    """``v`` must be an object with exactly ``keys``."""
    if not isinstance(v, dict):
        _V.fail(field, f"expected an object, got {_type_name(v)}")
    _V.keys(v, keys, field)
    extra = sorted(k for k in v if k not in keys)
    if extra:
        _V.fail(f"{field}.{extra[0]}", f"unknown key (known: {', '.join(keys)})")
    return v


def _expr(v: Any, symbol: str, field: str) -> str:
    """An expression string in ``symbol``: whitelisted characters and length only (never evaluated)."""
    _V.str_(v, field)
    if len(v) > MAX_EXPR:
        _V.fail(field, f"expression longer than {MAX_EXPR} characters ({len(v)})")
    bad = sorted(set(v) - _EXPR_CHARS - {symbol})
    if bad:
        _V.fail(field, f"character {bad[0]!r} not allowed in an expression in {symbol} "
                       f"(digits, {symbol}, e, E, '.', '+', '-', '*', '/', '(', ')', spaces)")
    return v


def _validate_piece_plan(p: Any, field: str) -> dict:
    """A piece's plan: a complete plan without ``range``/``case``; errors name the field under ``field``."""
    for k in ("range", "case"):
        if isinstance(p, dict) and k in p:
            _V.fail(f"{field}.{k}", "a piece's plan must not have its own range or case")
    try:
        return _validate(p)
    except BadInput as e:
        msg = str(e)
        raise BadInput(msg.replace("plan field '", f"plan field '{field}.", 1) if msg.startswith("plan field '")
                       else f"plan field '{field}': {msg.removeprefix('plan: ')}") from None


def _validate_range(r: Any) -> None:
    """``range``: pieces tiling [lo, hi], one breakpoint per boundary, samples sorted inside [lo, hi].

    Normalises each piece's plan in place (defaults filled like the top level).
    """
    V = _V
    _obj(r, RANGE_KEYS, "range")
    sym = V.str_(r["symbol"], "range.symbol", tuple(RANGE_SYMBOLS))
    lo = V.int_(r["lo"], "range.lo", 1)
    hi = V.int_(r["hi"], "range.hi", lo)
    step = V.int_(r["step"], "range.step", 1)
    if not V.num(r["memory_limit_bytes"], "range.memory_limit_bytes", 0) > 0:
        V.fail("range.memory_limit_bytes", "must be > 0")
    if (hi - lo) % step:
        V.fail("range.step", f"{step} does not divide hi - lo = {hi - lo} (the values planned are lo + k * step)")
    pieces = V.list_(r["pieces"], "range.pieces")
    if not pieces:
        V.fail("range.pieces", "must not be empty")
    nxt = lo
    for i, pc in enumerate(pieces):
        f = f"range.pieces[{i}]"
        _obj(pc, PIECE_KEYS, f)
        if V.int_(pc["lo"], f"{f}.lo") != nxt:
            V.fail(f"{f}.lo", f"must be {nxt} ({f'range.pieces[{i - 1}].hi + 1' if i else 'range.lo'}), "
                              f"got {pc['lo']} (pieces must be contiguous and sorted)")
        if (pc["lo"] - lo) % step:
            V.fail(f"{f}.lo", f"{pc['lo']} is not on the grid lo + k * step ({lo} + k * {step})")
        nxt = V.int_(pc["hi"], f"{f}.hi", pc["lo"], hi) + 1
        reason = V.str_(pc["infeasible"], f"{f}.infeasible")
        exprs = [_expr(pc[k], sym, f"{f}.{k}") for k in ("step_time_s", "peak_memory_bytes")]
        if pc["plan"] is None:
            if not reason:
                V.fail(f"{f}.infeasible", "must give the reason when plan is null")
            if any(exprs):
                V.fail(f"{f}.{'step_time_s' if exprs[0] else 'peak_memory_bytes'}", 'must be "" when plan is null')
            continue
        if reason:
            V.fail(f"{f}.infeasible", 'must be "" when plan is not null')
        pc["plan"] = _validate_piece_plan(pc["plan"], f"{f}.plan")
        key = RANGE_SYMBOLS[sym][0]
        if pc["plan"][key] != pc["lo"]:
            V.fail(f"{f}.plan.{key}", f"{pc['plan'][key]} != the piece's lo {pc['lo']} (its plan is evaluated there)")
    if nxt != hi + 1:
        V.fail(f"range.pieces[{len(pieces) - 1}].hi", f"must be range.hi {hi}, got {nxt - 1}")

    bps = V.list_(r["breakpoints"], "range.breakpoints")
    if len(bps) != len(pieces) - 1:
        V.fail("range.breakpoints", f"{len(bps)} breakpoints for {len(pieces)} pieces (expected {len(pieces) - 1})")
    for i, b in enumerate(bps):
        f = f"range.breakpoints[{i}]"
        _obj(b, BREAK_KEYS, f)
        if V.int_(b["at"], f"{f}.at") != pieces[i + 1]["lo"]:
            V.fail(f"{f}.at", f"must be range.pieces[{i + 1}].lo {pieces[i + 1]['lo']}, got {b['at']}")
        V.str_(b["cause"], f"{f}.cause", RANGE_CAUSES)
        for side in ("left", "right"):
            sd = _obj(b[side], SIDE_KEYS, f"{f}.{side}")
            V.num(sd["step_time_s"], f"{f}.{side}.step_time_s", 0, nullable=True)
            V.num(sd["peak_memory_bytes"], f"{f}.{side}.peak_memory_bytes", 0, nullable=True)
            V.bool_(sd["feasible"], f"{f}.{side}.feasible")

    prev = None
    for i, s in enumerate(V.list_(r["samples"], "range.samples")):
        f = f"range.samples[{i}]"
        _obj(s, SAMPLE_KEYS, f)
        at = V.int_(s["at"], f"{f}.at", lo, hi)
        if prev is not None and at <= prev:
            V.fail(f"{f}.at", f"{at} after {prev} (samples must be sorted by 'at', strictly increasing)")
        prev = at
        pc = pieces[V.int_(s["piece"], f"{f}.piece", 0, len(pieces) - 1)]
        if not pc["lo"] <= at <= pc["hi"]:
            V.fail(f"{f}.piece", f"piece {s['piece']} covers {pc['lo']}..{pc['hi']}, not {at}")
        for k in ("step_time_s", "peak_memory_bytes"):
            V.num(s[k], f"{f}.{k}", 0, nullable=pc["plan"] is None)
        for k in ("priced", "skipped"):  # by the bounded search there (search.range.Bounds)
            V.int_(s[k], f"{f}.{k}", 0, 10**9)


_SPEC = re.compile(r"(R|P|S\d{1,2})(,(R|P|S\d{1,2}))*")
PLACEMENT_KEYS = ("nodes", "hubs", "params")


def _validate_placements(d: dict, axes: int) -> None:
    """``placements`` (a per-op plan, ``search.opspace``): {} for a cone plan, else every node's output
    and input placements, hub and parameter placements, as strings of one entry per mesh axis."""
    V = _V
    pl = V.dict_(d, "placements", "placements", required=False)
    if not pl:
        d["placements"] = {}
        return
    V.keys(pl, PLACEMENT_KEYS, "placements")
    extra = [k for k in pl if k not in PLACEMENT_KEYS]
    if extra:
        V.fail(f"placements.{extra[0]}", "unknown key")
    deg = d["degrees"]
    if deg["pp"] > 1 or deg["sp"] > 1 or deg["zero"] or d["tensor_parallel"]:
        V.fail("placements", "a per-op plan has pp = sp = 1, ZeRO 0 and no tensor_parallel styles")

    def spec(v: Any, field: str, partial: bool) -> None:
        V.str_(v, field)
        if not _SPEC.fullmatch(v) or v.count(",") + 1 != axes or (not partial and "P" in v.split(",")):
            V.fail(field, f"expected {axes} comma-separated placements R, S<dim>"
                          f"{', P' if partial else ''} (one per mesh axis), got {v[:40]!r}")

    for key in PLACEMENT_KEYS:
        V.dict_(pl, key, f"placements.{key}")
    for name, entry in pl["nodes"].items():
        f = f"placements.nodes.{name}"
        spec(_obj(entry, ("out", "in"), f)["out"], f"{f}.out", True)
        for i, x in enumerate(V.list_(entry["in"], f"{f}.in")):
            spec(x, f"{f}.in[{i}]", False)
    for name, v in pl["params"].items():
        spec(v, f"placements.params.{name}", False)
    for name, hub in pl["hubs"].items():
        f = f"placements.hubs.{name}"
        spec(_obj(hub, ("at", "grad"), f)["at"], f"{f}.at", False)
        spec(hub["grad"], f"{f}.grad", True)


def _validate_sp(d: dict, degree: int) -> None:
    """``sequence_parallel``: {} when sp = 1, else the attention variant and every variant priced."""
    V = _V
    sp = V.dict_(d, "sequence_parallel", "sequence_parallel", required=False)
    if sp is None:
        sp = d["sequence_parallel"] = {}
    if not sp:
        if degree != 1:
            V.fail("sequence_parallel", f"missing for degrees.sp = {degree}")
        return
    V.keys(sp, SP_KEYS, "sequence_parallel")
    V.str_(sp["variant"], "sequence_parallel.variant", SP_VARIANTS)
    if V.int_(sp["degree"], "sequence_parallel.degree", 2) != degree:
        V.fail("sequence_parallel.degree", f"{sp['degree']} != degrees.sp {degree}")
    inner = V.int_(sp["inner"], "sequence_parallel.inner", 1)
    if degree % inner:
        V.fail("sequence_parallel.inner", f"{inner} does not divide the degree {degree}")
    V.str_(sp["layout"], "sequence_parallel.layout", SP_LAYOUTS)
    V.int_(sp["comm_bytes_per_step"], "sequence_parallel.comm_bytes_per_step", 0)
    V.num(sp["exposed_s_per_step"], "sequence_parallel.exposed_s_per_step", 0)
    for i, o in enumerate(V.list_(sp["options"], "sequence_parallel.options")):
        f = f"sequence_parallel.options[{i}]"
        if not isinstance(o, dict):
            V.fail(f, f"expected an object, got {_type_name(o)}")
        V.keys(o, SP_OPTION_KEYS, f)
        V.str_(o["variant"], f"{f}.variant", SP_VARIANTS)
        V.int_(o["inner"], f"{f}.inner", 1)
        V.num(o["exposed_s_per_step"], f"{f}.exposed_s_per_step", 0)
        V.int_(o["comm_bytes_per_step"], f"{f}.comm_bytes_per_step", 0)


def _validate_case(c: Any) -> None:
    """The recorded inputs: every key present; optional numbers may be null (= the planner's default)."""
    V = _V
    if not isinstance(c, dict):
        V.fail("case", f"expected an object, got {_type_name(c)}")
    V.keys(c, CASE_KEYS, "case")
    extra = sorted(k for k in c if k not in CASE_KEYS)
    if extra:
        V.fail(f"case.{extra[0]}", f"unknown key (known: {', '.join(CASE_KEYS)})")
    V.str_(c["model"], "case.model")
    V.str_(c["cluster"], "case.cluster")
    if c["devices"] is not None:
        V.int_(c["devices"], "case.devices", 1)
    for k in ("global_batch", "seq"):  # an int, or a range [lo, hi] / [lo, hi, step] (a piecewise plan)
        if isinstance(c[k], list):
            if len(c[k]) not in (2, 3):
                V.fail(f"case.{k}", f"a range is [lo, hi] or [lo, hi, step], got {len(c[k])} numbers")
            for i, v in enumerate(c[k]):
                V.int_(v, f"case.{k}[{i}]", 1)
        elif c[k] is not None:
            V.int_(c[k], f"case.{k}", 1)
    V.str_(c["dtype"], "case.dtype", ("bf16", "fp16", "fp32"))
    if c["memory_limit_gib"] is not None and not (_is_num(c["memory_limit_gib"]) and c["memory_limit_gib"] > 0):
        V.fail("case.memory_limit_gib", f"expected a number > 0 or null, got {c['memory_limit_gib']!r}")
    fix = c["fix"]
    if not isinstance(fix, dict):
        V.fail("case.fix", f"expected an object, got {_type_name(fix)}")
    for k, v in fix.items():
        if k in FIX_INT_KEYS:
            V.int_(v, f"case.fix.{k}", 0 if k == "zero" else 1, 3 if k == "zero" else None)
        elif k in FIX_CHOICE_KEYS:
            V.str_(v, f"case.fix.{k}", FIX_CHOICE_KEYS[k])
        else:
            V.fail(f"case.fix.{k}", f"unknown key (known: {', '.join(FIX_KEYS)})")


def _canonical(obj: Any, path: tuple[str, ...] = ()) -> Any:
    """Deterministic form: fixed key order for known dicts, sorted keys otherwise, floats rounded."""
    if isinstance(obj, dict):
        if path == ():
            order = [k for k in TOP_KEYS if k in obj]
        elif path in _ORDER:
            known = _ORDER[path]
            order = [k for k in known if k in obj] + sorted(k for k in obj if k not in known)
        elif len(path) == 2 and path[0] == "tensor_parallel":
            order = [k for k in TP_KEYS if k in obj]
        elif path in (("tensor_parallel",), ("placements", "nodes"), ("placements", "hubs"), ("placements", "params")):
            order = sorted(obj, key=_natural_key)
        elif len(path) == 2 and path[0] == "alternatives":
            order = [k for k in ALT_KEYS if k in obj] + sorted(k for k in obj if k not in ALT_KEYS)
        elif len(path) == 3 and path[0] == "alternatives" and path[2] == "degrees":
            order = [k for k in DEGREE_KEYS if k in obj] + sorted(k for k in obj if k not in DEGREE_KEYS)
        else:
            order = sorted(obj)
        nested = path == ("range", "pieces", "[]")  # a piece's plan is canonical like the top level
        return {k: _canonical(obj[k], () if nested and k == "plan" else path + (k,)) for k in order}
    if isinstance(obj, list):
        return [_canonical(v, path + ("[]",)) for v in obj]
    if isinstance(obj, float):
        return _round(obj)
    return obj


def _natural_key(s: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s)]


def _fmt_bytes(n: float | None) -> str:
    """Bytes in the largest binary unit that keeps the value >= 1 (B, KiB, MiB, GiB), 2 decimals."""
    if n is None:
        return "-"
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _fmt_value(key: str, v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if key.endswith("bytes") or key.endswith("_b"):
            return f"{_fmt_bytes(v)} ({v:,.0f} B)" if v >= 1024 else f"{v:,.0f} B"
        if key.endswith("_s") or key.endswith("seconds"):
            return f"{v * 1e3:.3f} ms"
    return _fmt_num(v)


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                out.extend(_flatten(v, key))
            else:
                out.append((key, v))
    return out


DECISION_KEYS = ("mesh", "degrees", "pipeline", "tensor_parallel", "megatron_sp", "placements", "chunking",
                 "recompute")
STAGE_PREDICTIONS = ("time_per_microbatch_s", "fwd_per_microbatch_s", "wgrad_per_microbatch_s", "peak_memory_bytes")


def decision(d: dict) -> dict:
    """What makes two plan dicts the same plan (what the passes read; the rest are predictions): the
    ``DECISION_KEYS`` (pipeline stages without their predicted times and memory) and the attention
    variant, degree, inner group and layout."""
    sp = d["sequence_parallel"]
    out = {k: d[k] for k in DECISION_KEYS if k != "placements"}
    out["placements"] = d.get("placements", {})   # plans written before per-op plans have none
    out["pipeline"] = {**d["pipeline"], "stages": [{k: v for k, v in st.items() if k not in STAGE_PREDICTIONS}
                                                   for st in d["pipeline"]["stages"]]}
    return {**out, "sp": {k: sp[k] for k in ("variant", "degree", "inner", "layout")} if sp else {}}


def _blocks_collapsed(fqn: str) -> str:
    """``h.3.attn.c_attn`` -> ``h.*.attn.c_attn``: block indices as *."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", fqn)


def _collapsed(params: dict[str, str]) -> dict[tuple[str, str], int]:
    """(module pattern with block indices as *, placement) -> how many parameters."""
    out: dict[tuple[str, str], int] = {}
    for fqn, spec in params.items():
        key = (_blocks_collapsed(fqn), spec)
        out[key] = out.get(key, 0) + 1
    return out


def tp_summary(tp: dict) -> list[tuple[str, str, int, int]]:
    """Collapse block indices: [(pattern, style, groups, count)], e.g. ("h.*.attn.c_attn", "colwise", 1, 3)."""
    counts: dict[tuple[str, str, int], int] = {}
    for fqn, spec in tp.items():
        pat = _blocks_collapsed(fqn)
        key = (pat, spec["style"], spec["groups"])
        counts[key] = counts.get(key, 0) + 1
    return [(p, s, g, n) for (p, s, g), n in counts.items()]


def _tp_lines(tp: dict) -> dict[str, str]:
    """pattern -> "colwise×3" (groups appended when > 1) for diffs and explain."""
    out: dict[str, list[str]] = {}
    for pat, style, groups, n in tp_summary(tp):
        txt = f"{style}×{n}" + (f" groups={groups}" if groups > 1 else "")
        out.setdefault(pat, []).append(txt)
    return {k: ", ".join(sorted(v)) for k, v in out.items()}


def _share_table(title: str, unit: str, parts: dict[str, float], total: float, fmt):
    """A rich table of ``parts`` (label -> value) with each one's share of ``total``."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    t.add_column("part")
    t.add_column(unit, justify="right")
    t.add_column("share", justify="right")
    for label, v in parts.items():
        t.add_row(label, fmt(v), f"{v / total * 100:.1f} %" if total else "-")
    return t


def split_breakdown(bd: dict) -> tuple[dict[str, float], dict[str, float], list[tuple[str, Any]]]:
    """Breakdown -> (time parts in s, memory parts in bytes, other items), keyed by readable label.

    ``time_compute_s`` -> "compute"; ``memory_params_bytes`` (or nested ``memory.params_bytes``) -> "params".
    """
    times: dict[str, float] = {}
    mems: dict[str, float] = {}
    other: list[tuple[str, Any]] = []
    for k, v in _flatten(bd):
        if not _is_num(v):
            other.append((k, v))
        elif k.endswith("_s"):
            times[_part_label(k)] = v
        elif k.endswith("_bytes"):
            mems[_part_label(k)] = v
        else:
            other.append((k, v))
    return times, mems, other


def _part_label(key: str) -> str:
    k = re.sub(r"^(time|memory)[._]", "", key)
    return re.sub(r"_(s|bytes)$", "", k).replace("_", " ")


def _fmt_part(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key.endswith("_s") and _is_num(v):
        return f"{v * 1e3:.3f} ms"
    if key.endswith("_bytes") and _is_num(v):
        return _fmt_bytes(v)
    return _fmt_num(v)


def _ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, start = [], idx[0]
    for prev, cur in zip(idx, idx[1:] + [None]):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(out)


def _split_block(fqn: str) -> tuple[str, int, str] | None:
    """"blocks.3.attn.qkv" -> ("blocks", 3, "attn.qkv") at the outermost numbered component; None if none."""
    parts = fqn.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1:])
    return None


def placements(tp: dict, templates: Any) -> list[tuple[str, str, str]]:
    """Tensor-parallel styles grouped per block range: [(template, blocks, layout)].

    ``("t0 (96×)", "blocks.0-95", "attn.proj rowwise, attn.qkv colwise(3), ...")``: blocks whose
    modules have the same styles share a row (groups in parentheses when > 1). A template's
    instances with no sharded module get a "replicated" row; modules outside numbered blocks share
    the "(outside blocks)" row.
    """
    found = [(blk[0], f"{t.get('id', '?')} ({t['instances']}×)", t["instances"])
             for t in (templates if isinstance(templates, list) else [])
             if isinstance(t, dict) and isinstance(t.get("first"), str) and _is_int(t.get("instances"))
             for blk in [_split_block(t["first"])] if blk and not blk[2]]
    containers = [c for c, _, _ in found]
    tmpl = {c: (label, n) for c, label, n in found if containers.count(c) == 1}  # container -> its one template

    def style(suffix: str, spec: dict) -> str:
        return f"{suffix + ' ' if suffix else ''}{spec['style']}" + (f"({spec['groups']})" if spec["groups"] > 1 else "")

    blocks: dict[tuple[str, int], list[str]] = {}
    outside: list[str] = []
    for fqn in sorted(tp, key=_natural_key):
        blk = _split_block(fqn)
        if blk is None:
            outside.append(style(fqn, tp[fqn]))
        else:
            blocks.setdefault(blk[:2], []).append(style(blk[2], tp[fqn]))
    groups: dict[tuple[str, str], list[int]] = {}
    for (container, i), styles in blocks.items():
        groups.setdefault((container, ", ".join(styles)), []).append(i)
    rows, sharded = [], {}
    for (container, layout), idx in sorted(groups.items(), key=lambda g: (_natural_key(g[0][0]), min(g[1]))):
        label = tmpl.get(container, ("", 0))[0]
        rows.append((label, f"{container}.{_ranges(sorted(idx))}" if container else _ranges(sorted(idx)), layout))
        sharded[container] = sharded.get(container, 0) + len(idx)
    for container, (label, n) in tmpl.items():
        if sharded.get(container, 0) < n:
            left = n - sharded.get(container, 0)
            rows.append((label, f"{left} instance{'s' if left > 1 else ''}", "replicated"))
    if outside:
        rows.append(("", "(outside blocks)", ", ".join(outside)))
    return rows


def case_command(case: dict) -> str:
    """The ``autopar plan`` command line that reproduces a recorded case."""
    args = [case["model"], "--cluster", case["cluster"]]
    for key, opt in (("devices", "--devices"), ("global_batch", "--global-batch"), ("seq", "--seq"),
                     ("memory_limit_gib", "--memory-limit")):
        v = case[key]
        if isinstance(v, list):  # a range: LO..HI[:STEP]
            args += [opt, f"{v[0]}..{v[1]}" + (f":{v[2]}" if len(v) == 3 else "")]
        elif v is not None:
            args += [opt, f"{v:g}" if isinstance(v, float) else str(v)]
    args += ["--dtype", case["dtype"]]
    if case["fix"]:
        args += ["--fix", ",".join(f"{k}={v}" for k, v in case["fix"].items())]
    return "autopar plan " + " ".join(args)


# ---------------------------------------------------------------- Plan

class Plan:
    """A validated Plan JSON v1. Construct with :meth:`from_dict` or :meth:`from_json`."""

    def __init__(self, data: dict):
        self._d = _canonical(_validate(data))

    # ------------------------------------------------------------ construction / io
    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Validate ``d`` (not modified) and build a Plan; BadInput names the bad field."""
        return cls(d)

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike | bytes) -> "Plan":
        """Parse JSON text, or read a plan file. JSON only (never pickle/eval); BadInput on anything bad.

        A ``str`` whose first non-blank character is ``{`` or ``[`` (or containing a newline) is JSON
        text; any other ``str`` or a ``Path`` is a file path.
        """
        where = "plan JSON"
        if isinstance(text_or_path, bytes):
            raw = text_or_path
        elif isinstance(text_or_path, str) and (text_or_path.lstrip()[:1] in ("{", "[") or "\n" in text_or_path
                                                 or not text_or_path.strip()):
            if len(text_or_path) > MAX_BYTES:
                raise BadInput(f"plan JSON is larger than {MAX_BYTES // 2**20} MB")
            raw = None
            text = text_or_path
        elif isinstance(text_or_path, (str, os.PathLike)):
            path = Path(text_or_path)
            where = f"plan file {str(path)!r}"
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise BadInput(f"{where}: not found") from None
            except OSError as e:
                raise BadInput(f"{where}: cannot read ({e.strerror or e})") from None
            if not path.is_file():
                raise BadInput(f"{where}: not a regular file")
            if size > MAX_BYTES:
                raise BadInput(f"{where}: {size} bytes is larger than the {MAX_BYTES // 2**20} MB limit")
            try:
                with open(path, "rb") as fh:
                    raw = fh.read(MAX_BYTES + 1)
            except OSError as e:
                raise BadInput(f"{where}: cannot read ({e.strerror or e})") from None
        else:
            raise BadInput(f"plan: expected JSON text or a path, got {type(text_or_path).__name__}")
        if raw is not None:
            if len(raw) > MAX_BYTES:
                raise BadInput(f"{where}: larger than the {MAX_BYTES // 2**20} MB limit")
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise BadInput(f"{where}: not UTF-8 JSON text (byte {e.start}); "
                               "plans are JSON files written by `autopar plan --out`") from None
        if not text.strip():
            raise BadInput(f"{where}: empty")

        def _no_const(name: str) -> Any:
            raise BadInput(f"{where}: {name} is not allowed")

        try:
            d = json.loads(text, parse_constant=_no_const)
        except json.JSONDecodeError as e:
            raise BadInput(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise BadInput(f"{where}: nesting deeper than {MAX_DEPTH} levels") from None
        except ValueError as e:  # e.g. an integer literal with more than 4300 digits
            raise BadInput(f"{where}: unreadable number ({str(e).split(':')[0]})") from None
        return cls(d)

    def to_dict(self) -> dict:
        """A deep copy of the canonical plan dict (keys in schema order, floats rounded)."""
        return copy.deepcopy(self._d)

    def to_json(self) -> str:
        """Deterministic JSON: schema key order, floats to 6 significant digits, indent 2, trailing newline."""
        return json.dumps(self._d, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self._d == other._d

    def __repr__(self) -> str:
        g = self._d["degrees"]
        return (f"Plan(model={self._d['model']['name']!r}, devices={self._d['cluster']['devices']}, "
                f"dp={g['dp']}, tp={g['tp']}, pp={g['pp']}, sp={g['sp']}, zero={g['zero']})")

    # ------------------------------------------------------------ accessors (copies)
    def _get(self, k: str) -> Any:
        return copy.deepcopy(self._d[k])

    version = property(lambda self: self._d["version"])
    model = property(lambda self: self._get("model"))
    cluster = property(lambda self: self._get("cluster"))
    global_batch = property(lambda self: self._d["global_batch"])
    seq_len = property(lambda self: self._d["seq_len"])
    dtype = property(lambda self: self._d["dtype"])
    mesh = property(lambda self: self._get("mesh"))
    degrees = property(lambda self: self._get("degrees"))
    pipeline = property(lambda self: self._get("pipeline"))
    tensor_parallel = property(lambda self: self._get("tensor_parallel"))
    sequence_parallel = property(lambda self: self._get("sequence_parallel"))
    megatron_sp = property(lambda self: self._get("megatron_sp"))
    placements = property(lambda self: self._get("placements"))
    templates = property(lambda self: self._get("templates"))
    chunking = property(lambda self: self._get("chunking"))
    recompute = property(lambda self: self._get("recompute"))
    predicted = property(lambda self: self._get("predicted"))
    search = property(lambda self: self._get("search"))
    alternatives = property(lambda self: self._get("alternatives"))
    warnings = property(lambda self: self._get("warnings"))
    range = property(lambda self: copy.deepcopy(self._d.get("range")))

    def decision(self) -> dict:
        """:func:`decision` of this plan."""
        return decision(self._d)

    def piece_for(self, value: int) -> "Plan":
        """The plan of the range piece holding ``value`` (of S or B), with its seq_len / global_batch set to it."""
        r = self._d.get("range")
        if r is None:
            raise BadInput(f"this is a point plan (seq len {self._d['seq_len']}, global batch "
                           f"{self._d['global_batch']}), it has no range; re-plan with --seq LO..HI "
                           "(or --global-batch LO..HI) for a range plan")
        sym, (key, option) = r["symbol"], RANGE_SYMBOLS[r["symbol"]]
        if not _is_int(value):
            raise BadInput(f"{sym}: expected an integer, got {_type_name(value)}")
        if not r["lo"] <= value <= r["hi"]:
            raise BadInput(f"{sym}={value} is outside this plan's range {r['lo']}..{r['hi']}; re-plan with "
                           f"{option} {min(r['lo'], value)}..{max(r['hi'], value)} covering {value}")
        pc = next(pc for pc in r["pieces"] if pc["lo"] <= value <= pc["hi"])
        if pc["plan"] is None:
            raise BadInput(f"{sym}={value}: no plan on {sym} = {pc['lo']}..{pc['hi']}: {pc['infeasible']}")
        return Plan.from_dict({**pc["plan"], key: value})

    # ------------------------------------------------------------ explain
    def explain(self) -> str:
        """Human-readable report (rich tables rendered to plain text, width 110)."""
        from rich import box
        from rich.console import Console
        from rich.table import Table

        d = self._d
        con = Console(record=True, width=110, file=io.StringIO(), color_system=None)
        m, c, g, p, pr = d["model"], d["cluster"], d["degrees"], d["pipeline"], d["predicted"]

        t = Table(title=f"autopar plan: {m['name']}", show_header=False, title_justify="left")
        t.add_column("field", style="bold")
        t.add_column("value")
        if "case" in d:
            t.add_row("inputs", case_command(d["case"]))
        t.add_row("model", f"{m['name']}  ({m['params']:,} params, {m['layers']} layers)")
        t.add_row("cluster", f"{c['name']}  ({c['devices']} devices, {c['devices_per_node']} per node)")
        t.add_row("batch", f"global batch {d['global_batch']}, seq len {d['seq_len']}, dtype {d['dtype']}")
        mesh = d["mesh"]
        t.add_row("mesh", " × ".join(f"{a}={s}" for a, s in zip(mesh["axes"], mesh["shape"])))
        t.add_row("degrees", f"dp={g['dp']}  tp={g['tp']}  pp={g['pp']}  sp={g['sp']}  zero={g['zero']}")
        t.add_row("pipeline", f"schedule {p['schedule']}, {p['microbatches']} microbatches of "
                              f"{p['microbatch_size']}, {len(p['stages'])} stages")
        if d["megatron_sp"]:
            t.add_row("megatron-sp", f"norms and residuals between tensor-parallel cones hold 1/{g['tp']} of the "
                                     "sequence (all-gather / reduce-scatter instead of all-reduce)")
        if d["sequence_parallel"]:
            sp = d["sequence_parallel"]
            how = ("DSP: frames sharded, switched to spatial tokens around temporal blocks" if sp["variant"] == "dsp"
                   else f"{_sp_name(sp['variant'], sp['inner'], sp['degree'])} attention, {sp['layout']} tokens")
            t.add_row("sequence", f"sp={sp['degree']} ({how}), "
                                  f"{sp['exposed_s_per_step'] * 1e3:.3g} ms exposed, "
                                  f"{sp['comm_bytes_per_step'] / GIB:.3g} GiB sent per step")
        r = d["recompute"]
        t.add_row("recompute", r if isinstance(r, str) else
                  ", ".join(f"{k}: {v}" for k, v in r.items()) or "none")
        if d["chunking"]:
            t.add_row("chunking", "; ".join(f"{c['scope']} ({c['kind']}) in {c['chunks']} chunks along dim {c['dim']}"
                                            for c in d["chunking"]))
        s = d["search"]
        t.add_row("search", f"solver {s['solver_status']}, folded={'yes' if s['folded'] else 'no'}, "
                            f"{s['unique_blocks']} unique blocks, {s['ilp_variables']} ILP variables, "
                            f"{s['candidates']} candidates"
                            + (f", {s['seconds']:.3g} s" if s["seconds"] is not None else ""))
        con.print(t)

        if p["stages"]:
            st = Table(title="pipeline stages", title_justify="left")
            st.add_column("stage", justify="right")
            st.add_column("assignment")
            for i, stage in enumerate(p["stages"]):
                txt = (", ".join(f"{k}={_fmt_num(v) if not isinstance(v, (list, dict)) else json.dumps(v)}"
                                 for k, v in stage.items()) if isinstance(stage, dict) else json.dumps(stage))
                st.add_row(str(i), txt[:200])
            con.print(st)

        pt = Table(title="predicted (cost model, not measured)", title_justify="left")
        pt.add_column("metric")
        pt.add_column("predicted", justify="right")
        pt.add_row("step time", f"{pr['step_time_s'] * 1e3:.3f} ms")
        pt.add_row("peak memory / device", _fmt_bytes(pr["peak_memory_bytes"]))
        pt.add_row("comm bytes / step", f"{pr['comm_bytes']:,} B ({pr['comm_bytes'] / GIB:.3f} GiB)")
        pt.add_row("bubble fraction", f"{pr['bubble_fraction'] * 100:.1f} %")
        pt.add_row("TFLOP/s / device", f"{pr['tflops_per_device']:.2f}")
        pt.add_row("MFU", f"{pr['mfu'] * 100:.1f} %")
        con.print(pt)

        times, mems, other = split_breakdown(pr["breakdown"])
        step = pr["step_time_s"]
        ct = _share_table("step time (predicted)", "time", times, step, lambda v: f"{v * 1e3:.3f} ms")
        ct.add_row("bubble", f"{pr['bubble_fraction'] * step * 1e3:.3f} ms", f"{pr['bubble_fraction'] * 100:.1f} %")
        if d["recompute"] != "none" and not any("recompute" in k for k in times):
            r = d["recompute"]
            ct.add_row(f"recompute ({r if isinstance(r, str) else _short(r, 40)})", "in compute", "")
        ct.add_row("step", f"{step * 1e3:.3f} ms", "100 %", style="bold")
        con.print(ct)
        if mems:
            peak = pr["peak_memory_bytes"]
            mt = _share_table("memory per device (predicted)", "bytes", mems, peak, _fmt_bytes)
            mt.add_row("peak", _fmt_bytes(peak), "100 %", style="bold")
            con.print(mt)
        if other:
            bt = Table(title="other predicted parts", title_justify="left")
            bt.add_column("part")
            bt.add_column("predicted", justify="right")
            for k, v in other:
                bt.add_row(k, _fmt_value(k, v))
            con.print(bt)

        if d["sequence_parallel"]:
            sp = d["sequence_parallel"]
            vt = Table(title=f"attention variants priced for sp={sp['degree']} (predicted)", title_justify="left",
                       caption="ring traffic overlaps the blockwise attention compute; all-to-alls do not",
                       caption_justify="left")
            for col in ("variant", "exposed / step", "sent / step", ""):
                vt.add_column(col, justify="left" if col in ("variant", "") else "right")
            for o in sp["options"]:
                chosen = o["variant"] == sp["variant"] and o["inner"] == sp["inner"]
                vt.add_row(_sp_name(o["variant"], o["inner"], sp["degree"]),
                           f"{o['exposed_s_per_step'] * 1e3:.3g} ms", _fmt_bytes(o["comm_bytes_per_step"]),
                           "chosen" if chosen else "")
            con.print(vt)

        rows = [] if d["placements"] else placements(d["tensor_parallel"], d["templates"])
        if d["placements"]:
            pt = Table(title="per-op placements: parameters (one entry per mesh axis " +
                             " × ".join(d["mesh"]["axes"]) + ")", title_justify="left",
                       caption="R replicated, S<d> sharded on dim d; blocks collapsed to *", caption_justify="left")
            for col in ("parameters", "placement", "count"):
                pt.add_column(col)
            for (pat, spec), n in _collapsed(d["placements"]["params"]).items():
                pt.add_row(pat, spec, str(n))
            con.print(pt)
            outs: dict[str, int] = {}
            for entry in d["placements"]["nodes"].values():
                outs[entry["out"]] = outs.get(entry["out"], 0) + 1
            con.print("op outputs by placement: " + ", ".join(f"{k} ×{v}" for k, v in
                                                             sorted(outs.items(), key=lambda kv: -kv[1])),
                      markup=False, highlight=False)
        if rows:
            tt = Table(title="placements per template", title_justify="left",
                       caption="tensor-parallel styles; unlisted modules replicated", caption_justify="left")
            for col in ("template", "blocks", "layout"):
                tt.add_column(col)
            for row in rows:
                tt.add_row(*row)
            con.print(tt)
        if d["tensor_parallel"]:
            con.print("by module pattern: " + "; ".join(f"{pat} {txt}" for pat, txt in
                                                       _tp_lines(d["tensor_parallel"]).items()),
                      markup=False, highlight=False)

        if d["alternatives"]:
            at = Table(title="alternatives (runners-up; step and memory predicted)", title_justify="left",
                       box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
            dkeys = ["dp", "tp", "pp"]
            if any(a.get("degrees", {}).get("sp", 1) != 1 for a in d["alternatives"]) or g["sp"] != 1:
                dkeys.append("sp")
            for col in ["#", *dkeys, "zero", "mbs", "recompute", "step", "peak mem", "fits"]:
                at.add_column(col, justify="left" if col in ("recompute", "fits") else "right")
            at.add_column("why")
            for i, a in enumerate(d["alternatives"]):
                ad = a.get("degrees", {})
                zero = a.get("zero", ad.get("zero"))
                st = a.get("step_time_s")
                pm = a.get("peak_memory_bytes")
                rc = a.get("recompute")
                at.add_row(str(i + 1), *(_fmt_num(ad.get(k)) for k in dkeys),
                           _fmt_num(zero), _fmt_num(a.get("microbatch_size")),
                           rc if isinstance(rc, str) else ("-" if rc is None else json.dumps(rc)),
                           "-" if st is None else f"{st * 1e3:.3f} ms",
                           _fmt_bytes(pm),
                           _fmt_num(a.get("feasible")), a.get("why", ""))
            con.print(at)

        if d["warnings"]:
            con.print("warnings:")
            for w in d["warnings"]:
                con.print(f"  - {w}", markup=False, highlight=False)
        if "range" in d:
            _print_range(con, d["range"])
        return con.export_text()

    # ------------------------------------------------------------ diff
    def diff(self, other: "Plan") -> list[str]:
        """Lines naming each decision that moved from ``self`` to ``other``, then the predicted deltas.

        Decisions: recorded inputs (``case``), degrees, mesh, schedule, microbatches, stage cuts,
        recompute, tensor-parallel placements, chunking, templates. Then step time, peak memory, comm
        bytes, bubble and each changed breakdown part, and one "also changed" line naming any other
        field that differs. Ignores ``search.seconds``; empty list when the plans are otherwise equal.
        """
        a, b = self._d, other._d
        out: list[str] = []
        ca, cb = a.get("case", {}), b.get("case", {})
        for k in CASE_KEYS:
            if ca.get(k) != cb.get(k):
                out.append(f"case.{k}: {json.dumps(ca.get(k))} -> {json.dumps(cb.get(k))}")
        for k in DEGREE_KEYS:
            if a["degrees"][k] != b["degrees"][k]:
                out.append(f"degrees.{k}: {a['degrees'][k]} -> {b['degrees'][k]}")
        if a["mesh"] != b["mesh"]:
            out.append(f"mesh: {a['mesh']['axes']}={a['mesh']['shape']} -> {b['mesh']['axes']}={b['mesh']['shape']}")
        for k in ("schedule", "microbatches", "microbatch_size"):
            if a["pipeline"][k] != b["pipeline"][k]:
                out.append(f"pipeline.{k}: {a['pipeline'][k]} -> {b['pipeline'][k]}")
        if a["pipeline"]["stages"] != b["pipeline"]["stages"]:
            out.append(f"pipeline.stages: {_stages(a['pipeline']['stages'])} -> {_stages(b['pipeline']['stages'])}")
        if a["recompute"] != b["recompute"]:
            out.append(f"recompute: {json.dumps(a['recompute'])} -> {json.dumps(b['recompute'])}")
        ta, tb = a["tensor_parallel"], b["tensor_parallel"]
        if ta != tb:
            sa, sb = _tp_lines(ta), _tp_lines(tb)
            for pat in sorted(set(sa) | set(sb), key=_natural_key):
                if sa.get(pat) != sb.get(pat):
                    out.append(f"tensor_parallel {pat}: {sa.get(pat, 'replicated')} -> {sb.get(pat, 'replicated')}")
            if not any(line.startswith("tensor_parallel") for line in out):
                changed = sorted((k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k)), key=_natural_key)
                out.append(f"tensor_parallel: {len(changed)} modules changed (e.g. {changed[0]})")
        if a["chunking"] != b["chunking"]:
            out.append(f"chunking: {_short(a['chunking'])} -> {_short(b['chunking'])}")
        if a["templates"] != b["templates"]:
            out.append(f"templates: {_short(a['templates'])} -> {_short(b['templates'])}")
        for k in ("dtype", "global_batch", "seq_len"):
            if a[k] != b[k]:
                out.append(f"{k}: {a[k]} -> {b[k]}")
        ra, rb = a.get("range"), b.get("range")
        if ra != rb:
            out.append(f"range pieces: {_range_summary(ra)} -> {_range_summary(rb)}")
        if a["model"] != b["model"]:
            out.append(f"model: {a['model']['name']} -> {b['model']['name']}")
        if a["cluster"] != b["cluster"]:
            out.append(f"cluster: {a['cluster']['name']}/{a['cluster']['devices']} -> "
                       f"{b['cluster']['name']}/{b['cluster']['devices']}")

        pa, pb = a["predicted"], b["predicted"]
        moved = bool(out)
        if pa["step_time_s"] != pb["step_time_s"] or moved:
            out.append(f"predicted step time: {pa['step_time_s'] * 1e3:.3f} ms -> {pb['step_time_s'] * 1e3:.3f} ms "
                       f"({_pct(pa['step_time_s'], pb['step_time_s'])})")
        if pa["peak_memory_bytes"] != pb["peak_memory_bytes"] or moved:
            out.append(f"predicted peak memory: {_fmt_bytes(pa['peak_memory_bytes'])} -> "
                       f"{_fmt_bytes(pb['peak_memory_bytes'])} "
                       f"({_pct(pa['peak_memory_bytes'], pb['peak_memory_bytes'])})")
        if pa["comm_bytes"] != pb["comm_bytes"]:
            out.append(f"predicted comm bytes: {pa['comm_bytes']:,} -> {pb['comm_bytes']:,} "
                       f"({_pct(pa['comm_bytes'], pb['comm_bytes'])})")
        if pa["bubble_fraction"] != pb["bubble_fraction"]:
            out.append(f"predicted bubble: {pa['bubble_fraction'] * 100:.1f} % -> {pb['bubble_fraction'] * 100:.1f} %")
        ba, bb = dict(_flatten(pa["breakdown"])), dict(_flatten(pb["breakdown"]))
        for k in sorted(set(ba) | set(bb)):
            if ba.get(k) != bb.get(k):
                out.append(f"  breakdown {_part_label(k)}: {_fmt_part(k, ba.get(k))} -> {_fmt_part(k, bb.get(k))}")
        rest = [k for k in ("tflops_per_device", "mfu") if pa[k] != pb[k]]
        rest = [f"predicted.{k}" for k in rest]
        rest += [f"search.{k}" for k in SEARCH_KEYS if k != "seconds" and a["search"][k] != b["search"][k]]
        rest += [k for k in ("alternatives", "warnings") if a[k] != b[k]]
        if rest:
            out.append(f"also changed: {', '.join(rest)}")
        return out


def _print_range(con, r: dict) -> None:
    """``explain``'s range section: each piece's plan predicted at its low end, then the breakpoints."""
    from rich import box
    from rich.table import Table

    sym = r["symbol"]
    t = Table(title=f"Range over {sym} = {r['lo']}..{r['hi']} (grid {r['step']}, memory limit {_fmt_bytes(r['memory_limit_bytes'])}/device; "
                    "each piece's plan predicted at its low end)",
              title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in (sym, "pp", "dp", "sp", "tp", "zero", "attention", "recompute", "chunks", "step", "peak mem"):
        t.add_column(col, justify="left" if col in (sym, "attention", "recompute") else "right")
    for pc in r["pieces"]:
        p = pc["plan"]
        if p is None:
            t.add_row(f"{pc['lo']}..{pc['hi']}", *["-"] * 8, "no plan fits", "")
            continue
        g, sp, rc = p["degrees"], p["sequence_parallel"], p["recompute"]
        t.add_row(f"{pc['lo']}..{pc['hi']}", *(str(g[k]) for k in ("pp", "dp", "sp", "tp", "zero")),
                  _sp_name(sp["variant"], sp["inner"], sp["degree"]) if sp else "-",
                  rc if isinstance(rc, str) else _short(rc, 30), str(len(p["chunking"])),
                  _fmt_secs(p["predicted"]["step_time_s"]), _fmt_bytes(p["predicted"]["peak_memory_bytes"]))
    con.print(t)
    for pc in r["pieces"]:
        if pc["plan"] is None:
            con.print(f"  {sym} = {pc['lo']}..{pc['hi']}: {pc['infeasible']}", markup=False, highlight=False)
    if r["breakpoints"]:
        bt = Table(title=f"breakpoints (both plans priced at {sym}: left = the lower piece's, right = the upper piece's)",
                   title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for col in (sym, "cause", "left step", "left peak", "fits", "right step", "right peak", "fits"):
            bt.add_column(col, justify="left" if col == "cause" else "right")
        for b in r["breakpoints"]:
            sides = [(_fmt_num(None) if s["step_time_s"] is None else _fmt_secs(s["step_time_s"]),
                      _fmt_bytes(s["peak_memory_bytes"]), _fmt_num(s["feasible"])) for s in (b["left"], b["right"])]
            bt.add_row(str(b["at"]), b["cause"], *sides[0], *sides[1])
        con.print(bt)


def _range_summary(r: dict | None) -> str:
    """"16..1455 dp2 | 1456..2048 dp1 sp2": each piece's interval and degrees (or "point plan")."""
    if r is None:
        return "point plan"
    def degrees(p):
        return "no plan" if p is None else " ".join(f"{k}{v}" for k, v in p["degrees"].items() if k != "zero" and v > 1) \
            or "dp1"
    return " | ".join(f"{pc['lo']}..{pc['hi']} {degrees(pc['plan'])}" for pc in r["pieces"])


def _fmt_secs(x: float) -> str:
    """Five significant digits (a breakpoint's two plans can differ in the fourth): "0.14512 ms", "1895.2 s"."""
    return f"{x * 1e3:.5g} ms" if x < 1 else f"{x:.5g} s"


def _sp_name(variant: str, inner: int, degree: int) -> str:
    """"ring", "ring2d 2x4" (inner x outer ring), "usp 2x4" (ulysses x ring)."""
    return f"{variant} {inner}x{degree // inner}" if variant in ("ring2d", "usp") else variant


def _pct(x: float, y: float) -> str:
    if x == y:
        return "+0.0%"
    if x == 0:
        return "n/a (was 0)"
    return f"{(y - x) / x * 100:+.1f}%"


def _stages(stages: list) -> str:
    """Stage cuts: "3 stages [blocks.0..blocks.5 | blocks.6..blocks.11 | -]", else compact JSON."""
    if stages and all(isinstance(st, dict) and "blocks" in st for st in stages):
        return _cut(f"{len(stages)} stages [" + " | ".join(str(st["blocks"] or "-") for st in stages) + "]")
    return f"{len(stages)} stages {_short(stages, 60)}"


def _short(v: Any, n: int = 100) -> str:
    """Compact JSON, cut to ``n`` characters."""
    return _cut(json.dumps(v, separators=(",", ":")), n)


def _cut(text: str, n: int = 100) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."
