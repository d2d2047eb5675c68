"""Cost of `autopar check` over the golden matrix (tests/golden): one fresh process, imports included.

    .venv/bin/python bench/run_check.py         # writes bench/results/check.json, prints a table

The target is ≤ 60 s for the whole matrix on this 2-core machine (shared with other jobs, so the
numbers vary by ±30%). Per-case times are parsed from `autopar check`'s own lines.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 60.0


def _decisions(path: Path) -> str:
    d = json.loads(path.read_text())
    g, p = d["degrees"], d["pipeline"]
    deg = " ".join(f"{k}{g[k]}" for k in ("dp", "tp", "pp", "sp") if g[k] > 1)
    return (f"{deg} ZeRO-{g['zero']} {p['schedule'] + ' ' if p['schedule'] != 'none' else ''}"
            f"{p['microbatches']}×{p['microbatch_size']} recompute {d['recompute']} "
            f"({len(d['tensor_parallel'])} tp modules)")


def main() -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "planner", "check"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    wall = time.perf_counter() - start
    cases = [{"case": m[2], "status": m[1], "seconds": float(m[3])}
             for m in re.finditer(r"^(ok|CHANGED|updated)\s+(\S+) \(([\d.]+) s\)$", run.stdout, re.M)]
    result = {"cases": len(cases), "wall_s": round(wall, 1), "target_s": TARGET_S, "exit_code": run.returncode,
              "per_case": cases}
    out = ROOT / "bench" / "results" / "check.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"autopar check: {len(cases)} golden cases, {wall:.1f} s wall (target ≤ {TARGET_S:g} s), "
          f"exit {run.returncode}")
    t = Table()
    for col in ("case", "status", "seconds", "chosen (golden; microbatches×size)"):
        t.add_column(col, justify="right" if col == "seconds" else "left")
    for c in sorted(cases, key=lambda c: -c["seconds"]):
        t.add_row(c["case"], c["status"], f"{c['seconds']:.1f}", _decisions(ROOT / "tests" / "golden" / c["case"]))
    Console(width=110).print(t)
    print(f"written to {out.relative_to(ROOT)}")
    return 0 if run.returncode == 0 and wall <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
