"""ILP backends and linearizations for search.ilp on synthetic Alpa-style instances, measured on this machine.

    .venv/bin/python bench/run_ilp_backends.py        # writes bench/results/ilp_backends.json, prints a table

Instances (seed 0, 4 strategies per node, costs in [0, 1) s, memories 10..99 B, resharding matrices with a
zero diagonal): "dag-5k" is 200 nodes in a chain plus a skip edge every third node (~5,000 variables after
preprocessing), with the memory limit halfway between the unconstrained optimum's memory and the least
memory, or without a limit; "chain-2000" is 2,000 nodes × 4 with the same kind of limit (~40,000 variables).
Every run uses one thread (HiGHS: its own default), a fixed seed, zero gap and a 60 s time limit. Rows
without "(pywraplp)" are ``search.ilp.solve`` (MathOpt); "(pywraplp)" rows hand the very same model to OR-Tools'
older linear-solver wrapper (HiGHS again, and CBC, which MathOpt lacks). Seconds include preprocessing and
model building, not the MPS conversion of the pywraplp rows.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from ortools.linear_solver import pywraplp
from ortools.linear_solver.python import model_builder
from ortools.math_opt.io.python import mps_converter
from rich.console import Console
from rich.table import Table

from search import ilp

ROOT = Path(__file__).resolve().parent.parent
TIME_LIMIT_S = 60.0


def instance(n: int, skip: int | None, seed: int = 0) -> ilp.IlpProblem:
    rng = np.random.default_rng(seed)
    p = ilp.IlpProblem()
    for v in range(n):
        p.add_node(rng.random(4), rng.integers(10, 100, 4))
        for u in {v - 1, v - 3} if skip and v % skip == 0 else {v - 1}:
            if u >= 0:
                p.add_edge(u, v, rng.random((4, 4)) * (1 - np.eye(4)))
    return p


def pywraplp_run(p: ilp.IlpProblem, limit: float | None, solver_id: str) -> dict:
    """The model ``solve`` builds for "highs", handed to pywraplp's ``solver_id`` (via MPS; the conversion is
    not timed, the build is)."""
    t0 = time.perf_counter()
    model, _, _ = ilp._build_ilp(ilp._prepare(p, limit), "highs", "alpa")
    build = time.perf_counter() - t0
    mb = model_builder.Model()
    mb.import_from_mps_string(mps_converter.model_proto_to_mps(model.export_model()))
    solver = pywraplp.Solver.CreateSolver(solver_id)
    solver.LoadModelFromProto(mb.export_to_proto())
    solver.SetNumThreads(1)
    if solver_id == "HIGHS":
        solver.SetSolverSpecificParametersAsString("output_flag = false\nrandom_seed = 0\nmip_rel_gap = 0")
    solver.SetTimeLimit(int(TIME_LIMIT_S * 1000))
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(params.RELATIVE_MIP_GAP, 0.0)
    t0 = time.perf_counter()
    result = solver.Solve(params)
    status = {pywraplp.Solver.OPTIMAL: "optimal", pywraplp.Solver.FEASIBLE: "feasible"}.get(result, "timeout")
    return {"status": status, "seconds": build + time.perf_counter() - t0, "objective": None, "gap": None,
            "variables": solver.NumVariables(), "constraints": solver.NumConstraints()}


def main() -> int:
    cases = []  # (instance name, problem, memory limit, [(backend, linearization)])
    for name, p in (("dag-5k", instance(200, 3)), ("chain-2000", instance(2000, None))):
        free = ilp.solve(p)
        limit = 0.5 * (free.memory + free.min_memory)
        runs = [(b, "alpa") for b in ("highs", "highs (pywraplp)", "cbc (pywraplp)", "scip", "cp-sat")]
        runs += [("highs", "mccormick"), ("scip", "mccormick")]
        if name == "dag-5k":
            cases.append((name + " no limit", p, None, [r for r in runs if r[1] == "alpa"]))
        cases.append((name + " memory", p, limit, runs if name == "dag-5k" else runs[:4]))
    rows, load = [], [os.getloadavg()[0]]
    for name, p, limit, runs in cases:
        for backend, lin in runs:
            if backend.endswith("(pywraplp)"):
                r = pywraplp_run(p, limit, backend.split()[0].upper())
            else:
                sol = ilp.solve(p, memory_limit=limit, time_limit_s=TIME_LIMIT_S, backend=backend, linearization=lin)
                r = {"status": sol.status, "seconds": sol.seconds, "objective": sol.objective, "gap": sol.gap,
                     "variables": sol.num_variables, "constraints": sol.num_constraints}
            rows.append({"instance": name, "backend": backend, "linearization": lin, **r})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    load.append(os.getloadavg()[0])
    (ROOT / "bench" / "results" / "ilp_backends.json").write_text(json.dumps({"load_average": load, "runs": rows},
                                                                             indent=2) + "\n")
    table = Table(title=f"search.ilp backends (measured here, 1 thread, {TIME_LIMIT_S:.0f} s limit)")
    for col in ("instance", "backend", "linearization", "vars", "rows", "status", "seconds", "objective", "gap"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["instance"], r["backend"], r["linearization"], str(r["variables"]), str(r["constraints"]),
                      r["status"], f"{r['seconds']:.2f}", "" if r["objective"] is None else f"{r['objective']:.6f}",
                      "" if r["gap"] is None else f"{r['gap']:.1e}")
    Console(width=150).print(table)
    print(f"1-minute load average before / after: {load[0]:.2f} / {load[1]:.2f} (2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
