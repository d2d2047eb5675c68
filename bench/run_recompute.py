"""Recompute benchmark: measured activation memory and step time of none / selective / full recompute vs
the planner's prediction, in one process on CPU (fp32).

    .venv/bin/python bench/run_recompute.py [--rounds 7] [--threads 1]

For each model the planner prices every recompute choice it offers on the ``cpu`` profile
(``make_plan(..., fix={"recompute": rc})``: one device, no ZeRO, one microbatch); the captured graph is
rewritten with ``passes.recompute.apply_recompute`` and measured:

* memory: ``runtime.memory.LiveBytes`` (storages aten ops create; parameters excluded), alive when the
  forward returns and the peak over the step, against the plan's predicted activation bytes;
* time: every configuration takes one step per round, in rotating order (A/B/C alternation, so load
  changes hit all alike), after one warm-up round; slowdown = median over rounds of (step / the
  no-recompute step of the same round) - 1, against the predicted step-time ratio;
* exactness: loss and every gradient equal to the unrewritten graph's.

Writes ``bench/results/recompute.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from examples.gpt import GPT, GPTConfig  # noqa: E402
from examples.llama import Llama, LlamaConfig  # noqa: E402
from passes.recompute import apply_recompute  # noqa: E402
from planner.api import load_cluster, make_plan  # noqa: E402
from planner.capture import capture  # noqa: E402
from runtime.memory import LiveBytes  # noqa: E402
from search.fold import fold  # noqa: E402
from search.recompute import block_scopes  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "recompute.json"
MiB = 2 ** 20
BATCH, SEQ = 2, 1024
MODELS = {
    "gpt-eager": (lambda: GPT(GPTConfig(vocab=8192, seq=SEQ, hidden=256, layers=4, heads=4, attention="eager")),
                  "GPT h=256, 4 layers, 4 heads, V=8192, eager attention", ("none", "selective", "full")),
    "llama": (lambda: Llama(LlamaConfig(vocab=8192, seq=SEQ, hidden=256, layers=4, heads=4, kv_heads=2, ffn=688)),
              "Llama h=256, 4 layers, 4 heads (2 kv), V=8192, fused SDPA", ("none", "full")),
}


def _step(gm, args) -> tuple[float, dict, int, int, float]:
    """(loss, gradients, bytes alive after the forward, peak bytes, seconds) of one training step."""
    for p in gm.parameters():
        p.grad = None
    t0 = time.perf_counter()
    with LiveBytes(exclude=[*gm.parameters(), *gm.buffers()]) as mem:
        loss = gm(*args)
        after_forward = mem.live
        loss.backward()
    seconds = time.perf_counter() - t0
    grads = {n: p.grad for n, p in gm.named_parameters() if p.grad is not None}
    return loss.item(), grads, after_forward, mem.peak, seconds


def _timed(gm, args) -> float:
    for p in gm.parameters():
        p.grad = None
    t0 = time.perf_counter()
    gm(*args).backward()
    return time.perf_counter() - t0


def run_model(name: str, rounds: int) -> dict:
    make, description, choices = MODELS[name]
    torch.manual_seed(0)
    model = make()
    ids = torch.randint(0, 8192, (BATCH, SEQ))
    args = (ids, ids.roll(-1, 1))
    cl = load_cluster("cpu", 1)
    mg = capture(copy.deepcopy(model), args, name=name)
    blocks = block_scopes(mg, fold(mg))
    rows, graphs = {}, {}
    for rc in choices:
        plan = make_plan(copy.deepcopy(model), (args, {}), cl, dtype="fp32",
                         fix={"recompute": rc, "zero": 0, "microbatches": 1})
        graphs[rc] = apply_recompute(copy.deepcopy(mg.gm), rc, blocks)
        loss, grads, after_forward, peak, _ = _step(graphs[rc], args)
        rows[rc] = {"predicted_activation_bytes": plan.predicted["breakdown"]["memory_activations_bytes"],
                    "predicted_step_s": plan.predicted["step_time_s"], "after_forward_bytes": after_forward,
                    "peak_bytes": peak, "loss": loss, "grads": grads}
    ref = rows["none"]
    for rc, row in rows.items():
        row["loss_equal"] = row["loss"] == ref["loss"]
        row["max_grad_diff"] = max((row["grads"][n] - g).abs().max().item() for n, g in ref["grads"].items())
    times = {rc: [] for rc in choices}
    for r in range(rounds + 1):  # round 0 warms up
        order = choices[r % len(choices):] + choices[:r % len(choices)]
        step = {rc: _timed(graphs[rc], args) for rc in order}
        if r:
            for rc in choices:
                times[rc].append(step[rc])
    for rc, row in rows.items():
        del row["grads"]
        row["step_times_s"] = times[rc]
        row["median_step_s"] = statistics.median(times[rc])
        row["slowdown"] = statistics.median(t / n - 1 for t, n in zip(times[rc], times["none"]))
        row["predicted_slowdown"] = row["predicted_step_s"] / ref["predicted_step_s"] - 1
        row["predicted_over_measured_peak"] = row["predicted_activation_bytes"] / row["peak_bytes"]
    return {"description": description, "batch": BATCH, "seq": SEQ, "params": sum(p.numel() for p in model.parameters()),
            "recompute": rows}


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"recompute, 1 process, fp32, batch {BATCH} × seq {SEQ}, {res['threads']} thread(s), "
                    f"{res['rounds']} rounds")
    for col in ("model", "recompute", "alive after fwd MiB", "peak MiB", "predicted act MiB", "pred/peak",
                "slowdown", "predicted slowdown", "exact"):
        t.add_column(col, justify="left" if col in ("model", "recompute") else "right")
    for name, m in res["models"].items():
        for rc, r in m["recompute"].items():
            t.add_row(name, rc, f"{r['after_forward_bytes'] / MiB:.1f}", f"{r['peak_bytes'] / MiB:.1f}",
                      f"{r['predicted_activation_bytes'] / MiB:.1f}", f"{r['predicted_over_measured_peak']:.2f}",
                      f"{r['slowdown'] * 100:+.1f}%", f"{r['predicted_slowdown'] * 100:+.1f}%",
                      "yes" if r["loss_equal"] and r["max_grad_diff"] == 0 else f"{r['max_grad_diff']:.2g}")
    Console(width=150).print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    res = {"command": " ".join(["bench/run_recompute.py", *sys.argv[1:]]), "threads": a.threads, "rounds": a.rounds,
           "loadavg_before": os.getloadavg(), "models": {name: run_model(name, a.rounds) for name in MODELS}}
    res["loadavg_after"], res["seconds"] = os.getloadavg(), round(time.perf_counter() - t0, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    print_table(res)
    print(f"{res['seconds']} s, load average {res['loadavg_before'][0]:.1f} -> {res['loadavg_after'][0]:.1f}; "
          f"results in {RESULTS.relative_to(ROOT)}")
    return 0 if all(r["loss_equal"] for m in res["models"].values() for r in m["recompute"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
