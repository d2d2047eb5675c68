"""Measure this machine and write the `cpu` cluster profile (DESIGN §4 "calibrate against measurement").

``python -m runtime.calibrate [--ranks N] [--force]`` measures and prints the numbers; the profile is
written in ``Cluster.to_dict`` format to ``search.cluster.cpu_cache_path(ranks)``
(``$AUTOPAR_CACHE/cpu-<ranks>.json`` or ``~/.cache/autopar/cpu-<ranks>.json``), where
``get_cluster("cpu", ranks)`` loads it.

The profile is measured *for* ``ranks`` processes, because ranks beyond the core count share cores,
caches and memory bandwidth. Each rank runs with one thread, as the runtime does on CPU:
- peak: fp32 matmul FLOP/s of one thread alone (512×512 @ 512×512, median of several runs);
- ``compute_efficiency``: FLOP/s of a transformer-shaped MLP forward + backward, run on all ``ranks``
  processes at once (slowest rank), divided by the peak;
- memory bandwidth: copy of a 64 MiB tensor on all ranks at once, (read + write bytes) / time;
- ``kernel_launch_s``: the fixed cost of one more kernel in a training step, one thread: forward +
  backward of an element-wise op and of a matmul on [4096, 256] run as 64 slices vs as one op,
  (sliced - whole) / (2 × 63 launches) (one launch forward, one backward), the mean of the two ops
  (what activation chunking's time model charges per chunk and kernel);
- gloo all-reduce between the ``ranks`` processes on 127.0.0.1: median times of the message sizes
  training sends (``FIT_BYTES``: a 512 KiB activation and a 16 MiB gradient bucket), fitted to the ring
  model T(n) = 2(p−1)/p · n/B + 2(p−1)α (least squares in relative error: exact through two sizes).
  Not through a 4-byte message: with more ranks than cores, a rank blocked in a receive waits to be
  scheduled again, so every message from a few KiB up costs a floor of milliseconds that a 4-byte one
  (0.6–0.8 ms) does not show (4 ranks on 2 cores: 16 KiB to 1 MiB all take 4–5 ms; 2 ranks:
  0.3–0.8 ms). One machine has one link, so inter_* = intra_*;
- ``collective_factor``: the bandwidth term of a 16 MiB reduce-scatter and all-gather (measured time
  minus (p−1)α) over the ring model's (p−1)/p · n/B (gloo reduce-scatters by an all-reduce: about 2;
  what ZeRO's price uses).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from search.cluster import Cluster, cpu_cache_path

LARGE_BYTES = 16 * 1024 * 1024
FIT_BYTES = (512 * 1024, LARGE_BYTES)  # all-reduce sizes α and B fit: a tp activation, a gradient bucket


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_matmul_flops(n: int = 512, reps: int = 7, inner: int = 4) -> float:
    """Single-thread fp32 matmul FLOP/s."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        for _ in range(2):
            torch.mm(a, b, out=out)

        def run():
            for _ in range(inner):
                torch.mm(a, b, out=out)

        return 2 * n ** 3 * inner / _median_time(run, reps)
    finally:
        torch.set_num_threads(old)


def measure_training_flops(tokens: int = 256, hidden: int = 256, ffn: int = 1024, seconds: float = 1.5) -> float:
    """FLOP/s one thread reaches on a transformer-shaped MLP, forward + backward (small shapes and
    transposed backward GEMMs are slower than a square matmul), over at least ``seconds`` (ranks that
    share cores get time slices of a few ms: a short run measures the slicing, not the rate)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(hidden, ffn), torch.nn.Linear(ffn, hidden))
        x = torch.randn(tokens, hidden, requires_grad=True)
        flops = 3 * 2 * tokens * (2 * hidden * ffn)  # forward, input grad and weight grad of both matmuls
        for _ in range(2):
            net(x).sum().backward()
        t0 = time.perf_counter()  # throughput over the whole loop: time slices of shared cores average out
        reps = 0
        while time.perf_counter() - t0 < seconds:
            net(x).sum().backward()
            reps += 1
        return flops * reps / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)


def measure_memory_bandwidth(nbytes: int = 64 * 1024 * 1024, reps: int = 5) -> float:
    """Single-thread copy bandwidth, counting bytes read + bytes written."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.ones(nbytes // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        return 2 * nbytes / _median_time(lambda: dst.copy_(src), reps)
    finally:
        torch.set_num_threads(old)


def measure_kernel_launch(rows: int = 4096, hidden: int = 256, pieces: int = 64, reps: int = 9) -> float:
    """Seconds one extra kernel costs in a training step (forward + backward), one thread: a gelu and a
    matmul on [rows, hidden] run whole and as ``pieces`` slices; the mean over the two ops of the
    median extra time per launch."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x = torch.randn(rows, hidden, requires_grad=True)
        w = torch.randn(hidden, hidden, requires_grad=True)
        per_op = []
        for op in (torch.nn.functional.gelu, lambda t: t @ w):
            def whole():
                op(x).sum().backward()

            def sliced():
                sum(op(part).sum() for part in x.split(rows // pieces)).backward()

            for fn in (whole, sliced):
                fn()  # warm-up
            t_whole = _median_time(whole, reps)
            t_sliced = _median_time(sliced, reps)
            # 2 launches of the op per slice (forward, backward); the slice's own narrow and sum are charged
            # to them, as a chunk loop pays such bookkeeping per chunk too
            per_op.append(max(t_sliced - t_whole, 0.0) / (2 * (pieces - 1)))
        return statistics.mean(per_op)
    finally:
        torch.set_num_threads(old)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, out_path: str) -> None:
    """One calibration rank: gloo all-reduce timings, then compute and copy rates with every rank busy."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        result = {}
        big = torch.ones(LARGE_BYTES // 4)
        part = torch.ones(LARGE_BYTES // 4 // world)
        runs = tuple((f"all_reduce {n}", torch.ones(n // 4), dist.all_reduce, 7 if n >= 2**22 else 21)
                     for n in FIT_BYTES) + (
                ("reduce_scatter", big, lambda x: dist.reduce_scatter_tensor(part, x), 7),
                ("all_gather", part, lambda x: dist.all_gather_into_tensor(big, x), 7))
        for label, buf, op, reps in runs:
            for _ in range(3):
                op(buf)
            times = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                op(buf)
                times.append(time.perf_counter() - t0)
            result[label] = statistics.median(times)
        dist.barrier()
        flops = measure_training_flops()
        dist.barrier()
        membw = measure_memory_bandwidth()
        # the slowest rank bounds a step: max of times, min of rates
        labels = tuple(result)
        t = torch.tensor([result[k] for k in labels] + [-flops, -membw], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if rank == 0:
            Path(out_path).write_text(json.dumps({**{k: t[i].item() for i, k in enumerate(labels)},
                                                  "training_flops": -t[-2].item(), "memory_bandwidth": -t[-1].item()}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def fit_alpha_beta(p: int, points: dict[int, float]) -> tuple[float, float]:
    """(α, B) of the ring all-reduce model T(n) = 2(p−1)α + 2(p−1)/p · n/B fitted to ``points``
    {bytes: seconds} by least squares in relative error (each point weighs 1/T²)."""
    w = {n: 1 / t ** 2 for n, t in points.items()}
    s0, s1, s2 = sum(w.values()), sum(w[n] * n for n in w), sum(w[n] * n * n for n in w)
    r0, r1 = sum(w[n] * t for n, t in points.items()), sum(w[n] * n * t for n, t in points.items())
    slope = (s0 * r1 - s1 * r0) / (s0 * s2 - s1 * s1)
    if slope <= 0:  # flat timings: all of it bandwidth at the largest size
        n, t = max(points.items())
        slope, intercept = t / n, 0.0
    else:
        intercept = (r0 - slope * s1) / s0
    return max(intercept / (2 * (p - 1)), 1e-7), 2 * (p - 1) / p / slope


def measure_ranks(ranks: int = 2) -> tuple[float, float, dict]:
    """gloo all-reduce latency α (s) and bandwidth B (B/s) between ``ranks`` local processes, and the
    raw timings with the per-rank compute and copy rates measured while all ranks run at once."""
    import torch.multiprocessing as mp

    world = max(2, ranks)
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "link.json")
        try:
            mp.spawn(_rank_worker, args=(world, _free_port(), out), nprocs=world, join=True)
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = old
        raw = json.loads(Path(out).read_text())
    alpha, bw = fit_alpha_beta(world, {n: raw[f"all_reduce {n}"] for n in FIT_BYTES})
    return alpha, bw, raw


def _memory_bytes() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        lim = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if lim.isdigit():
            total = min(total, int(lim))
    except OSError:
        pass
    return total


def measure_cpu_profile(ranks: int = 2) -> dict:
    """Measure this machine; return a dict in ``Cluster.to_dict`` format (name "cpu")."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be a positive integer, got {ranks!r}")
    peak = measure_matmul_flops()
    launch = measure_kernel_launch()
    alpha, bw, raw = measure_ranks(ranks)
    world = max(2, ranks)
    ring = (world - 1) / world * LARGE_BYTES / bw
    d = {
        "name": "cpu",
        "nodes": 1,
        "devices_per_node": ranks,
        "peak_flops": {"fp32": peak, "bf16": peak, "fp16": peak},
        "memory_bytes": _memory_bytes() // ranks,
        "memory_bandwidth": raw["memory_bandwidth"],
        "intra_bandwidth": bw,
        "intra_latency": alpha,
        "inter_bandwidth": bw,
        "inter_latency": alpha,
        "compute_efficiency": min(1.0, raw["training_flops"] / peak),
        "kernel_launch_s": launch,
        # the bandwidth term of gloo's reduce-scatter and all-gather (16 MiB, lockstep) over the ring model's
        "collective_factor": {k: max(raw[k] - (world - 1) * alpha, 0.0) / ring for k in ("reduce_scatter", "all_gather")},
    }
    Cluster.from_dict(d)  # validate before anyone caches it
    return d


def write_cpu_profile(profile: dict, path=None) -> Path:
    p = Path(path) if path is not None else cpu_cache_path(profile["devices_per_node"])
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(profile, indent=2) + "\n")
    os.replace(tmp, p)
    return p


@contextlib.contextmanager
def calibration_lock(ranks: int):
    """Hold the ``cpu`` profile's file lock: processes that need the profile at once wait for one
    measurement (measuring alongside each other, they would measure a machine they overload)."""
    p = cpu_cache_path(ranks)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_cpu_profile(ranks: int = 2, *, force: bool = False, locked: bool = False) -> Path:
    """Path of the cached `cpu` profile for ``ranks`` ranks, measuring (≈10 s) only when missing or
    ``force``, under :func:`calibration_lock` (``locked``: the caller holds it)."""
    p = cpu_cache_path(ranks)
    with contextlib.nullcontext() if locked else calibration_lock(ranks):
        if force or not p.exists():
            write_cpu_profile(measure_cpu_profile(ranks), p)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.calibrate", description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2, help="ranks (devices) to run on this machine")
    ap.add_argument("--force", action="store_true", help="re-measure even if a cached profile exists")
    ap.add_argument("--no-write", action="store_true", help="measure and print only")
    ap.add_argument("--locked", action="store_true", help=argparse.SUPPRESS)  # the caller holds the lock
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.no_write:
        prof, where = measure_cpu_profile(args.ranks), "(not written)"
    else:
        where = ensure_cpu_profile(args.ranks, force=args.force, locked=args.locked)
        prof = json.loads(where.read_text())
    pf = prof["peak_flops"]["fp32"]
    print(f"cpu profile ({args.ranks} ranks, {time.perf_counter() - t0:.1f} s) -> {where}")
    print(f"  matmul fp32, 1 thread : {pf / 1e9:8.2f} GFLOP/s")
    print(f"  training MLP / peak   : {prof['compute_efficiency']:8.2f} (all ranks busy)")
    print(f"  kernel launch         : {prof['kernel_launch_s'] * 1e6:8.1f} us (forward + backward, 1 thread)")
    print(f"  memory bandwidth      : {prof['memory_bandwidth'] / 1e9:8.2f} GB/s per rank (all ranks busy)")
    print(f"  gloo bandwidth B      : {prof['intra_bandwidth'] / 1e9:8.3f} GB/s")
    print(f"  gloo latency alpha    : {prof['intra_latency'] * 1e6:8.1f} us")
    for kind, f in prof.get("collective_factor", {}).items():
        print(f"  {kind + ' / ring':22s}: {f:8.2f}")
    print(f"  memory per rank       : {prof['memory_bytes'] / 2**30:8.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
