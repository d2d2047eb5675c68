"""Train the zoo's gpt-tiny with a plan chosen by autopar, optionally checking it against one process.

    torchrun --nproc-per-node 4 examples/train_gpt.py --steps 5 --check

Every rank builds the same model (seed 0) and the same fixed global batch; ``auto_parallelize`` picks
and applies a plan and returns a module whose forward takes the *global* batch and returns the same
loss one process would. With ``--check``, rank 0 also trains a deep copy of the single-process model
(taken before parallelisation) in lockstep and fails (exit 1) if any step's loss differs by > --tol.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: repo root on the path

from examples.zoo import build  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt-tiny", help="zoo model name (default gpt-tiny)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--check", action="store_true", help="compare every step's loss with one process on rank 0")
    ap.add_argument("--tol", type=float, default=1e-5, help="max abs loss difference allowed by --check")
    ap.add_argument("--plan-out", default=None, help="rank 0 writes the chosen plan's JSON here")
    ap.add_argument("--fix", default=None, help="pin plan degrees, e.g. dp=2,tp=2 (as autopar plan --fix)")
    opts = ap.parse_args(argv)

    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0

    model, (idx, tgt), _ = build(opts.model, batch=opts.global_batch, device="cpu", seed=0)
    reference = copy.deepcopy(model) if (opts.check and rank == 0) else None

    from planner import auto_parallelize

    from planner.cli import parse_fix

    dmodel = auto_parallelize(model, (idx, tgt), constraints=parse_fix(opts.fix) if opts.fix else None)
    if rank == 0:
        deg, pred = dmodel.plan.degrees, dmodel.plan.predicted
        print(f"plan: dp={deg['dp']} tp={deg['tp']} zero={deg['zero']}; predicted step "
              f"{pred['step_time_s'] * 1e3:.2f} ms, {pred['comm_bytes']:,} B sent per rank", flush=True)
        if opts.plan_out:
            Path(opts.plan_out).write_text(dmodel.plan.to_json())

    opt = torch.optim.SGD(dmodel.parameters(), lr=opts.lr)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=opts.lr) if reference is not None else None

    worst = 0.0
    for step in range(opts.steps):
        opt.zero_grad(set_to_none=True)
        loss = dmodel(idx, tgt)
        loss.backward()
        opt.step()
        if rank != 0:
            continue
        line = f"step {step} loss {loss.item():.6f}"
        if reference is not None:
            ref_opt.zero_grad(set_to_none=True)
            ref_loss = reference(idx, tgt)
            ref_loss.backward()
            ref_opt.step()
            diff = abs(loss.item() - ref_loss.item())
            worst = max(worst, diff)
            line += f" ref {ref_loss.item():.6f} max_abs_diff {diff:.3e}"
        print(line, flush=True)

    failed = torch.tensor([1 if (opts.check and rank == 0 and worst > opts.tol) else 0])
    if dist.is_initialized():
        dist.broadcast(failed, src=0)  # every rank agrees on the exit code
    if rank == 0 and opts.check:
        verdict = "FAIL" if failed.item() else "OK"
        print(f"check {verdict}: max abs loss difference {worst:.3e} (tolerance {opts.tol:g})", flush=True)
    if dist.is_initialized():
        dist.barrier()  # no rank tears its group down while another still has work in flight
        dist.destroy_process_group()
    return 1 if failed.item() else 0


if __name__ == "__main__":
    sys.exit(main())
