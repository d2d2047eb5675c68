"""Benchmark: sequence parallelism — measured attention variants on 4 CPU ranks, and predicted long-context plans.

    .venv/bin/python bench/run_sp.py [--quick]      # writes bench/results/sp.json, prints two rich tables

Part 1, MEASURED (one ``tests.distributed.run_ranks`` launch of 4 gloo ranks): a Llama-style decoder
(the zoo's ``llama-tiny`` config widened, see ``CFG``), fp32, one global batch of ``BATCH`` × ``SEQ``
tokens. Plans come from ``make_plan`` on the ``cpu`` cluster profile for 4 ranks with every degree
pinned (ulysses sp=4, ring sp=4 zig-zag, ring2d 2×2, usp 2×2, ring sp=2 × tp=2) and are emitted with
``auto_parallelize(plan=...)``. A step is zero_grad + forward + backward (no optimizer step, so every
step's loss equals the single-process loss). The variants and the single-process baseline take turns step
by step (2 warm-up rounds, then ``STEPS`` timed ones), so a change in machine load hits all alike. Per
variant: median over steps of (max over ranks of the step's wall time) vs ``predicted.step_time_s``, and
the bytes ``runtime.collectives.comm_stats`` counts for the kinds only the attention kernels issue here
("all_to_all" and "p2p") per step per rank vs ``sequence_parallel.comm_bytes_per_step``.

Part 2, PREDICTED (cost model only, no ranks): ``make_plan_from_spec("llama2-7b", cluster="h100-80g",
devices=64, seq_len=S, global_batch=max(1, 4194304 // S))`` for S from 2K to 1M tokens (about 4M tokens
per step): the planner's free choice of mesh, attention variant, ZeRO and recompute.

``--quick``: 1 warm-up round, 3 timed steps, and no 1M-token point. See bench/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.distributed import run_ranks  # noqa: E402

WORLD = 4
# The zoo's llama-tiny (RMSNorm, RoPE, SwiGLU) widened so attention is a large share of the work. SEQ = 4 ×
# search.seqpar.MIN_TOKENS: sp=4 keeps the 512 tokens per rank below which the planner itself stops offering
# sequence parallelism. kv_heads = heads as in llama2-7b (the zoo Llama repeats k/v to all heads before
# attention anyway, so GQA would not change what the kernels send; and at batch 1 a GQA Llama loses its
# attention tp cone to search.placement._view_rule, see bench/README.md).
CFG = dict(vocab=2048, seq=2048, hidden=256, layers=4, heads=8, kv_heads=8, ffn=688)
BATCH, SEQ, SEED = 1, 2048, 0
SP_KINDS = ("all_to_all", "p2p")  # only the sequence-parallel attention kernels issue these in this benchmark
BYTES_TOL = 0.01
LOSS_TOL = 1e-5
PINNED = {"zero": 0, "microbatches": 1, "recompute": "none"}
VARIANTS = [  # (name, fix)
    ("ulysses sp=4", {"dp": 1, "tp": 1, "sp": 4, "attention": "ulysses"}),
    ("ring sp=4 (zigzag)", {"dp": 1, "tp": 1, "sp": 4, "attention": "ring"}),
    ("ring2d 2x2", {"dp": 1, "tp": 1, "sp": 4, "attention": "ring2d"}),
    ("usp 2x2", {"dp": 1, "tp": 1, "sp": 4, "attention": "usp"}),
    ("ring sp=2 x tp=2", {"dp": 1, "tp": 2, "sp": 2, "attention": "ring"}),
]
BASELINES = ("one process, 1 thread", f"one process, {os.cpu_count()} threads")
PRED_MODEL, PRED_CLUSTER, PRED_DEVICES, TOKEN_BUDGET = "llama2-7b", "h100-80g", 64, 4194304
PRED_SEQS = [2048, 8192, 32768, 131072, 524288, 1048576]
RESULTS = ROOT / "bench" / "results" / "sp.json"


# --------------------------------------------------------------------------------------------- model
def build(device: str):
    """(model, (ids, targets)) as ``examples.zoo.build`` makes them, for the widened llama-tiny config."""
    import torch

    from examples import zoo
    from examples.llama import Llama

    cfg = dataclasses.replace(zoo.get("llama-tiny").config, **CFG)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = Llama(cfg)
    if device == "meta":
        ids = torch.empty(BATCH, SEQ, dtype=torch.long, device="meta")
        return model, (ids, ids.clone())
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, cfg.vocab, (BATCH, SEQ), generator=g)
    tgt = torch.randint(0, cfg.vocab, (BATCH, SEQ), generator=g)
    return model, (ids, tgt)


# --------------------------------------------------------------------------------------------- part 1: ranks
def _diff(after: dict, before: dict) -> dict:
    return {k: {"calls": v["calls"] - before.get(k, {}).get("calls", 0),
                "bytes": v["bytes"] - before.get(k, {}).get("bytes", 0)}
            for k, v in after.items() if v["bytes"] != before.get(k, {}).get("bytes", 0)}


def _worker(rank, world, plans_json, warmup, steps):
    import torch
    import torch.distributed as dist

    from planner.api import auto_parallelize
    from planner.plan import Plan
    from runtime.collectives import comm_stats

    ref, (ids, tgt) = build("cpu")
    ref.train()
    runs = {}
    emit_s = {}
    for name, text in plans_json.items():
        model, _ = build("cpu")
        model.train()
        t0 = time.perf_counter()
        runs[name] = auto_parallelize(model, ((ids, tgt), {}), plan=Plan.from_json(text))
        emit_s[name] = time.perf_counter() - t0
    threads = {BASELINES[0]: 1, BASELINES[1]: os.cpu_count() or 1}
    out = {name: {"times": [], "losses": [], "comm": []} for name in [*BASELINES, *runs]}
    for step in range(warmup + steps):  # everything takes turns, so load from other processes hits all alike
        for name in out:
            dist.barrier()  # raw dist: not counted by comm_stats
            if name in threads:  # the plain model on rank 0 while the other ranks wait in the next barrier
                if rank != 0:
                    continue
                torch.set_num_threads(threads[name])
                t0 = time.perf_counter()
                ref.zero_grad(set_to_none=True)
                loss = ref(ids, tgt)
                loss.backward()
                dt = time.perf_counter() - t0
                torch.set_num_threads(1)
                before = after = {}
            else:
                m = runs[name]
                before = comm_stats.snapshot()
                t0 = time.perf_counter()
                m.zero_grad(set_to_none=True)
                loss = m(ids, tgt)
                loss.backward()
                dt = time.perf_counter() - t0
                after = comm_stats.snapshot()
            out[name]["losses"].append(loss.item())
            if step >= warmup:
                out[name]["times"].append(dt)
                out[name]["comm"].append(_diff(after, before))
    dist.barrier()
    return {"emit_s": emit_s, "runs": out}


def _sp_bytes(comm_step: dict) -> int:
    return sum(comm_step.get(k, {}).get("bytes", 0) for k in SP_KINDS)


def measured(quick: bool) -> dict:
    from planner.api import load_cluster, make_plan
    from search.cluster import cpu_cache_path

    warmup, steps = (1, 3) if quick else (2, 10)
    measured_now = not cpu_cache_path(WORLD).exists()
    cluster = load_cluster("cpu", WORLD)  # measures only if this rank count's profile is missing
    plans, plan_s = {}, {}
    for name, fix in VARIANTS:
        model, args = build("meta")
        t0 = time.perf_counter()
        plans[name] = make_plan(model, (args, {}), cluster, dtype="fp32", fix={**fix, **PINNED})
        plan_s[name] = time.perf_counter() - t0
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    per_rank = run_ranks(_worker, WORLD, {n: p.to_json() for n, p in plans.items()}, warmup, steps, timeout=1800)
    launch_s = time.perf_counter() - t0
    load_after = os.getloadavg()

    r0 = per_rank[0]["runs"]
    ref_loss = r0[BASELINES[0]]["losses"][0]
    baselines = []
    for name in BASELINES:
        times = r0[name]["times"]
        baselines.append({"name": name, "measured_step_s": statistics.median(times), "step_times_s": times,
                          "loss": r0[name]["losses"][0]})
    base_1t = baselines[0]["measured_step_s"]
    rows = []
    for name, fix in VARIANTS:
        plan = plans[name]
        sp = plan.sequence_parallel
        step_max = [max(r["runs"][name]["times"][i] for r in per_rank) for i in range(steps)]
        meas = statistics.median(step_max)
        sp_bytes = [[_sp_bytes(c) for c in r["runs"][name]["comm"]] for r in per_rank]  # [rank][step]
        sp_per_rank = [statistics.mean(b) for b in sp_bytes]
        tot_per_rank = [statistics.mean(sum(v["bytes"] for v in c.values()) for c in r["runs"][name]["comm"])
                        for r in per_rank]
        kinds = {}
        for c in per_rank[0]["runs"][name]["comm"]:
            for k, v in c.items():
                kinds.setdefault(k, {"calls": 0, "bytes": 0})
                kinds[k]["calls"] += v["calls"] / steps
                kinds[k]["bytes"] += v["bytes"] / steps
        pred_sp = sp["comm_bytes_per_step"]
        ratios = [b / pred_sp for b in sp_per_rank]
        losses = [l for r in per_rank for l in r["runs"][name]["losses"]]
        loss_diff = max(abs(l - ref_loss) for l in losses)
        rows.append({
            "name": name, "fix": {**fix, **PINNED},
            "mesh": plan.mesh, "degrees": plan.degrees,
            "variant": sp["variant"], "degree": sp["degree"], "inner": sp["inner"], "layout": sp["layout"],
            "sequence_parallel": sp,
            "predicted_step_s": plan.predicted["step_time_s"],
            "predicted_breakdown_s": {k: v for k, v in plan.predicted["breakdown"].items() if k.startswith("time_")},
            "measured_step_s": meas,
            "step_times_max_over_ranks_s": step_max,
            "step_ratio": meas / plan.predicted["step_time_s"],
            "speedup_vs_one_process_1_thread": base_1t / meas,
            "predicted_sp_bytes": pred_sp,
            "measured_sp_bytes_per_rank": sp_per_rank,
            "measured_sp_bytes_per_rank_step": sp_bytes,
            "sp_bytes_ratio_per_rank": ratios,
            "sp_bytes_ratio": max(ratios, key=lambda x: abs(x - 1)),
            "sp_bytes_ok": all(abs(x - 1) <= BYTES_TOL for x in ratios),
            "predicted_total_bytes": plan.predicted["comm_bytes"],
            "measured_total_bytes_per_rank": tot_per_rank,
            "total_bytes_ratio": (max(tot_per_rank) / plan.predicted["comm_bytes"]
                                  if plan.predicted["comm_bytes"] else None),
            "measured_by_kind_rank0": kinds,
            "max_abs_loss_diff": loss_diff,
            "loss_ok": loss_diff <= LOSS_TOL,
            "plan_s": plan_s[name],
            "emit_s_rank0": per_rank[0]["emit_s"][name],
        })
    return {
        "model": {"family": "examples.llama.Llama (zoo llama-tiny, widened)", **CFG,
                  "params": sum(p.numel() for p in build("meta")[0].parameters()),
                  "tokens_per_rank_at_sp4": SEQ // 4},
        "batch": BATCH, "seq": SEQ, "dtype": "fp32", "world": WORLD, "warmup": warmup, "steps": steps,
        "step": "zero_grad + forward + backward (no optimizer step)",
        "cluster": {"profile": cluster.to_dict(), "measured_now": measured_now},
        "reference_loss": ref_loss,
        "loss_tolerance": LOSS_TOL, "bytes_tolerance": BYTES_TOL,
        "baselines": baselines,
        "variants": rows,
        "launch_s": launch_s,
        "loadavg_1_5_15": {"before": list(load_before), "after": list(load_after)},
        "cpu_count": os.cpu_count(),
    }


# --------------------------------------------------------------------------------------------- part 2: predicted
def predicted(quick: bool) -> dict:
    from planner.api import make_plan_from_spec
    from search.errors import AutoparError

    rows = []
    for s in PRED_SEQS[:-1] if quick else PRED_SEQS:
        gb = max(1, TOKEN_BUDGET // s)
        row = {"seq": s, "global_batch": gb, "tokens": s * gb}
        t0 = time.perf_counter()
        try:
            plan = make_plan_from_spec(PRED_MODEL, cluster=PRED_CLUSTER, devices=PRED_DEVICES, seq_len=s,
                                       global_batch=gb)
        except AutoparError as exc:
            row.update(feasible=False, error=f"{type(exc).__name__}: {exc}", search_s=time.perf_counter() - t0)
            rows.append(row)
            continue
        row["search_s"] = time.perf_counter() - t0
        sp, deg, pr = plan.sequence_parallel, plan.degrees, plan.predicted
        row.update(feasible=True, dp=deg["dp"], sp=deg["sp"], tp=deg["tp"], pp=deg["pp"], zero=deg["zero"],
                   recompute=plan.recompute, schedule=plan.pipeline["schedule"],
                   microbatches=plan.pipeline["microbatches"], microbatch_size=plan.pipeline["microbatch_size"],
                   attention=sp.get("variant", "none"), attention_inner=sp.get("inner"),
                   layout=sp.get("layout"), step_time_s=pr["step_time_s"], peak_memory_bytes=pr["peak_memory_bytes"],
                   mfu=pr["mfu"], sp_exposed_s=sp.get("exposed_s_per_step", 0.0),
                   sp_comm_bytes=sp.get("comm_bytes_per_step", 0),
                   sp_options={o["variant"] + (f"/{o['inner']}" if o["inner"] > 1 else ""): o["exposed_s_per_step"]
                               for o in sp.get("options", [])})
        rows.append(row)
    return {"model": PRED_MODEL, "cluster": PRED_CLUSTER, "devices": PRED_DEVICES, "dtype": "bf16",
            "token_budget": TOKEN_BUDGET, "rows": rows}


# --------------------------------------------------------------------------------------------- report
def _attn(variant: str, inner, degree) -> str:
    if variant in ("ring2d", "usp") and inner:
        return f"{variant} {inner}x{degree // inner}"
    return variant


def print_tables(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=170)
    m = res["measured"]
    mdl = m["model"]
    t = Table(title=f"MEASURED — {WORLD} gloo CPU ranks on {m['cpu_count']} cores: Llama h={mdl['hidden']} "
                    f"l={mdl['layers']} heads={mdl['heads']} kv={mdl['kv_heads']} V={mdl['vocab']} "
                    f"({mdl['params'] / 1e6:.1f}M), batch {m['batch']} × seq {m['seq']}, fp32, fwd+bwd, "
                    f"median of {m['steps']} steps (max over ranks)")
    for col in ("plan", "mesh dp/sp/tp", "layout", "pred ms", "meas ms", "meas/pred", "vs 1 proc",
                "pred sp B/rank", "meas sp B/rank", "sp B meas/pred", "all B meas/pred", "|Δloss|", "loss ok"):
        t.add_column(col, justify="right")
    for b in m["baselines"]:
        t.add_row(b["name"], "-", "-", "-", f"{b['measured_step_s'] * 1e3:.1f}", "-",
                  f"{m['baselines'][0]['measured_step_s'] / b['measured_step_s']:.2f}", "-", "-", "-", "-",
                  f"{abs(b['loss'] - m['reference_loss']):.1e}", "ref")
    for r in m["variants"]:
        d = r["degrees"]
        t.add_row(r["name"], f"{d['dp']}/{d['sp']}/{d['tp']}", r["layout"], f"{r['predicted_step_s'] * 1e3:.1f}",
                  f"{r['measured_step_s'] * 1e3:.1f}", f"{r['step_ratio']:.2f}",
                  f"{r['speedup_vs_one_process_1_thread']:.2f}", f"{r['predicted_sp_bytes']:,}",
                  f"{max(r['measured_sp_bytes_per_rank']):,.0f}", f"{r['sp_bytes_ratio']:.6f}",
                  "-" if r["total_bytes_ratio"] is None else f"{r['total_bytes_ratio']:.4f}",
                  f"{r['max_abs_loss_diff']:.1e}", "yes" if r["loss_ok"] else "NO")
    con.print(t)
    for r in m["variants"]:
        con.print(f"  [bold]{r['name']}[/]: predicted (ms) " + ", ".join(
            f"{k[5:-2]}={v * 1e3:.1f}" for k, v in r["predicted_breakdown_s"].items())
            + "; measured per step (rank 0) " + ", ".join(
            f"{k} {v['calls']:g}× {v['bytes']:,.0f} B" for k, v in r["measured_by_kind_rank0"].items()))
    la = m["loadavg_1_5_15"]
    cl = m["cluster"]
    con.print(f"  vs 1 proc = single-process 1-thread step / variant step. cpu profile for {WORLD} ranks "
              f"({'measured in this run' if cl['measured_now'] else 'cached'}). Load average before "
              f"{la['before'][0]:.2f}, after {la['after'][0]:.2f}: step times are noisy on a shared machine; "
              "bytes and losses are not.")
    bad = [r["name"] for r in m["variants"] if not r["sp_bytes_ok"]]
    con.print("  sp bytes within 1% of sequence_parallel.comm_bytes_per_step: "
              + ("ALL" if not bad else "NOT for " + ", ".join(bad))
              + "; losses within 1e-5: " + ("ALL" if all(r["loss_ok"] for r in m["variants"]) else "NOT ALL"))

    p = res["predicted"]
    t = Table(title=f"PREDICTED (cost model, no ranks) — {p['model']} on {p['devices']} × {p['cluster']}, bf16, "
                    f"~{p['token_budget'] / 2**20:.0f}M tokens per step, planner's free choice")
    for col in ("seq", "global batch", "mesh dp/sp/tp/pp", "attention", "zero", "recompute", "mb",
                "pred step s", "peak GiB/dev", "MFU", "sp exposed ms", "search s"):
        t.add_column(col, justify="right")
    for r in p["rows"]:
        if not r["feasible"]:
            t.add_row(f"{r['seq']:,}", str(r["global_batch"]), "infeasible", r["error"][:60], "", "", "", "", "", "",
                      "", f"{r['search_s']:.1f}")
            continue
        t.add_row(f"{r['seq']:,}", str(r["global_batch"]), f"{r['dp']}/{r['sp']}/{r['tp']}/{r['pp']}",
                  _attn(r["attention"], r["attention_inner"], r["sp"]), str(r["zero"]), r["recompute"],
                  f"{r['microbatches']}×{r['microbatch_size']}", f"{r['step_time_s']:.2f}",
                  f"{r['peak_memory_bytes'] / 2**30:.1f}", f"{r['mfu']:.3f}", f"{r['sp_exposed_s'] * 1e3:.1f}",
                  f"{r['search_s']:.1f}")
    con.print(t)
    con.print("  mb = microbatches × microbatch size per data-parallel replica. search s = wall time of "
              "make_plan_from_spec (capture + search).")
    con.print(f"written {RESULTS.relative_to(ROOT)} (total {res['wall_s']:.0f} s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps, no 1M-token point")
    opts = ap.parse_args()
    t0 = time.perf_counter()
    res = {"command": "bench/run_sp.py" + (" --quick" if opts.quick else ""), "quick": opts.quick}
    res["measured"] = measured(opts.quick)
    res["predicted"] = predicted(opts.quick)
    res["wall_s"] = time.perf_counter() - t0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2, sort_keys=True, default=str) + "\n")
    print_tables(res)
    return 0 if all(r["sp_bytes_ok"] and r["loss_ok"] for r in res["measured"]["variants"]) else 1


if __name__ == "__main__":
    sys.exit(main())
