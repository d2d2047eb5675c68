"""Range planning benchmark (issue 8): one piecewise plan over a sequence range vs point plans one by one.

    .venv/bin/python bench/run_range.py [--model llama2-7b] [--cluster h100-80g] [--devices 64]
                                        [--seq 2048..1048576] [--points 20]

Plans ``--model`` for ``--devices`` of ``--cluster`` (global batch = devices) over the ``--seq`` range
with ``make_plan_from_spec(seq_len=(lo, hi))`` — one symbolic capture, specialised and searched where
``search.range`` asks — then plans ``--points`` sequence lengths spread geometrically over the range
one by one (a capture and a search each, what every other planner does) and checks that each agrees
with the piece of the range plan that holds it. All times are wall seconds measured here, in one
process; plans are predictions of the cost model (no GPU is involved).

Writes ``bench/results/range.json`` and prints a table. Target: range plan < 3 point plans.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from planner.api import make_plan_from_spec  # noqa: E402
from planner.cli import _int_or_range  # noqa: E402
from planner.plan import decision  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "range.json"
def _summary(d: dict | None) -> str:
    if d is None:
        return "nothing fits"
    g, sp = d["degrees"], d["sequence_parallel"]
    parts = [f"dp{g['dp']}", f"tp{g['tp']}"] + ([f"sp{g['sp']} {sp['variant']}"] if g["sp"] > 1 else []) + \
            ([f"pp{g['pp']}"] if g["pp"] > 1 else []) + [f"zero{g['zero']}", f"mbs {d['pipeline']['microbatch_size']}"]
    if d["recompute"] != "none":
        parts.append(f"recompute {d['recompute']}")
    if d["chunking"]:
        parts.append("chunk " + ",".join(f"{c['kind']}/{c['chunks']}" for c in d["chunking"]))
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--cluster", default="h100-80g")
    ap.add_argument("--devices", type=int, default=64)
    ap.add_argument("--seq", type=_int_or_range, default=(2048, 1048576))
    ap.add_argument("--points", type=int, default=20)
    a = ap.parse_args()
    lo, hi = a.seq[0], a.seq[1]
    common = dict(cluster=a.cluster, devices=a.devices, global_batch=a.devices)

    t0 = time.perf_counter()
    plan = make_plan_from_spec(a.model, seq_len=tuple(a.seq), **common)
    range_s = time.perf_counter() - t0
    r = plan.range
    step = r["step"]

    points = sorted({min(hi, lo + round((lo * (hi / lo) ** (i / (a.points - 1)) - lo) / step) * step)
                     for i in range(a.points)})
    point_s, agree, rows = [], 0, []
    for s in points:
        t0 = time.perf_counter()
        try:
            fresh = make_plan_from_spec(a.model, seq_len=s, **common).to_dict()
        except Exception as exc:  # noqa: BLE001 - an infeasible point is a result too
            fresh = None
            why = str(exc)
        point_s.append(time.perf_counter() - t0)
        piece = next(p for p in r["pieces"] if p["lo"] <= s <= p["hi"])
        same = (fresh is None and piece["plan"] is None) or (
            fresh is not None and piece["plan"] is not None and decision(fresh) == decision(piece["plan"]))
        agree += same
        rows.append({"seq": s, "seconds": round(point_s[-1], 3), "agrees": same,
                     "point_plan": _summary(fresh) if fresh else f"nothing fits: {why[:80]}"})

    median_point = statistics.median(point_s)
    result = {
        "model": a.model, "cluster": a.cluster, "devices": a.devices, "seq": [lo, hi], "step": step,
        "range_plan_s": round(range_s, 2), "evaluations": len(r["samples"]),
        "configurations_priced": sum(x["priced"] for x in r["samples"]),
        "configurations_skipped": sum(x["skipped"] for x in r["samples"]),
        "pieces": [{"lo": p["lo"], "hi": p["hi"], "plan": _summary(p["plan"]),
                    "step_time_s_at_lo": p["plan"]["predicted"]["step_time_s"] if p["plan"] else None,
                    "step_time_s": p["step_time_s"], "peak_memory_bytes": p["peak_memory_bytes"]}
                   for p in r["pieces"]],
        "breakpoints": [{"at": b["at"], "cause": b["cause"]} for b in r["breakpoints"]],
        "point_plans": rows, "point_plan_median_s": round(median_point, 2), "point_plans_total_s": round(sum(point_s), 2),
        "range_over_median_point": round(range_s / median_point, 2), "agree": f"{agree}/{len(points)}",
        "target": "range plan < 3 point plans", "met": range_s < 3 * median_point,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    con = Console()
    t = Table(title=f"range plan: {a.model} on {a.devices} x {a.cluster}, S = {lo}..{hi} (grid {step})")
    for col in ("S", "plan (predicted)", "cause", "step s at lo"):
        t.add_column(col)
    for i, p in enumerate(result["pieces"]):
        cause = result["breakpoints"][i - 1]["cause"] if i else ""
        t.add_row(f"{p['lo']}..{p['hi']}", p["plan"], cause,
                  f"{p['step_time_s_at_lo']:.4g}" if p["step_time_s_at_lo"] is not None else "-")
    con.print(t)
    s = Table(title="cost (wall seconds, measured here)")
    for col in ("range plan", "searches", "configurations priced / skipped", f"{len(points)} point plans",
                "median point plan", "range / point", "agree", "target < 3"):
        s.add_column(col)
    s.add_row(f"{range_s:.1f}", str(result["evaluations"]),
              f"{result['configurations_priced']:,} / {result['configurations_skipped']:,}",
              f"{sum(point_s):.1f}", f"{median_point:.2f}",
              f"{result['range_over_median_point']:.1f}x", result["agree"], "met" if result["met"] else "NOT met")
    con.print(s)
    print(f"results: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
