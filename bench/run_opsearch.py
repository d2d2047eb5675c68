"""Per-op ILP search cost (``make_plan(search="ops")``, search/opspace.py): folded vs --no-fold on GPT of
growing depth, one dp × tp mesh per row, with and without a binding memory limit.

    .venv/bin/python bench/run_opsearch.py [--quick]   # writes bench/results/opsearch.json, prints a table

Each row captures a GPT (vocab 50257, seq 2048, h=4096, 32 heads: GPT-3 6.7B's block) of ``layers``
blocks on the meta device once, then times ``solve_ops`` (strategy enumeration, pricing, the ILP) on
an 8 × 8 mesh of a100-80g: median of 3 folded runs, one unfolded run (the unfolded ILP hits its 30 s
time limit at depth: then its status is "feasible", not "optimal", and its time is the limit).
"free": no memory limit (the ILP collapses to an exact dynamic program); "bound": halfway between the
least memory any assignment needs (each op at its leanest) and the free plan's peak, per device. Step times and memory are cost-model predictions; seconds are measured.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.gpt import GPT, GPTConfig  # noqa: E402
from planner.capture import capture  # noqa: E402
from search.cluster import get_cluster  # noqa: E402
from search.fold import fold, no_fold  # noqa: E402
from search.opspace import solve_ops  # noqa: E402

MESH = (8, 8)
BATCH = 16


def _capture(layers: int):
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab=50257, seq=2048, hidden=4096, layers=layers, heads=32))
    ids = torch.empty(BATCH, 2048, dtype=torch.long, device="meta")
    return capture(model, (ids, ids), name=f"gpt-h4096-l{layers}")


def _time(mg, folding, cl, limit, repeats: int):
    secs, sol = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        sol = solve_ops(mg, folding, MESH, cl, dtype="bf16", memory_limit=limit)
        secs.append(time.perf_counter() - t)
    return statistics.median(secs), sol


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="depths 12 and 24 only")
    depths = (12, 24) if ap.parse_args().quick else (12, 24, 48, 96)
    cl = get_cluster("a100-80g", MESH[0] * MESH[1])
    rows = []
    for layers in depths:
        mg = _capture(layers)
        free_s, free = _time(mg, fold(mg), cl, float("inf"), 3)
        lean = solve_ops(mg, fold(mg), MESH, cl, dtype="bf16", memory_limit=0.0).peak_memory   # infeasible: the leanest
        limit = (lean + free.peak_memory) / 2
        for kind, lim in (("free", float("inf")), ("bound", limit)):
            f_s, f = (free_s, free) if kind == "free" else _time(mg, fold(mg), cl, lim, 3)
            n_s, n = _time(mg, no_fold(mg), cl, lim, 1)
            rows.append({"layers": layers, "limit": kind, "folded_s": f_s, "no_fold_s": n_s,
                         "speedup": n_s / f_s, "folded_status": f.solver["status"], "no_fold_status": n.solver["status"],
                         "folded_vars": f.solver["variables"], "no_fold_vars": n.solver["variables"],
                         "folded_step_s": f.step_time_s, "no_fold_step_s": n.step_time_s,
                         "memory_gib": f.peak_memory / 2**30})
            print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "opsearch.json").write_text(json.dumps({"mesh": MESH, "batch": BATCH, "rows": rows}, indent=2))
    t = Table(title=f"per-op ILP search, GPT h=4096 on {MESH[0]}x{MESH[1]} a100-80g, batch {BATCH} x 2048 "
                    "(seconds measured; step times predicted)")
    for col in ("layers", "limit", "folded s", "no-fold s", "no-fold / folded", "status f / nf", "ILP vars f / nf",
                "step f / nf (pred)", "mem GiB"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["layers"]), r["limit"], f"{r['folded_s']:.2f}", f"{r['no_fold_s']:.2f}", f"{r['speedup']:.1f}x",
                  f"{r['folded_status']} / {r['no_fold_status']}", f"{r['folded_vars']} / {r['no_fold_vars']}",
                  f"{r['folded_step_s'] * 1e3:.1f} / {r['no_fold_step_s'] * 1e3:.1f} ms", f"{r['memory_gib']:.1f}")
    Console(width=160).print(t)
    first = {r["limit"]: r["folded_s"] for r in rows if r["layers"] == depths[0]}
    for r in rows:
        if r["layers"] == depths[-1]:
            print(f"{r['limit']}: folded {depths[-1]}/{depths[0]} layers = {r['folded_s'] / first[r['limit']]:.2f}x, "
                  f"no-fold/folded at {depths[-1]} = {r['speedup']:.1f}x")
    print(f"written {out / 'opsearch.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
