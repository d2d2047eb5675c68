"""Golden-plan regression (`autopar check`) and re-planning of the case a plan records.

A golden file is a plan JSON with a top-level ``case`` (the inputs that produced it). ``check``
re-plans every case in a directory and compares the canonical plan; a mismatch prints
``Plan.diff`` (the decisions that moved and the predicted deltas). Add a case with
``autopar plan ... --record-case --out tests/golden/NAME.json``; refresh all with ``autopar check --update``.
``why`` and ``memory_chart`` serve ``autopar explain``: they re-plan a recorded case with more pins;
``range_chart`` draws a range plan's predicted curve.

    autopar check                      # exit 0 all equal, 1 a plan changed, 2 a golden file is bad
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

from planner.plan import Plan
from search.errors import BadInput, Infeasible

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"


def make_case(model: str, *, cluster: str = "a100-80g", devices: int | None = None, global_batch=None,
              seq=None, dtype: str = "bf16", memory_limit_gib: float | None = None,
              fix: dict | None = None) -> dict:
    """The ``case`` object a plan records (same meaning as the ``autopar plan`` options; a range is
    recorded as the list [lo, hi] or [lo, hi, step])."""
    def value(v):
        return list(v) if isinstance(v, tuple) else v

    return {"model": model, "cluster": cluster, "devices": devices, "global_batch": value(global_batch),
            "seq": value(seq), "dtype": dtype, "memory_limit_gib": memory_limit_gib, "fix": dict(fix or {})}


def with_case(plan: Plan, case: dict) -> Plan:
    """``plan`` with ``case`` recorded (validated like the rest of the plan)."""
    d = plan.to_dict()
    d["case"] = case
    return Plan.from_dict(d)


def plan_case(case: dict, extra_fix: dict | None = None, *, fold: bool = True, search: str = "ilp") -> Plan:
    """Re-plan a recorded case, optionally with more decisions pinned; the result records its own case
    (``search``: "ops" for a per-op plan, which :func:`search_of` tells from the plan)."""
    from planner.api import make_plan_from_spec

    case = {**case, "fix": {**case["fix"], **(extra_fix or {})}}
    def value(v):  # a recorded range (JSON list) is a tuple for the planner
        return tuple(v) if isinstance(v, list) else v

    plan = make_plan_from_spec(case["model"], cluster=case["cluster"], devices=case["devices"],
                               global_batch=value(case["global_batch"]), seq_len=value(case["seq"]), dtype=case["dtype"],
                               memory_limit_gib=case["memory_limit_gib"], fix=case["fix"], fold=fold,
                               search=search)
    return with_case(plan, case)


def search_of(plan: dict) -> str:
    """The search that made a plan: "ops" when it places every op, else the default."""
    return "ops" if plan.get("placements") else "ilp"


def load_golden(directory: str | Path, *, stale_ok: bool = False) -> list[tuple[Path, Plan | dict]]:
    """Every ``*.json`` in ``directory``, validated, each with a recorded case; BadInput names the file.
    ``stale_ok`` (``check --update``): a file that is JSON with a case but no longer a valid plan (the
    plan format grew a field) comes back as its raw dict, to be re-planned from the case."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BadInput(f"golden directory {str(directory)!r}: not found")
    files = sorted(directory.glob("*.json"))
    if not files:
        raise BadInput(f"golden directory {str(directory)!r}: no *.json plans "
                       "(add one with `autopar plan ... --record-case --out DIR/NAME.json`)")
    out = []
    for f in files:
        try:
            plan = Plan.from_json(f)
        except BadInput as e:
            stale = _stale(f) if stale_ok else None
            if stale is None:
                raise BadInput(f"golden {e}" if str(f) in str(e) else f"golden file {f}: {e}") from None
            out.append((f, stale))
            continue
        if "case" not in plan.to_dict():
            raise BadInput(f"golden file {f}: no 'case' (the inputs to re-plan); "
                           "re-create it with `autopar plan ... --record-case --out FILE`")
        out.append((f, plan))
    return out


def _stale(path: Path) -> dict | None:
    """The raw dict of a golden file that holds a JSON object with a case (None otherwise)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) and isinstance(raw.get("case"), dict) else None


def _replan(raw: dict) -> tuple[str, str, float]:
    """Re-plan a golden file's case (in a worker process): ("plan", plan JSON | "infeasible" | "bad",
    message, seconds)."""
    t0 = time.perf_counter()
    search = raw.get("search")
    try:
        new = plan_case(raw["case"], fold=not (isinstance(search, dict) and search.get("folded") is False),
                        search=search_of(raw))
        return "plan", new.to_json(), time.perf_counter() - t0
    except Infeasible as e:
        return "infeasible", str(e), time.perf_counter() - t0
    except BadInput as e:
        return "bad", str(e), time.perf_counter() - t0


def check(directory: str | Path = GOLDEN_DIR, *, update: bool = False,
          echo: Callable[[str], None] = print, jobs: int | None = None) -> int:
    """Re-plan every golden case; 0 if all match (or were rewritten with ``update``), 1 otherwise.

    Cases are re-planned in ``jobs`` worker processes (default: one per core; plans are the same bytes in
    any process) and reported in file order: one line per case and, for a mismatch, the decision diff
    golden -> now.
    """
    golden = load_golden(directory, stale_ok=update)
    start = time.perf_counter()
    failed = rewritten = 0
    raws = [old if isinstance(old, dict) else old.to_dict() for _, old in golden]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(raws)))
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")))
            results = pool.map(_replan, raws)
        else:
            results = map(_replan, raws)
        for (path, old), (kind, payload, seconds) in zip(golden, results):
            if kind == "infeasible":
                failed += 1
                echo(f"FAIL     {path.name}: now infeasible: {payload}")
                continue
            if kind == "bad":
                raise BadInput(f"golden file {path}: its case no longer plans: {payload}")
            new, secs = Plan.from_json(payload), f"({seconds:.1f} s)"
            if new == old:
                echo(f"ok       {path.name} {secs}")
            elif update:
                path.write_text(new.to_json(), encoding="utf-8")
                rewritten += 1
                echo(f"updated  {path.name} {secs}")
            else:
                failed += 1
                echo(f"CHANGED  {path.name} {secs}")
                for line in old.diff(new):
                    echo(f"    {line}")
    summary = f"{len(golden)} cases, {time.perf_counter() - start:.1f} s ({jobs} processes)"
    if update:
        summary += f", {rewritten} rewritten"
    if failed:
        summary += f", {failed} failed" + ("" if update else
                                           " (if intended: `autopar check --update`, review and commit)")
    echo(summary)
    return 1 if failed else 0


def _recorded_case(plan: Plan) -> dict:
    case = plan.to_dict().get("case")
    if case is None:
        raise BadInput("this plan records no 'case' (its inputs), so it cannot be re-planned; "
                       "re-create it with `autopar plan ... --record-case --out FILE`")
    return case


def why(plan: Plan, extra_fix: dict) -> list[str]:
    """Re-plan ``plan``'s case with ``extra_fix`` pinned: the decisions that move and the predicted deltas."""
    pins = ",".join(f"{k}={v}" for k, v in extra_fix.items())
    try:
        alt = plan_case(_recorded_case(plan), extra_fix, fold=plan.search["folded"], search=search_of(plan.to_dict()))
    except Infeasible as e:
        return [f"{pins}: no plan fits: {e}"]
    lines = plan.diff(alt)
    if not lines:
        return [f"{pins}: the chosen plan already has it (same plan)"]
    a, b = plan.predicted["step_time_s"], alt.predicted["step_time_s"]
    if b > a:
        verdict = f"{pins} loses: {(b / a - 1) * 100:.1f}% slower predicted step"
    elif b < a:
        verdict = f"{pins} is {(1 - b / a) * 100:.1f}% faster: this plan is stale, re-plan it"
    else:
        verdict = f"{pins} ties on step time; the chosen plan wins on memory or the tie-break order"
    return [f"chosen -> {pins}:", *(f"  {line}" for line in lines), verdict]


def memory_chart(plan: Plan, path: str | Path, runners_up: int = 4) -> None:
    """Stacked bars of predicted memory per device for the winner and its runners-up (PNG, Agg backend).

    Runners-up are re-planned from the recorded case to get their breakdown; without a case they show
    only their recorded peak.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from planner.plan import split_breakdown

    d = plan.to_dict()
    bars = [("chosen\n" + _label(d["degrees"], d["degrees"]["zero"], d["pipeline"]["microbatch_size"],
                                 d["recompute"]), split_breakdown(d["predicted"]["breakdown"])[1])]
    for i, alt in enumerate(d["alternatives"][:runners_up]):
        label = f"#{i + 1}" + ("" if alt.get("feasible", True) else " (no fit)") + "\n" + _label(
            alt.get("degrees", {}), alt.get("zero"), alt.get("microbatch_size"), alt.get("recompute"))
        bars.append((label, _alt_memory(plan, alt)))
    parts = list(dict.fromkeys(k for _, mem in bars for k in mem))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(bars), 4.8))
    xs = range(len(bars))
    bottom = [0.0] * len(bars)
    for part in parts:
        vals = [mem.get(part, 0.0) / 2**30 for _, mem in bars]
        ax.bar(xs, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    limit = _limit_gib(d)
    if limit is not None:
        ax.axhline(limit, color="black", linestyle="--", linewidth=1, label=f"limit {limit:g} GiB")
    ax.set_xticks(list(xs), [label for label, _ in bars], fontsize=8)
    ax.set_ylabel("GiB per device (predicted)")
    ax.set_title(f"{d['model']['name']} on {d['cluster']['devices']}× {d['cluster']['name']}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path, "--memory-chart")


def _label(degrees: dict, zero, mbs, recompute) -> str:
    deg = " ".join(f"{k}{degrees[k]}" for k in ("dp", "tp", "pp", "sp") if degrees.get(k, 1) != 1) or "dp1"
    return f"{deg}\nZeRO-{zero} mbs {mbs}\nrecompute {recompute}"


def _alt_memory(plan: Plan, alt: dict) -> dict[str, float]:
    """Memory parts of a runner-up, re-planned with its decisions pinned; only the recorded peak without a case."""
    from planner.plan import split_breakdown

    total = {"total (no breakdown)": float(alt.get("peak_memory_bytes") or 0)}
    case = plan.to_dict().get("case")
    deg = alt.get("degrees", {})
    dp, tp, zero, mbs = deg.get("dp"), deg.get("tp"), alt.get("zero"), alt.get("microbatch_size")
    if case is None or not all(isinstance(v, int) and v >= 0 for v in (dp, tp, zero, mbs)) or not (dp and mbs) \
            or not isinstance(alt.get("recompute"), str):
        return total
    pins = {"dp": dp, "tp": tp, "pp": deg.get("pp", 1), "zero": zero, "recompute": alt["recompute"],
            "microbatches": max(1, plan.global_batch // dp // mbs)}
    if not alt.get("feasible", True):
        case = {**case, "memory_limit_gib": 1e9}  # price it although it does not fit
    try:
        got = plan_case(case, pins, fold=plan.search["folded"], search=search_of(plan.to_dict()))
    except (BadInput, Infeasible):
        return total
    return split_breakdown(got.predicted["breakdown"])[1]


def _limit_gib(d: dict) -> float | None:
    """The per-device memory limit: the case's, else the built-in cluster's device memory."""
    case = d.get("case") or {}
    if case.get("memory_limit_gib") is not None:
        return case["memory_limit_gib"]
    from search.cluster import builtin_names, get_cluster

    name = d["cluster"]["name"]
    return get_cluster(name).memory_bytes / 2**30 if name in builtin_names() and name != "cpu" else None


def schedule_timeline(plan: Plan, path: str | Path, microbatches: int | None = None) -> float:
    """Draw the plan's pipeline schedule (ranks × time; forward, backward and weight-gradient blocks)
    as simulated from its stages' predicted times (``search.pipeline.simulate``; at most 2·pp
    microbatches, so the picture stays readable). Returns the simulated idle fraction (pipeline
    bubble plus any imbalance between ranks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from search.pipeline import simulate

    d = plan.to_dict()
    pp, stages = d["degrees"]["pp"], d["pipeline"]["stages"]
    if pp < 2 or not stages:
        raise BadInput("--timeline: the plan is not pipelined (pp=1); plan with --fix pp=..,schedule=..")
    m = microbatches or min(d["pipeline"]["microbatches"], 2 * pp)
    times = []
    for st in stages:
        f, w = st.get("fwd_per_microbatch_s", 0.0), st.get("wgrad_per_microbatch_s", 0.0)
        times.append((f, st["time_per_microbatch_s"] - f - w, w))
    events = simulate(d["pipeline"]["schedule"], [st["rank"] for st in stages], times, m)
    span = max(e[5] for e in events)
    bubble = 1 - sum(e[5] - e[4] for e in events) / (pp * span)
    colors = {"F": "tab:blue", "B": "tab:green", "W": "tab:orange"}
    fig, ax = plt.subplots(figsize=(12, 0.5 * pp + 1.6))
    for rank, kind, chunk, mb, start, end in events:
        ax.broken_barh([(start * 1e3, (end - start) * 1e3)], (rank - 0.4, 0.8), facecolors=colors[kind],
                       edgecolor="white", linewidth=0.3)
        if (end - start) / span > 0.012:
            ax.text((start + end) / 2 * 1e3, rank, str(mb), ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(pp), [f"rank {r}" for r in range(pp)])
    ax.invert_yaxis()
    ax.set_xlabel("ms (predicted stage times)")
    ax.set_title(f"{d['pipeline']['schedule']}: {pp} ranks, {len(stages)} chunks, {m} microbatches — "
                 f"simulated idle {bubble * 100:.1f} %", fontsize=10)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()],
              labels=["forward", "backward (input grad)", "weight grad"], fontsize=8, loc="lower right")
    _save(fig, path, "--timeline")
    return bubble


def _piece_label(p: dict) -> str:
    """dp2 sp2 ulysses zero2 recompute full chunked: what tells one piece's plan from its neighbours."""
    g, sp = p["degrees"], p["sequence_parallel"]
    parts = [f"{k}{g[k]}" for k in ("pp", "dp", "sp", "tp") if g[k] != 1] or ["dp1"]
    parts += [sp["variant"]] if sp else []
    parts += [f"zero{g['zero']}"] if g["zero"] else []
    parts += [f"recompute {p['recompute']}"] if p["recompute"] != "none" else []
    return " ".join(parts + (["chunked"] if p["chunking"] else []))


def range_chart(plan: Plan, path: str | Path) -> None:
    """A range plan's predicted step time and peak memory per device across S (or B), one colour per piece.

    Two panels sharing a log x-axis, drawn from ``range.samples``; breakpoints as dashed vertical lines,
    pieces where nothing fits shaded, the memory limit the range was planned for as a horizontal line.
    PNG or SVG by the suffix of ``path``.
    """
    r = plan.range
    if r is None:
        raise BadInput("--range-chart: this is a point plan (no 'range'); re-plan with --seq LO..HI for a range plan")
    if Path(path).suffix.lower() not in (".png", ".svg"):
        raise BadInput(f"--range-chart {path}: expected a .png or .svg file name")
    if not any(s["step_time_s"] is not None for s in r["samples"]):
        raise BadInput("--range-chart: the range has no sample with a predicted step time to draw")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sym, d = r["symbol"], plan.to_dict()
    limit = r["memory_limit_bytes"]
    unit, unit_name = (2**30, "GiB") if limit >= 2**30 else (2**20, "MiB")
    fig, (ax_t, ax_m) = plt.subplots(2, 1, sharex=True, figsize=(9, 6.4))
    for i, pc in enumerate(r["pieces"]):
        span = f"{sym} {pc['lo']}..{pc['hi']}"
        if pc["plan"] is None:
            for ax in (ax_t, ax_m):
                ax.axvspan(pc["lo"], pc["hi"], color="0.9", label=f"{span}: no plan fits" if ax is ax_t else None)
            continue
        label = f"{span}: {_piece_label(pc['plan'])}"
        pts = [s for s in r["samples"] if s["piece"] == i]
        color = f"C{i % 10}"
        ax_t.plot([s["at"] for s in pts], [s["step_time_s"] for s in pts], "o-", ms=3, color=color, label=label)
        ax_m.plot([s["at"] for s in pts], [s["peak_memory_bytes"] / unit for s in pts], "o-", ms=3, color=color)
    for b in r["breakpoints"]:
        for ax in (ax_t, ax_m):
            ax.axvline(b["at"], color="grey", linestyle="--", linewidth=1)
        ax_t.text(b["at"], 0.98, f" {b['at']} ({b['cause']})", transform=ax_t.get_xaxis_transform(), rotation=90,
                  va="top", ha="right", fontsize=7)
    ax_m.axhline(limit / unit, color="black", linewidth=1, label=f"limit {limit / unit:.4g} {unit_name}")
    ax_m.legend(fontsize=8, loc="upper left")
    ax_t.set_xscale("log")
    ax_t.set_yscale("log")
    ax_t.set_ylabel("step time, s (predicted)")
    ax_m.set_ylabel(f"peak memory / device, {unit_name} (predicted)")
    ax_m.set_xlabel("S (sequence length)" if sym == "S" else "B (global batch)")
    ax_t.set_title(f"{d['model']['name']} on {d['cluster']['devices']}× {d['cluster']['name']}: "
                   f"range over {sym} = {r['lo']}..{r['hi']}", fontsize=10)
    ax_t.legend(fontsize=7, loc="upper left")
    _save(fig, path, "--range-chart")


def _save(fig, path: str | Path, option: str) -> None:
    """Write ``fig`` (PNG, or SVG by the suffix); an unwritable path is bad input naming ``option``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise BadInput(f"{option} {path}: cannot write ({e.strerror or e})") from None
    finally:
        plt.close(fig)
