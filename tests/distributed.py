"""Run a function on N real gloo ranks (127.0.0.1) and collect what each rank returns.

    def checks(rank, world, scale):          # module-level, so spawn can pickle it
        ...
        return {"sum": float(x), "ok": True}  # one launch, many checks: return a dict

    results = run_ranks(checks, 2, 3.0)      # [rank0_dict, rank1_dict]

Each rank: OMP_NUM_THREADS=1, torch.set_num_threads(1), gloo default group with a timeout, then
fn(rank, world, *args). On success it barriers, hands its result to the parent, barriers again and
destroys the group (no rank tears down while another still has work in flight — the SIGABRT hazard).
If a rank raises, its traceback reaches the parent, which kills the other ranks and raises
AssertionError with that text. Nothing waits longer than `timeout` seconds.
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

__all__ = ["run_ranks", "free_port", "raised"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, pg_timeout, fn, args, q):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=pg_timeout),
        )
        result = fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 — everything goes to the parent
        q.put(("error", rank, traceback.format_exc()))
        q.close()
        q.join_thread()
        os._exit(1)  # skip teardown: peers may be blocked in a collective; the parent kills them
    try:
        dist.barrier()
        q.put(("ok", rank, result))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        q.put(("error", rank, "teardown failed:\n" + traceback.format_exc()))
    q.close()
    q.join_thread()


def run_ranks(fn, world_size: int, *args, timeout: float = 120) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned gloo ranks; return results by rank."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    pg_timeout = max(10.0, float(timeout))
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, pg_timeout, fn, args, q), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    failure = None
    try:
        while len(results) < world_size and failure is None:
            left = deadline - time.monotonic()
            if left <= 0:
                failure = f"run_ranks: timed out after {timeout:.0f}s; ranks done: {sorted(results)}"
                break
            try:
                status, rank, payload = q.get(timeout=min(0.2, left))
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    # give a just-dying rank's traceback a moment to arrive through the queue
                    try:
                        status, rank, payload = q.get(timeout=1.0)
                    except queue_mod.Empty:
                        failure = f"run_ranks: rank(s) died without a report (rank, exitcode): {dead}"
                        break
                else:
                    continue
            if status == "error":
                failure = f"rank {rank} of {world_size} raised:\n{payload}"
            else:
                results[rank] = payload
        if failure is None:
            for p in procs:
                p.join(timeout=max(1.0, deadline - time.monotonic()))
            # a late teardown error (after the result was sent) still fails the run
            try:
                while True:
                    status, rank, payload = q.get_nowait()
                    if status == "error":
                        failure = f"rank {rank} of {world_size} raised:\n{payload}"
            except queue_mod.Empty:
                pass
            bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
            if failure is None and bad:
                failure = f"run_ranks: rank(s) exited abnormally after reporting (rank, exitcode): {bad}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
        q.close()
        q.cancel_join_thread()
    if failure is not None:
        raise AssertionError(failure)
    return [results[r] for r in range(world_size)]


def launch_once(cache: dict, world: int, fn, *args, timeout: float, label: str = "") -> list:
    """``run_ranks(fn, world, *args)`` once per world size and test module: many checks share one
    launch (starting ranks costs seconds). A failed launch is cached and re-raised for every test."""
    if world not in cache:
        t0 = time.perf_counter()
        try:
            cache[world] = run_ranks(fn, world, *args, timeout=timeout)
        except AssertionError as exc:
            cache[world] = exc
        print(f"\n{world}-rank {label} launch: {time.perf_counter() - t0:.1f}s")
    got = cache[world]
    if isinstance(got, AssertionError):
        raise AssertionError(f"the {world}-rank {label} launch failed:\n{got}")
    return got


def loss_of(out):
    """The loss of a model's output: a Hugging Face output's ``.loss``, else the output itself."""
    return out.loss if hasattr(out, "loss") else out


def full_state_check(fresh, full: dict, args: tuple, kwargs: dict, ref_loss) -> dict:
    """Load a distributed module's ``full_state_dict()`` (``full``) strictly into ``fresh``, a plain model,
    and compare its loss with ``ref_loss``: {"full_state_loss", "full_state_error"} for the parent."""
    import torch

    try:
        fresh.load_state_dict(full, strict=True)
        with torch.no_grad():
            return {"full_state_loss": abs(loss_of(fresh(*args, **kwargs)).item() - ref_loss.item()),
                    "full_state_error": None}
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        return {"full_state_loss": float("inf"), "full_state_error": f"{type(exc).__name__}: {exc}"[:800]}


def raised(fn) -> dict:
    """What ``fn()`` raised, as plain data for the parent: {"raised": exception class name or None, "message"}."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None, "message": ""}
