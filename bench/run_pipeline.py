"""Benchmark: step time and idle (bubble) fraction of every pipeline schedule on 4 CPU ranks (gloo).

    .venv/bin/python bench/run_pipeline.py        # ~2 minutes here; writes bench/results/pipeline.json

Model: examples.gpt.GPT(vocab=2048, seq=128, hidden=256, layers=8, heads=8), global batch 16 in 8
microbatches of 2. Single-stage schedules cut it into 4 stages of 2 blocks, multi-stage ones into 8
stages of 1 block (v=2); the first stage also holds the embeddings, the last the LM head.
Per schedule: 2 warm-up steps, then 5 timed steps (barrier, ``runner.step``, max over ranks; median
over steps); the schedules take turns step by step, so load from other processes hits them alike.
Idle = time a rank spends waiting on pipeline sends/receives (torch's
``schedules._wait_batch_p2p``, wrapped here) / its step time, averaged over ranks. "one process" is
the full-batch forward + backward on rank 0 while the other three wait in a barrier.
Ideal idle fraction (equal stages, no communication cost): (p−1)/(m+p−1) for GPipe/1F1B,
(p−1)/(v·m+p−1) interleaved; 4 ranks share 2 cores here, so waits also include time the OS ran another rank.
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.distributed import run_ranks  # noqa: E402

CFG = dict(vocab=2048, seq=128, hidden=256, layers=8, heads=8)
BATCH, MICRO, WARMUP, STEPS, WORLD = 16, 8, 2, 5, 4
SCHEDULES = [("gpipe", 4), ("1f1b", 4), ("zb-h1", 4), ("interleaved", 8), ("zero-bubble", 8), ("zbv", 8), ("wave", 8)]
RESULTS = ROOT / "bench" / "results" / "pipeline.json"


def _worker(rank, world):
    import torch
    import torch.distributed as dist
    import torch.distributed.pipelining.schedules as sched

    from examples.gpt import GPT, GPTConfig
    from passes.pipeline import split_stages
    from planner.capture import capture
    from runtime.pipeline import PipelineRunner
    from search.fold import fold

    idle = [0.0]
    wait = sched._wait_batch_p2p

    def timed_wait(work):
        t0 = time.perf_counter()
        wait(work)
        idle[0] += time.perf_counter() - t0

    sched._wait_batch_p2p = timed_wait
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG))
    g = torch.Generator().manual_seed(0)
    ids, tgt = (torch.randint(0, CFG["vocab"], (BATCH, CFG["seq"]), generator=g) for _ in range(2))
    mg = capture(copy.deepcopy(model), (ids[: BATCH // MICRO], tgt[: BATCH // MICRO]), {})
    blocks = [r.nodes[0] for r in fold(mg).regions if r.template is not None]
    steps = {"one process": lambda: model(ids, tgt).backward() if rank == 0 else None}
    for name, num in SCHEDULES:
        per = CFG["layers"] // num
        steps[name] = PipelineRunner(split_stages(mg.gm, blocks[per::per]), name, MICRO).step
    out = {name: {"times": [], "idle": []} for name in steps}
    for step in range(WARMUP + STEPS):  # schedules take turns, so load from other processes hits all alike
        for name, run in steps.items():
            dist.barrier()
            idle[0], t0 = 0.0, time.perf_counter()
            loss = run(ids, tgt) if name != "one process" else run()
            dt = time.perf_counter() - t0
            if step >= WARMUP:
                out[name]["times"].append(dt)
                out[name]["idle"].append(idle[0])
            if loss is not None:
                out[name]["loss"] = loss.item()
            for p in [*mg.gm.parameters(), *model.parameters()]:
                p.grad = None
    return out


def main() -> None:
    per_rank = run_ranks(_worker, WORLD, timeout=600)
    one = statistics.median(per_rank[0]["one process"]["times"])
    rows = []
    for name, num in SCHEDULES:
        v = num // WORLD
        step = statistics.median(max(r[name]["times"][i] for r in per_rank) for i in range(STEPS))
        idle = statistics.mean(sum(r[name]["idle"]) / sum(r[name]["times"]) for r in per_rank)
        ideal = (WORLD - 1) / (v * MICRO + WORLD - 1) if name in ("gpipe", "1f1b", "interleaved", "wave") else None
        rows.append({"schedule": name, "stages": num, "v": v, "step_s": round(step, 4), "idle_fraction": round(idle, 3),
                     "ideal_idle_fraction": None if ideal is None else round(ideal, 3),
                     "speedup_vs_one_process": round(one / step, 2), "loss": per_rank[0][name]["loss"]})
    res = {"model": CFG, "global_batch": BATCH, "microbatches": MICRO, "world": WORLD, "steps": STEPS,
           "one_process_step_s": round(one, 4), "schedules": rows}
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(f"GPT {CFG}, batch {BATCH} in {MICRO} microbatches, {WORLD} gloo ranks on this machine; "
          f"one process: {one * 1e3:.0f} ms/step")
    print(f"{'schedule':<12}{'stages':>7}{'step ms':>9}{'idle':>7}{'ideal':>7}{'speedup':>9}")
    for r in rows:
        ideal = "-" if r["ideal_idle_fraction"] is None else f"{r['ideal_idle_fraction']:.2f}"
        print(f"{r['schedule']:<12}{r['stages']:>7}{r['step_s'] * 1e3:>9.0f}{r['idle_fraction']:>7.2f}{ideal:>7}"
              f"{r['speedup_vs_one_process']:>9.2f}")


if __name__ == "__main__":
    main()
