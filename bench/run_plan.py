"""Planning cost: capture time and peak RSS on the meta device, and end-to-end `autopar plan` time.

    .venv/bin/python bench/run_plan.py          # writes bench/results/plan.json, prints a table

Each case runs in a fresh subprocess so its peak RSS is its own. Numbers are measured on this machine.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
CASES = [  # (model, cluster, devices, global batch, seq)
    ("gpt2-small", "a100-80g", 8, 8, 1024),
    ("llama2-7b", "h100-80g", 64, 256, 4096),
    ("gpt3-175b", "a100-80g", 1024, 1536, 2048),
]
CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from planner.api import make_plan, load_cluster
from planner.capture import capture
from planner.models import resolve_model
model, cluster, devices, gb, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t_import = time.perf_counter()
loaded = resolve_model(model, batch=gb, seq=seq, device="meta")
t_build = time.perf_counter()
capture(loaded.model, loaded.args, loaded.kwargs, name=model)
t_capture = time.perf_counter()
plan = make_plan(loaded.model, (loaded.args, loaded.kwargs), load_cluster(cluster, devices), global_batch=gb,
                 name=model)
t_plan = time.perf_counter()
print(json.dumps({"build_s": t_build - t_import, "capture_s": t_capture - t_build,
                  "plan_s": t_plan - t_capture, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "degrees": plan.degrees, "params": plan.model["params"],
                  "predicted_step_s": plan.predicted["step_time_s"], "mfu": plan.predicted["mfu"]}))
"""


def main() -> int:
    rows = []
    for case in CASES:
        out = subprocess.run([sys.executable, "-c", CHILD, *map(str, case)], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append({"model": case[0], "cluster": case[1], "devices": case[2], "global_batch": case[3],
                     "seq": case[4], **json.loads(out.stdout.strip().splitlines()[-1])})
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "plan.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = Table(title="planning cost (measured here; plan contents are predictions)")
    for col in ("model", "devices", "capture s", "plan s (capture+search)", "peak RSS GiB", "chosen", "pred. step s", "pred. MFU"):
        table.add_column(col)
    for r in rows:
        d = r["degrees"]
        table.add_row(r["model"], str(r["devices"]), f"{r['capture_s']:.1f}", f"{r['plan_s']:.1f}",
                      f"{r['peak_rss_gib']:.2f}", f"dp={d['dp']} tp={d['tp']} zero={d['zero']}",
                      f"{r['predicted_step_s']:.3g}", f"{r['mfu']:.1%}")
    Console(width=150).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
