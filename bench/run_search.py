"""Search cost: folded vs --no-fold ILP search on GPT (h=12288) of growing depth, the pipeline search
at 96 layers, a Llama-3-8B-shaped model on 64 H100s, and `autopar plan gpt3-175b` end to end.

    .venv/bin/python bench/run_search.py        # writes bench/results/search.json, prints a table

"fold" is the structural hashing of the captured graph (one pass over its nodes, like capture);
"search" is the space and the ILP over every (dp, tp, ZeRO, microbatch, recompute). Capture is
reported apart. All numbers are measured on this machine; the plans' step times
are predictions of the cost model.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.gpt import GPT, GPTConfig  # noqa: E402
from examples.llama import Llama, LlamaConfig  # noqa: E402
from planner.api import make_plan  # noqa: E402
from planner.capture import capture  # noqa: E402
from search.baseline import enumerate_candidates  # noqa: E402
from search.cluster import get_cluster  # noqa: E402
from search.fold import fold, no_fold  # noqa: E402
from search.strategy import ilp_select  # noqa: E402

DEPTHS = (12, 24, 48, 96)
DEVICES = {64: 512, 1024: 1536}  # devices -> global batch
REPEATS = 5  # searches are timed as the least of REPEATS: this 2-core machine adds up to 2x noise


def _gpt(layers: int):
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab=50257, seq=2048, hidden=12288, layers=layers, heads=96))
    ids = torch.empty(1, 2048, dtype=torch.long, device="meta")
    return model, (ids, ids)


def _search(mg, cluster, gb: int, folded: bool) -> tuple[float, float, object]:
    """Least seconds over REPEATS of folding (graph analysis, O(nodes)) and of the search proper (space
    + ILP): the code is deterministic, so the least is its cost and the rest is the machine's noise."""
    fold_s, search_s, win = [], [], None
    for _ in range(REPEATS):
        t = time.perf_counter()
        folding = fold(mg) if folded else no_fold(mg)
        t1 = time.perf_counter()
        win = enumerate_candidates(mg, cluster, global_batch=gb, dtype="bf16", select=ilp_select,
                                   folding=folding)[0]
        fold_s.append(t1 - t)
        search_s.append(time.perf_counter() - t1)
    return min(fold_s), min(search_s), win


def gpt_depths() -> list[dict]:
    rows = []
    for layers in DEPTHS:
        model, args = _gpt(layers)
        t = time.perf_counter()
        mg = capture(model, args, name=f"gpt-h12288-l{layers}")
        capture_s = time.perf_counter() - t
        templates = len(fold(mg).templates)
        for devices, gb in DEVICES.items():
            cl = get_cluster("a100-80g", devices)
            ff, fs, fwin = _search(mg, cl, gb, True)
            nf, ns, nwin = _search(mg, cl, gb, False)
            assert abs(fwin.step_time_s - nwin.step_time_s) <= 1e-9 * nwin.step_time_s, "fold changed the optimum"
            rows.append({"layers": layers, "devices": devices, "capture_s": capture_s, "templates": templates,
                         "fold_s": ff, "search_folded_s": fs, "search_nofold_s": ns,
                         "total_folded_s": ff + fs, "total_nofold_s": nf + ns,
                         "ilp_vars_folded": fwin.solver["variables"], "ilp_vars_nofold": nwin.solver["variables"],
                         "plan": f"dp{fwin.dp}×tp{fwin.tp} z{fwin.zero} mb{fwin.microbatch_size} {fwin.recompute}",
                         "predicted_step_s": fwin.step_time_s})
    return rows


def llama3_8b() -> dict:
    cfg = LlamaConfig(vocab=128256, seq=2048, hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336,
                      rope_theta=500000.0)
    with torch.device("meta"):
        model = Llama(cfg)
    ids = torch.empty(64, 2048, dtype=torch.long, device="meta")
    cl = get_cluster("h100-80g", 64)
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        plan = make_plan(model, (ids, ids), cl, global_batch=64, dtype="bf16", fix={"dp": 8, "tp": 8},
                         name="llama3-8b-shape")
        times.append(time.perf_counter() - t)
    return {"plan_s": statistics.median(times), "plan": f"dp{plan.degrees['dp']}×tp{plan.degrees['tp']}",
            "solver": plan.search["solver_status"], "predicted_step_s": plan.predicted["step_time_s"]}


def pipeline_search() -> list[dict]:
    """The pipeline search (pp pinned, every tp, schedule, microbatch and recompute) for 96 layers."""
    model, args = _gpt(96)
    mg = capture(model, args, name="gpt-h12288-l96")
    rows = []
    for devices, gb in ((1024, 1536), (4096, 4096)):
        cl = get_cluster("a100-80g", devices)
        times = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            cands = enumerate_candidates(mg, cl, global_batch=gb, dtype="bf16", select=ilp_select, folding=fold(mg),
                                         fix={"pp": 16})
            times.append(time.perf_counter() - t)
        win = cands[0]
        rows.append({"devices": devices, "search_s": statistics.median(times), "candidates": len(cands),
                     "plan": f"pp{win.pp}×dp{win.dp}×tp{win.tp} {win.schedule} m={win.microbatches} z{win.zero} "
                             f"{win.recompute}", "predicted_step_s": win.step_time_s, "bubble_s": win.bubble_s})
    return rows


def cli_175b() -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "autopar"), "plan", "gpt3-175b", "--cluster", "a100-80g", "--devices",
           "1024", "--format", "json"]
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        times.append(time.perf_counter() - t)
        if out.returncode:
            raise SystemExit(out.stderr)
    return {"wall_s": statistics.median(times), "degrees": json.loads(out.stdout)["degrees"]}


def main() -> int:
    results = {"gpt_depths": gpt_depths(), "pipeline_l96": pipeline_search(), "llama3_8b_8x8_h100": llama3_8b(),
               "cli_gpt3_175b": cli_175b()}
    rows = results["gpt_depths"]
    by = {(r["layers"], r["devices"]): r for r in rows}
    results["targets"] = {}
    for d in DEVICES:
        for what, key in (("search", "search"), ("fold + search", "total")):
            fold96, fold12 = by[(96, d)][f"{key}_folded_s"], by[(12, d)][f"{key}_folded_s"]
            results["targets"][f"{what}: folded l96 / l12 ({d} devices)"] = fold96 / fold12
            results["targets"][f"{what}: no-fold / folded at l96 ({d} devices)"] = by[(96, d)][f"{key}_nofold_s"] / fold96
    out = ROOT / "bench" / "results" / "search.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")

    table = Table(title=f"GPT h=12288 on a100-80g: search seconds (least of {REPEATS}), measured")
    for col in ("layers", "devices", "capture s", "templates", "fold s", "search folded s", "search no-fold s",
                "ILP vars fold/no-fold", "plan", "pred. step s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["layers"]), str(r["devices"]), f"{r['capture_s']:.2f}", str(r["templates"]),
                      f"{r['fold_s']:.3f}", f"{r['search_folded_s']:.3f}", f"{r['search_nofold_s']:.3f}",
                      f"{r['ilp_vars_folded']}/{r['ilp_vars_nofold']}", r["plan"], f"{r['predicted_step_s']:.3g}")
    console = Console(width=150)
    console.print(table)
    for k, v in results["targets"].items():
        console.print(f"{k}: {v:.2f}×")
    for r in results["pipeline_l96"]:
        console.print(f"pipeline search, 96 layers, {r['devices']} a100 (pp=16 pinned): {r['search_s']:.2f} s, "
                      f"{r['candidates']} candidates, winner {r['plan']}, predicted {r['predicted_step_s']:.3g} s/step")
    ll = results["llama3_8b_8x8_h100"]
    console.print(f"Llama-3-8B shape on 8×8 h100-80g: make_plan (capture + search) {ll['plan_s']:.2f} s, "
                  f"{ll['plan']}, solver {ll['solver']}")
    console.print(f"`autopar plan gpt3-175b --cluster a100-80g --devices 1024`: {results['cli_gpt3_175b']['wall_s']:.2f} s "
                  "wall (process start to exit)")
    console.print(f"results: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
