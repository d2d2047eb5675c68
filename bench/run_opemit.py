"""Per-op plans on real gloo ranks: bytes DTensor's collectives send per step vs the plan's prediction.

    .venv/bin/python bench/run_opemit.py     # writes bench/results/opemit.json, prints a table

The plans of tests/test_placements_emit.py (a100-80g profile, a memory limit of 60 % of the free plan's
peak, fp32; 2 × 2 on 4 ranks, 1 × 2 and 2 × 1 on 2 ranks). One forward + backward per case under
``runtime.placements.CountCollectives``, which counts every functional collective DTensor issues
(forward, backward and the gradient placement after accumulation) with the ring bytes the cost model
prices. MEASURED: bytes one rank sends (rank 0; every rank sends the same); PREDICTED: the plan's
``predicted.comm_bytes``. The forward placements are checked to be the planned ones (tests); the
backward's are DTensor's own choices, which is what this bench compares.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.distributed import run_ranks  # noqa: E402
from tests.test_placements_emit import CASES_2, CASES_4, _build, _plan  # noqa: E402


def _measure(rank, world, cases):
    from planner.api import auto_parallelize
    from planner.plan import Plan
    from runtime.collectives import comm_stats
    from runtime.placements import CountCollectives
    from tests.distributed import loss_of

    out = {}
    for spec, mesh, plan in cases:
        model, args, kwargs = _build(spec)
        dmodel = auto_parallelize(model, (args, kwargs), plan=Plan.from_json(plan))
        comm_stats.reset()
        with CountCollectives():
            loss_of(dmodel(*args, **kwargs)).backward()
        out[f"{spec}|{mesh}"] = {"sent": comm_stats.snapshot(), "predicted": dmodel.plan.predicted["comm_bytes"]}
    return out


def main() -> int:
    rows = {}
    for world, cases in ((4, CASES_4), (2, CASES_2)):
        planned = [(spec, mesh, _plan(spec, mesh)) for spec, mesh in cases]
        rows.update(run_ranks(_measure, world, planned, timeout=900)[0])
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "opemit.json").write_text(json.dumps(rows, indent=2))
    t = Table(title="per-op plans on gloo: bytes sent per step, measured (DTensor collectives) vs predicted")
    for col in ("case", "measured B", "predicted B", "measured / predicted", "collectives (calls)"):
        t.add_column(col, justify="left" if col in ("case", "collectives (calls)") else "right")
    for key, r in rows.items():
        sent = sum(v["bytes"] for v in r["sent"].values())
        calls = ", ".join(f"{k} {v['calls']}" for k, v in r["sent"].items() if not k.startswith("other:"))
        name = key.split("|")[0].split(":")[0] + ("-" + key.split("|")[0].split(":")[1] if key.startswith("hf:") else "")
        t.add_row(f"{name} {key.split('|')[1]}", f"{sent:,}", f"{r['predicted']:,}", f"{sent / r['predicted']:.2f}",
                  calls)
    Console(width=150).print(t)
    print(f"written {out / 'opemit.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
