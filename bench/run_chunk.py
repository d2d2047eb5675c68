"""Benchmark: AutoChunk — measured activation memory and step time, chunked vs unchunked, and the longest
sequence that fits a memory limit, on a long-sequence GPT and an Evoformer-like pair stack.

    .venv/bin/python bench/run_chunk.py [--quick] [--threads N] [--malloc keep|default]   # writes bench/results/chunk.json, prints rich tables

One process, CPU, fp32, batch 1. Per model: capture the model (``planner.capture.capture``), take every
region ``search.chunking.chunk_regions`` finds, and apply all of them with ``passes.chunk.apply_chunking``
chunked k ways, one configuration per k in ``KS`` (plus k = 1: every region under checkpoint as one chunk,
i.e. the recompute alone, without splitting anything). Each configuration is a fresh capture of a copy of
the same model (same weights, same inputs). A step is zero_grad + forward + backward (no optimizer step).

MEASURED
* Activation peak: one step under ``ActivationBytes``, the live-storage counter of ``tests/test_chunk.py``
  (a TorchDispatchMode that adds a storage's bytes when an aten op creates it and subtracts them when its
  last tensor dies) copied here. Parameter and input storages are never counted; the storages that end up
  as parameter gradients (``p.grad``) are taken out of the timeline afterwards (they are identified at the
  end of the step, and removed from the moment they were created). What is left: saved activations,
  temporaries, recomputed chunk intermediates and activation gradients, as an allocator would see them
  minus kernel-internal scratch and fragmentation. "after fwd" is what is alive when the forward returns.
* Step time: every configuration takes turns step by step (A/B alternation, the starting configuration
  rotating each round), 1 warm-up round then 5 timed ones (``--quick``: 3); per configuration the median
  step time, and the slowdown as the median over rounds of (this configuration's step / the unchunked step
  of the same round) - 1. One thread (``--threads``): on this shared 2-core machine, other processes' load
  turns every OpenMP barrier of a 2-thread kernel into a wait, and a chunked step has k times the kernels.
  During the timed steps glibc malloc keeps freed memory (``kept_pages``; ``--malloc default`` turns that
  off): otherwise every block over 32 MiB is a fresh mmap and its pages are zeroed by the kernel on each
  step, a cost only the configurations with the largest tensors pay. Minor page faults and system CPU time
  per step are recorded either way.
* Planner's choice: ``search.chunking.select``, the greedy of the planner's ``_chunked`` (same ranking by
  predicted bytes freed per second, same chunk counts ``search.baseline.CHUNKS``, same time model on the
  ``cpu`` profile with ``kernel_launch_s`` measured at the start of the run), asked to bring the activation
  peak down to ``PLANNER_LIMIT`` = 40 % of the measured unchunked peak, i.e. to free 60 % of it (the
  issue's target). Its entries (region kinds, each with its own k) are measured like the other rows.
* Diagnostics (not in ``--quick``, not part of the verdict): one kind of region at a time, k = ``DIAG_K``.
* Loss (every step) within 1e-5 of the unchunked loss; the largest parameter-gradient difference is shown.
* Longest fit: the largest sequence (GPT) or residue count N (Evoformer) whose activation peak stays within
  ``LIMIT`` = the unchunked activation peak at the base size, unchunked and chunked with the k that had the
  lowest peak at the base size (the same entries, the same k). Search by measurement: doubling from the
  base size, then bisection on multiples of ``GRAIN``. A probe stops as soon as the live bytes exceed the
  limit by more than the parameters' bytes (so no run is allowed to grow far past it).

PREDICTED: the cost model's drop of the activation peak for the same configuration,
``search.chunking.chunk_drop`` (saved bytes freed + the fall of the largest backward transient, see
search/chunking.py), next to the measured drops (after fwd, step peak) and their ratio; for the planner's row
also the predicted extra step time (``chunk_seconds``) next to the measured one.

Target (the issue): >= 60 % activation-memory reduction at <= 15 % slowdown on at least two models.
``--quick``: 3 timed rounds, no per-kind rows and a coarser bisection grain. See bench/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import gc
import json
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from runtime.memory import LiveBytes  # noqa: E402

warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)

SEED = 0
BATCH = 1
KS = (2, 4, 8, 16)
DIAG_K = 4  # the per-kind diagnostic rows chunk one kind of region at a time this many ways
PLANNER_LIMIT = 0.40  # the planner's row: chunk until the predicted peak is this fraction of the unchunked one
LOSS_TOL = 1e-5
TARGET_REDUCTION, TARGET_SLOWDOWN = 0.60, 0.15
# name -> (zoo preset whose config is replaced, config changes, base size, size field, bisection grain (full, quick))
MODELS = {
    "gpt": ("gpt-tiny", dict(vocab=8192, hidden=256, layers=4, heads=4), 4096, "seq", (256, 1024)),
    "evoformer": ("evoformer-tiny", dict(in_channels=16, pair=32, heads=4, tri=32, blocks=2, bins=32), 256,
                  "residues", (32, 64)),
    "llama": ("llama-tiny", dict(vocab=8192, hidden=256, layers=4, heads=4, kv_heads=2, ffn=688), 4096, "seq",
              (256, 1024)),
}
RESULTS = ROOT / "bench" / "results" / "chunk.json"
MiB = 2 ** 20


# --------------------------------------------------------------------------------------------- model
def build(name: str, size: int):
    """(model, args) on the CPU: the zoo preset's config with ``MODELS[name]`` changes at ``size`` tokens
    (GPT) or residues (Evoformer), seed ``SEED``, batch ``BATCH``."""
    from examples import zoo
    from examples.evoformer import Evoformer, example_inputs
    from examples.gpt import GPT
    from examples.llama import Llama

    preset, changes, _, field, _ = MODELS[name]
    cfg = dataclasses.replace(zoo.get(preset).config, **changes, **{field: size})
    torch.manual_seed(SEED)
    if name == "evoformer":
        return Evoformer(cfg), example_inputs(cfg, BATCH, "cpu", SEED)
    model = Llama(cfg) if name == "llama" else GPT(cfg)
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, cfg.vocab, (BATCH, size), generator=g)
    tgt = torch.randint(0, cfg.vocab, (BATCH, size), generator=g)
    return model, (ids, tgt)


def describe(name: str, model) -> str:
    c = model.config
    n = sum(p.numel() for p in model.parameters()) / 1e6
    if name in ("gpt", "llama"):
        kv = f" kv={c.kv_heads} ffn={c.ffn}" if name == "llama" else ""
        return f"{name.capitalize()} h={c.hidden} l={c.layers} heads={c.heads}{kv} V={c.vocab} ({n:.1f}M)"
    return f"Evoformer c_z={c.pair} tri={c.tri} heads={c.heads} blocks={c.blocks} bins={c.bins} ({n:.2f}M)"


def entries(regions, k: int) -> list[dict]:
    return [r.entry(k) for r in regions]


def planner_choice(regions, need: float, launch_s: float) -> tuple[dict, float, float]:
    """({region or its first instances: chunks}, predicted drop, predicted extra seconds) of the planner's
    greedy asked to free ``need`` bytes, timed with the ``cpu`` profile (its ``kernel_launch_s`` replaced
    by ``launch_s``, measured now): one device runs the whole captured step, one microbatch."""
    from search.baseline import CHUNKS
    from search.chunking import chunk_seconds, select
    from planner.api import load_cluster

    cl = dataclasses.replace(load_cluster("cpu", 2), kernel_launch_s=launch_s)

    def seconds(r, k):
        return chunk_seconds(r, k, cl, "fp32", r.instances)

    chosen, drop = select(regions, need, CHUNKS, seconds)
    return chosen, drop, sum(seconds(r, k) for r, k in chosen.items())


def graph(model, args, chunking: list[dict] | None):
    """A fresh capture of a copy of ``model``, chunked as ``chunking`` says (None: unchunked)."""
    from passes.chunk import apply_chunking
    from planner.capture import capture

    gm = capture(copy.deepcopy(model), args).gm
    return apply_chunking(gm, chunking) if chunking else gm


# --------------------------------------------------------------------------------------------- memory
class Exceeded(Exception):
    pass


class ActivationBytes(LiveBytes):
    """``runtime.memory.LiveBytes`` minus ``exclude`` (parameter and input storages, by address), whose
    timeline lets the storages that become parameter gradients be taken out afterwards
    (:meth:`activation_peak`). ``abort_above``: raise :class:`Exceeded` as soon as the live bytes exceed it."""

    def __init__(self, exclude: set[int], abort_above: float | None = None):
        super().__init__()
        self.exclude = exclude
        self.abort_above = abort_above

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.abort_above is not None and self.live > self.abort_above:
            raise Exceeded(f"{self.live} live bytes > {self.abort_above:.0f}")
        return out

    def activation_peak(self, grads: set[int]) -> tuple[int, int, int]:
        """(peak bytes, the event index it is reached at, grad bytes) without the storages (alive now) at
        the addresses ``grads``."""
        skip = {self.refs[k][2] for k in grads if k in self.refs}
        grad_bytes = sum(self.refs[k][0] for k in grads if k in self.refs)
        live = peak = at = 0
        for i, (sid, delta) in enumerate(self.events):
            if sid in skip:
                continue
            live += delta
            if live > peak:
                peak, at = live, i
        return peak, at, grad_bytes


def measure_memory(gm, args, abort_above: float | None = None) -> dict:
    """One step of ``gm`` under :class:`ActivationBytes`: the activation peak, what is alive after the
    forward, where the peak is (forward / backward), and the loss. With ``abort_above``, a step whose live
    bytes pass it is stopped: {"exceeded": "forward" | "backward"}."""
    params = {p.untyped_storage().data_ptr() for p in gm.parameters()}
    inputs = {a.untyped_storage().data_ptr() for a in args}
    for p in gm.parameters():
        p.grad = None
    gc.collect()
    mode = ActivationBytes(params | inputs, abort_above)
    phase = "forward"
    t0 = time.perf_counter()
    try:
        with mode:
            loss = gm(*args)
            after_fwd, fwd_events = mode.live, len(mode.events)
            phase = "backward"
            loss.backward()
            grads = {p.grad.untyped_storage().data_ptr() for p in gm.parameters() if p.grad is not None}
            peak, at, grad_bytes = mode.activation_peak(grads)
            raw_peak = mode.peak
    except Exception as exc:  # noqa: BLE001 - the autograd engine may wrap what the mode raised
        if not isinstance(exc, Exceeded) and "live bytes >" not in str(exc):
            raise
        loss = None
        for p in gm.parameters():
            p.grad = None
        gc.collect()
        return {"exceeded": phase, "seconds": time.perf_counter() - t0}
    out = {"peak_bytes": peak, "after_forward_bytes": after_fwd, "peak_in": "forward" if at < fwd_events else "backward",
           "peak_with_grads_bytes": raw_peak, "grad_bytes": grad_bytes, "loss": loss.item(),
           "seconds": time.perf_counter() - t0}
    for p in gm.parameters():
        p.grad = None
    del loss
    gc.collect()
    return out


# --------------------------------------------------------------------------------------------- timing
@contextlib.contextmanager
def kept_pages(on: bool):
    """glibc malloc that keeps freed memory (no mmap for large blocks, no trimming), like a caching
    allocator: without it every block over 32 MiB is a fresh mmap whose pages the kernel zeroes on first
    touch, a per-step cost that falls on whichever configuration allocates the largest tensors. Restored
    (and the heap trimmed) afterwards. ``on=False``: glibc's defaults, untouched."""
    if not on:
        yield
        return
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, -1)  # -1: never trim
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, 65536)  # glibc's default
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)  # glibc's default
        libc.malloc_trim(0)


def step(gm, args) -> torch.Tensor:
    for p in gm.parameters():
        p.grad = None
    loss = gm(*args)
    loss.backward()
    return loss.detach()


def time_configs(gms: dict, args, warmup: int, steps: int, threads: int) -> dict:
    """All configurations take turns step by step (the first of a round rotates), on ``threads`` threads:
    per configuration the step times (timed rounds), the losses (all rounds), the per-round ratio to the
    unchunked step, and per timed step the minor page faults and the system CPU time of this process."""
    names = list(gms)
    out = {n: {"times": [], "losses": [], "minflt": [], "sys_s": []} for n in names}
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    for r in range(warmup + steps):
        order = names[r % len(names):] + names[:r % len(names)]
        round_t = {}
        for n in order:
            gc.collect()
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            loss = step(gms[n], args)
            round_t[n] = time.perf_counter() - t0
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            out[n]["losses"].append(loss.item())
            if r >= warmup:
                out[n]["minflt"].append(ru1.ru_minflt - ru0.ru_minflt)
                out[n]["sys_s"].append(ru1.ru_stime - ru0.ru_stime)
        if r >= warmup:
            for n in names:
                out[n]["times"].append(round_t[n])
    torch.set_num_threads(saved)
    base = out[names[0]]["times"]
    for n in names:
        out[n]["ratios"] = [t / b for t, b in zip(out[n]["times"], base)]
    return out


# --------------------------------------------------------------------------------------------- per model
def run_model(name: str, quick: bool, threads: int, keep: bool, launch_s: float) -> dict:
    from planner.capture import capture
    from search.chunking import chunk_drop, chunk_regions
    from search.fold import fold

    preset, changes, base, field, grains = MODELS[name]
    warmup, steps = (1, 3) if quick else (1, 5)
    model, args = build(name, base)
    t0 = time.perf_counter()
    mg = capture(copy.deepcopy(model), args, name=name)
    regions = chunk_regions(mg, fold(mg))
    analysis_s = time.perf_counter() - t0
    unchunked_peak = measure_memory(graph(model, args, None), args)["peak_bytes"]
    need = (1 - PLANNER_LIMIT) * unchunked_peak
    chosen, choice_drop, choice_s = planner_choice(regions, need, launch_s)
    choice = [r.entry(k) for r, k in chosen.items()]
    configs = {"unchunked": None, "k=1 ckpt": entries(regions, 1),
               **{f"k={k}": entries(regions, k) for k in KS}, "planner": choice}
    chunks = {"unchunked": 0, "k=1 ckpt": 1, **{f"k={k}": k for k in KS},
              "planner": max((e["chunks"] for e in choice), default=0)}
    kinds = list(dict.fromkeys(r.kind for r in regions))
    for kind in [] if quick else kinds:  # diagnostics: one kind at a time, k = DIAG_K (not part of the verdict)
        configs[f"{kind} only, k={DIAG_K}"] = [e for e in entries(regions, DIAG_K) if e["kind"] == kind]
        chunks[f"{kind} only, k={DIAG_K}"] = DIAG_K
    gms = {n: graph(model, args, c) for n, c in configs.items()}
    print(f"[{name}] {len(regions)} regions; measuring memory ...", flush=True)

    ref_loss, ref_grads = None, None
    rows = {}
    for n, gm in gms.items():  # gradients against the unchunked ones, then the memory step
        loss = step(gm, args).item()
        grads = {k: p.grad.clone() for k, p in gm.named_parameters()}
        if ref_grads is None:
            ref_loss, ref_grads = loss, grads
        rows[n] = {"config": n, "chunks": chunks[n], "entries": configs[n], "diagnostic": " only, " in n,
                   "planner": n == "planner",
                   "max_abs_grad_diff": max((grads[k] - ref_grads[k]).abs().max().item() for k in grads),
                   "max_abs_grad": max(g.abs().max().item() for g in ref_grads.values())}
        del grads
        rows[n]["memory"] = measure_memory(gm, args)
    del ref_grads
    print(f"[{name}] timing {len(gms)} configurations, {warmup}+{steps} rounds ...", flush=True)
    load_before = os.getloadavg()
    with kept_pages(keep):
        timed = time_configs(gms, args, warmup, steps, threads)
    load_after = os.getloadavg()

    base_mem = rows["unchunked"]["memory"]
    base_t = statistics.median(timed["unchunked"]["times"])
    for n, row in rows.items():
        m, t = row["memory"], timed[n]
        k = row["chunks"]
        ks = {(e["kind"], e["scope"]): e["chunks"] for e in configs[n] or []}
        mine = chosen if row["planner"] else {r: ks[(r.kind, r.scope)] for r in regions if (r.kind, r.scope) in ks}
        predicted = chunk_drop(regions, mine)
        measured_drop = base_mem["peak_bytes"] - m["peak_bytes"]
        losses = [m["loss"], *t["losses"]]
        row.update({
            "activation_peak_bytes": m["peak_bytes"],
            "after_forward_bytes": m["after_forward_bytes"],
            "peak_in": m["peak_in"],
            "reduction": 1 - m["peak_bytes"] / base_mem["peak_bytes"],
            "measured_peak_drop_bytes": base_mem["peak_bytes"] - m["peak_bytes"],
            "measured_after_forward_drop_bytes": base_mem["after_forward_bytes"] - m["after_forward_bytes"],
            "predicted_drop_bytes": predicted,
            "predicted_over_measured_drop": predicted / measured_drop if measured_drop else None,
            "predicted_per_region_drop_bytes": {f"{r.kind} {r.scope}": chunk_drop(regions, {r: rk})
                                                for r, rk in mine.items()},
            "minor_page_faults_per_step": statistics.median(t["minflt"]),
            "sys_s_per_step": statistics.median(t["sys_s"]),
            "step_times_s": t["times"], "step_ratios": t["ratios"],
            "median_step_s": statistics.median(t["times"]),
            "slowdown": statistics.median(t["ratios"]) - 1,
            "slowdown_of_medians": statistics.median(t["times"]) / base_t - 1,
            "losses": losses,
            "max_abs_loss_diff": max(abs(x - ref_loss) for x in losses),
        })
        row["loss_ok"] = row["max_abs_loss_diff"] <= LOSS_TOL
        row["meets_target"] = bool(k) and row["reduction"] >= TARGET_REDUCTION and row["slowdown"] <= TARGET_SLOWDOWN
        row["counts_for_target"] = bool(k) and not row["diagnostic"]
        if row["planner"]:
            row.update({"limit_bytes": PLANNER_LIMIT * base_mem["peak_bytes"], "need_bytes": need,
                        "predicted_extra_s": choice_s, "measured_extra_s": row["median_step_s"] - base_t,
                        "predicted_drop_at_selection_bytes": choice_drop})
    del gms
    gc.collect()

    # ---- longest fit within the unchunked activation peak at the base size
    limit = base_mem["peak_bytes"]
    best = min((r for r in rows.values() if r["chunks"] > 1 and not r["diagnostic"] and not r["planner"]),
               key=lambda r: r["activation_peak_bytes"])
    grain = grains[1] if quick else grains[0]
    fit = {"limit_bytes": limit, "grain": grain, "field": field, "base": base, "best_k": best["chunks"]}
    for label, k in (("unchunked", 0), ("chunked", best["chunks"])):
        print(f"[{name}] longest {field} within {limit / MiB:.1f} MiB, {label} ...", flush=True)
        fit[label] = longest_fit(name, base, grain, k, regions, limit)
    fit["ratio"] = fit["chunked"]["longest"] / fit["unchunked"]["longest"]
    return {
        "model": {"name": name, "zoo_preset": preset, **changes, field: base, "batch": BATCH,
                  "description": describe(name, model),
                  "params": sum(p.numel() for p in model.parameters())},
        "regions": [dataclasses.asdict(r) for r in regions],
        "planner_limit_fraction": PLANNER_LIMIT, "kernel_launch_s": launch_s,
        "analysis_s": analysis_s,
        "reference_loss": ref_loss,
        "warmup": warmup, "steps": steps, "timing_threads": threads, "memory_threads": torch.get_num_threads(),
        "timing_malloc": "kept pages (M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1)" if keep else "glibc defaults",
        "rows": list(rows.values()),
        "best_k": best["chunks"],
        "meets_target": any(r["meets_target"] and r["counts_for_target"] for r in rows.values()),
        "longest_fit": fit,
        "loadavg_1_5_15": {"before_timing": list(load_before), "after_timing": list(load_after)},
    }


def longest_fit(name: str, base: int, grain: int, k: int, regions, limit: float) -> dict:
    """Largest size (a multiple of ``grain``, from ``base`` up) whose measured activation peak is within
    ``limit``: doubling, then bisection. ``base`` fits (the limit is the unchunked peak there)."""
    probes = []

    def fits(size: int) -> bool:
        model, args = build(name, size)
        gm = graph(model, args, entries(regions, k) if k else None)
        slack = sum(p.numel() * p.element_size() for p in model.parameters())  # the most p.grad can hold
        m = measure_memory(gm, args, abort_above=limit + slack)
        ok = "exceeded" not in m and m["peak_bytes"] <= limit
        probes.append({"size": size, "fits": ok, **{key: m[key] for key in ("peak_bytes", "exceeded", "seconds")
                                                    if key in m}})
        print(f"    {size}: " + (f"peak {m['peak_bytes'] / MiB:.1f} MiB" if "peak_bytes" in m else
                                  f"stopped in {m['exceeded']}") + (" fits" if ok else " does not fit"), flush=True)
        del gm, model, args
        gc.collect()
        return ok

    lo, hi = base, 2 * base
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > grain:
        mid = (lo + hi) // 2 // grain * grain
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"chunks": k, "longest": lo, "first_too_big": hi, "probes": probes}


# --------------------------------------------------------------------------------------------- report
def print_tables(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=190)
    for name, m in res["models"].items():
        mdl = m["model"]
        field = m["longest_fit"]["field"]
        t = Table(title=f"MEASURED (+ PREDICTED drop) — {mdl['description']}, batch {mdl['batch']} × "
                        f"{field} {mdl[field]}, fp32, fwd+bwd; every region chunked k ways (below the line: one "
                        f"kind at a time); step = median of {m['steps']} A/B rounds on {m['timing_threads']} thread(s), "
                        f"malloc {'kept pages' if m['timing_malloc'].startswith('kept') else 'glibc defaults'}")
        t.add_column("config", justify="right", no_wrap=True)
        for col in ("act peak MiB", "reduction", "peak in", "after fwd MiB", "step ms", "slowdown",
                    "(of medians)", "minflt /step", "sys ms /step", "PRED drop MiB", "meas drop after fwd",
                    "meas drop peak", "pred/meas", "|Δloss|", "max |Δgrad|", "target"):
            t.add_column(col, justify="right")
        for i, r in enumerate(m["rows"]):
            base = r["chunks"] == 0
            if r["diagnostic"] and not m["rows"][i - 1]["diagnostic"]:
                t.add_section()
            t.add_row(r["config"], f"{r['activation_peak_bytes'] / MiB:.1f}",
                      "-" if base else f"{100 * r['reduction']:.1f}%", r["peak_in"],
                      f"{r['after_forward_bytes'] / MiB:.1f}", f"{r['median_step_s'] * 1e3:.0f}",
                      "-" if base else f"{100 * r['slowdown']:+.1f}%",
                      "-" if base else f"{100 * r['slowdown_of_medians']:+.1f}%",
                      f"{r['minor_page_faults_per_step']:,.0f}", f"{r['sys_s_per_step'] * 1e3:.0f}",
                      "-" if base else f"{r['predicted_drop_bytes'] / MiB:.1f}",
                      "-" if base else f"{r['measured_after_forward_drop_bytes'] / MiB:.1f}",
                      "-" if base else f"{r['measured_peak_drop_bytes'] / MiB:.1f}",
                      "-" if base or not r["predicted_over_measured_drop"] else f"{r['predicted_over_measured_drop']:.2f}",
                      f"{r['max_abs_loss_diff']:.1e}" + ("" if r["loss_ok"] else " NO"),
                      f"{r['max_abs_grad_diff']:.1e}",
                      "-" if base else ("MET" if r["meets_target"] else "no") + ("*" if r["diagnostic"] else ""))
        con.print(t)
        con.print("  regions: " + "; ".join(
            f"{r['kind']} {r['scope']} ×{r['instances']} (S {r['saved_bytes'] / MiB:.1f}, T "
            f"{r['transient_bytes'] / MiB:.1f}, I {r['grad_input_bytes'] / MiB:.1f} MiB)" for r in m["regions"]))
        pr = next(r for r in m["rows"] if r["planner"])
        con.print(f"  planner = search.chunking.select asked for ≤ {100 * m['planner_limit_fraction']:.0f}% of the "
                  f"unchunked peak ({pr['limit_bytes'] / MiB:.1f} MiB; kernel_launch_s "
                  f"{m['kernel_launch_s'] * 1e6:.1f} µs): "
                  + (", ".join(f"{e['kind']} ×{e['chunks']}" for e in pr["entries"]) or "nothing")
                  + f"; predicted extra {pr['predicted_extra_s'] * 1e3:.0f} ms/step, measured "
                  f"{pr['measured_extra_s'] * 1e3:.0f} ms")
        la = m["loadavg_1_5_15"]
        con.print(f"  k=1 ckpt = every region under checkpoint as one chunk (the recompute alone). slowdown = median "
                  f"over rounds of (step / unchunked step of the same round) − 1; (of medians) = median step / "
                  f"unchunked median step − 1. minflt, sys = minor page faults and system CPU time per step "
                  f"(median). Load average {la['before_timing'][0]:.2f} before timing, {la['after_timing'][0]:.2f} "
                  "after. PRED drop = chunk_drop (saved bytes freed + fall of the largest backward transient). "
                  "target = ≥60% reduction and ≤15% slowdown (* diagnostic rows do not count).")
    t = Table(title="MEASURED — longest size whose activation peak fits the limit (= unchunked peak at the base size); "
                    "doubling then bisection")
    for col in ("model", "limit MiB", "base", "grain", "unchunked longest", "chunked k", "chunked longest",
                "ratio", "probes (unchunked / chunked)"):
        t.add_column(col, justify="right")
    for name, m in res["models"].items():
        f = m["longest_fit"]
        t.add_row(f"{name} ({f['field']})", f"{f['limit_bytes'] / MiB:.1f}", str(f["base"]), str(f["grain"]),
                  str(f["unchunked"]["longest"]), str(f["best_k"]), str(f["chunked"]["longest"]),
                  f"{f['ratio']:.2f}×", f"{len(f['unchunked']['probes'])} / {len(f['chunked']['probes'])}")
    con.print(t)
    met = [n for n, m in res["models"].items() if m["meets_target"]]
    con.print(f"  target (≥60% reduction at ≤15% slowdown, on ≥2 models): met on {len(met)} of "
              f"{len(res['models'])} ({', '.join(met) or 'none'}) -> {'MET' if len(met) >= 2 else 'NOT MET'}")
    con.print(f"written {RESULTS.relative_to(ROOT)} (total {res['wall_s']:.0f} s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed rounds, no per-kind rows, coarser "
                    "bisection grain")
    ap.add_argument("--malloc", choices=("keep", "default"), default="keep",
                    help="glibc malloc during the timed steps: keep freed pages (default) or glibc's defaults")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the timed steps (default 1, see the "
                    "README: on a shared machine multi-threaded small kernels turn others' load into stalls)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of "
                    f"{', '.join(MODELS)}; the others' results already in the results file are kept")
    opts = ap.parse_args()
    names = opts.models.split(",")
    if set(names) - set(MODELS):
        ap.error(f"unknown models {sorted(set(names) - set(MODELS))}; known: {', '.join(MODELS)}")
    t0 = time.perf_counter()
    from runtime.calibrate import measure_kernel_launch

    launch_s = measure_kernel_launch()
    res = {"command": "bench/run_chunk.py" + (" --quick" if opts.quick else "")
           + (f" --threads {opts.threads}" if opts.threads != 1 else "")
           + (" --malloc default" if opts.malloc == "default" else ""), "quick": opts.quick,
           "torch": torch.__version__, "cpu_count": os.cpu_count(), "dtype": "fp32", "ks": list(KS),
           "target": {"reduction": TARGET_REDUCTION, "slowdown": TARGET_SLOWDOWN, "models": 2},
           "timing_threads": opts.threads, "timing_malloc": opts.malloc, "kernel_launch_s": launch_s,
           "planner_limit_fraction": PLANNER_LIMIT,
           "models": {name: run_model(name, opts.quick, opts.threads, opts.malloc == "keep", launch_s)
                      for name in names}}
    if set(names) != set(MODELS) and RESULTS.exists():  # a partial run: keep the other models' last results
        earlier = json.loads(RESULTS.read_text())
        res["models"] = {n: res["models"].get(n, earlier["models"].get(n)) for n in MODELS
                         if n in res["models"] or n in earlier["models"]}
        res["command"] += f" --models {opts.models} (other models: {earlier['command']})"
    res["target"]["met_on"] = [n for n, m in res["models"].items() if m["meets_target"]]
    res["target"]["met"] = len(res["target"]["met_on"]) >= 2
    res["wall_s"] = time.perf_counter() - t0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2, sort_keys=True, default=str) + "\n")
    print_tables(res)
    return 0 if all(r["loss_ok"] for m in res["models"].values() for r in m["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
