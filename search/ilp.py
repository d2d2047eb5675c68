"""Alpa-style strategy selection (DESIGN §3): one strategy per node, resharding cost per edge, memory limit.

Generic and torch-free. Node v has k_v strategies with cost c_v[k] (seconds) and memory m_v[k] (bytes per
device); edge (u, v) has a resharding matrix R_uv[k_u][k_v] (seconds); integer weights count the instances
of a folded template. Minimize Σ w_v c_v[s_v] + Σ w_uv R_uv[s_u][s_v] subject to Σ w_v m_v[s_v] ≤ limit.

Preprocessing (exact):
- weights are multiplied in; parallel edges are summed;
- each edge matrix gives its row minima to u's costs and then its column minima to v's costs, so an
  additive matrix a[i] + b[j] (all-zero ones and every edge at a one-strategy node among them) vanishes;
- a node with one edge left whose best strategy, for each strategy of its neighbour, also needs the least
  memory is folded into the neighbour (repeated: trees collapse as in dynamic programming, and without a
  binding memory limit every node with ≤ 1 edge goes); a node with no edge left takes its best strategy;
- a node with two edges whose best strategy, for each pair of its neighbours' strategies, needs its least
  memory (always so for a view, and for any node when the limit does not bind) is replaced by one edge
  between its neighbours holding that best (series reduction: chains of element-wise ops and views
  collapse);
- a memory limit that every assignment meets is dropped; one below the least memory any assignment needs
  (Σ_v w_v min_k m_v[k], no solver needed) gives status "infeasible" with that number in ``min_memory``.

Formulation: s_v binary one-hot; e_uv[i][j] ∈ [0, 1] continuous with Alpa's marginal constraints
Σ_j e_uv[i][j] = s_u[i], Σ_i e_uv[i][j] = s_v[j] (one-hot s forces e integral). ``linearization="mccormick"``
is the standard one (e ≥ s_u[i] + s_v[j] − 1, only where R > 0): fewer variables, but its LP relaxation is
weak (s = ½ makes every e zero): on the 5k DAG with a memory limit HiGHS still had a 0.2% gap after 60 s
(SCIP: optimal in 41 s) against 1.08 s with ``alpa``, the default.

Backends (``backend=``), through OR-Tools MathOpt with a fixed seed, zero gap tolerance and one thread
(HiGHS keeps its own default): "highs" (default), "scip", "cp-sat". Measured by bench/run_ilp_backends.py on
this 2-core machine (seconds including preprocessing and model build; 60 s limit):

    instance (vars)                  highs   highs via pywraplp   cbc (pywraplp)   scip   cp-sat (1 worker)
    DAG (5,020), no memory limit     0.31    0.47                 0.80             0.33   gap 95% at 60 s
    DAG (5,040), memory limit        1.08    2.01                 4.80             5.05   gap 79% at 60 s
    chain 2000 × 4 (39,984), limit   4.86    16.8                 not optimal      16.3   -

CBC is not in MathOpt and was slower than HiGHS throughout, so it is not offered.

Determinism: one thread (HiGHS: deterministic itself) and a fixed seed; afterwards each node, in index order,
moves to its lowest-index strategy that raises neither the objective nor the memory above the limit, so ties
between equivalent strategies resolve to the lower index.

>>> p = IlpProblem()
>>> a = p.add_node([1.0, 2.0], [8, 4])
>>> b = p.add_node([1.0, 1.0], [8, 4])
>>> p.add_edge(a, b, [[0.0, 3.0], [3.0, 0.0]])
>>> solve(p).choice, solve(p, memory_limit=12).choice, solve(p, memory_limit=7).min_memory
((0, 0), (1, 1), 8.0)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NamedTuple

import numpy as np
from ortools.math_opt.python import mathopt

from search.errors import BadInput

BACKENDS = {"highs": mathopt.SolverType.HIGHS, "scip": mathopt.SolverType.GSCIP, "cp-sat": mathopt.SolverType.CP_SAT}
_ZERO = 1e-12  # relative size below which a reduced edge entry or a cost difference counts as zero


@dataclass
class IlpProblem:
    """Nodes with per-strategy costs and memories, edges with resharding matrices, integer weights."""

    costs: list[list[float]] = field(default_factory=list)
    memories: list[list[float]] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)
    edges: list[tuple[int, int, list[list[float]], int]] = field(default_factory=list)

    def add_node(self, costs, memories, weight: int = 1) -> int:
        """Add a node with ``len(costs)`` strategies; return its index."""
        if not len(costs) or len(costs) != len(memories):
            raise BadInput(f"a node needs ≥ 1 strategy and one memory per cost, got {len(costs)} and {len(memories)}")
        self.costs.append([float(c) for c in costs])
        self.memories.append([float(m) for m in memories])
        self.weights.append(_check_weight(weight))
        return len(self.costs) - 1

    def add_edge(self, u: int, v: int, matrix, weight: int = 1) -> None:
        """Add resharding costs ``matrix[i][j]`` paid when u takes strategy i and v strategy j."""
        n = len(self.costs)
        if not (0 <= u < n and 0 <= v < n) or u == v:
            raise BadInput(f"edge ({u}, {v}) needs two distinct existing nodes (there are {n})")
        shape = (len(self.costs[u]), len(self.costs[v]))
        if np.shape(matrix) != shape:
            raise BadInput(f"edge ({u}, {v}) matrix has shape {np.shape(matrix)}, expected {shape}")
        self.edges.append((u, v, [[float(x) for x in row] for row in matrix], _check_weight(weight)))

    def evaluate(self, choice) -> tuple[float, float]:
        """(objective seconds, memory bytes per device) of one strategy index per node."""
        cost = sum(w * c[k] for c, w, k in zip(self.costs, self.weights, choice))
        cost += sum(w * r[choice[u]][choice[v]] for u, v, r, w in self.edges)
        return cost, sum(w * m[k] for m, w, k in zip(self.memories, self.weights, choice))


@dataclass(frozen=True)
class IlpSolution:
    """``status`` is "optimal", "feasible" (time limit hit with a solution), "infeasible" or "timeout".

    ``choice`` (strategy index per node), ``objective`` (seconds) and ``memory`` (bytes per device) are None
    without a solution; ``min_memory`` is the least memory any assignment needs; ``gap`` is relative to the
    objective; ``num_variables``/``num_constraints`` count the model left after preprocessing.
    """

    status: str
    choice: tuple[int, ...] | None
    objective: float | None
    memory: float | None
    min_memory: float
    gap: float | None
    num_variables: int
    num_constraints: int
    seconds: float
    backend: str


def binary_parts(k: int) -> list[int]:
    """Parts whose subset sums are exactly 0..k: 1, 2, 4, ... and the remainder (``7 -> [1, 2, 4]``,
    ``12 -> [1, 2, 4, 5]``): k identical items as O(log k) 0/1 nodes (bounded-knapsack splitting)."""
    parts, p = [], 1
    while k > 0:
        parts.append(min(p, k))
        k -= parts[-1]
        p *= 2
    return parts


def _check_weight(weight) -> int:
    if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) or weight < 1:
        raise BadInput(f"weight must be a positive integer, got {weight!r}")
    return int(weight)


class _Prepared(NamedTuple):
    """What preprocessing leaves for the ILP (costs and memories weighted and folded, edges reduced)."""

    cost: list[np.ndarray]
    mem: list[np.ndarray]
    weighted: dict[tuple[int, int], np.ndarray]  # weighted edges before reduction, for polishing
    edges: dict[tuple[int, int], np.ndarray]     # reduced edges between ILP nodes
    alive: list[int]                             # nodes left for the ILP
    order: list[tuple[int, int | None, list[int]]]  # eliminations, see _eliminate
    limit: float | None                          # memory limit on the ILP nodes, None if not binding
    min_memory: float


def solve(problem: IlpProblem, memory_limit: float | None = None, time_limit_s: float = 10.0,
          backend: str = "highs", linearization: str = "alpa", relative_gap: float = 0.0) -> IlpSolution:
    """Choose one strategy per node minimizing total weighted cost under ``memory_limit`` bytes per device.

    ``time_limit_s`` bounds the solver call; ``backend`` is a key of BACKENDS; ``linearization`` is "alpa" or
    "mccormick" (module docstring); the solver stops once its solution is proven within ``relative_gap``
    of the optimum (deterministic, unlike the time limit).
    """
    if backend not in BACKENDS:
        raise BadInput(f"unknown ILP backend {backend!r}; known: {sorted(BACKENDS)}")
    if linearization not in ("alpa", "mccormick"):
        raise BadInput(f"unknown linearization {linearization!r}; known: alpa, mccormick")
    t0 = time.perf_counter()
    prep = _prepare(problem, memory_limit)
    if memory_limit is not None and prep.min_memory > memory_limit:
        return IlpSolution("infeasible", None, None, None, prep.min_memory, None, 0, 0, time.perf_counter() - t0,
                           backend)
    choice = [0] * len(problem.costs)
    status, gap, nvar, ncon = "optimal", 0.0, 0, 0
    if prep.alive:
        model, s, scale = _build_ilp(prep, backend, linearization)
        status, picks, gap = _run(model, s, scale, time_limit_s, backend, relative_gap)
        nvar, ncon = model.get_num_variables(), model.get_num_linear_constraints()
        if picks is None:
            return IlpSolution(status, None, None, None, prep.min_memory, None, nvar, ncon,
                               time.perf_counter() - t0, backend)
        for v, k in zip(prep.alive, picks):
            choice[v] = k
    for v, u, pick in reversed(prep.order):
        choice[v] = int(pick[choice[u[0]]][choice[u[1]]]) if isinstance(u, tuple) else pick[0 if u is None else choice[u]]
    _polish(problem, prep.weighted, choice, memory_limit)
    objective, memory = problem.evaluate(choice)
    return IlpSolution(status, tuple(choice), objective, memory, prep.min_memory, gap / max(abs(objective), 1e-300),
                       nvar, ncon, time.perf_counter() - t0, backend)


def _prepare(problem: IlpProblem, memory_limit: float | None) -> _Prepared:
    """The exact preprocessing of the module docstring."""
    cost = [w * np.array(c) for c, w in zip(problem.costs, problem.weights)]
    mem = [w * np.array(m) for m, w in zip(problem.memories, problem.weights)]
    min_memory = float(sum(m.min() for m in mem))
    binding = memory_limit is not None and min_memory <= memory_limit < sum(m.max() for m in mem)
    weighted = _weighted_edges(problem)
    edges = _reduce(weighted, cost)
    alive, order = _eliminate(cost, mem, edges, binding)
    fixed = sum(mem[v][pick[0]] if u is None else mem[v].min()   # nodes left without edges, and series-reduced
                for v, u, pick in order if not isinstance(u, int))   # ones (their memory is one number)
    return _Prepared(cost, mem, weighted, edges, alive, order, memory_limit - fixed if binding else None,
                     min_memory)


def _weighted_edges(problem: IlpProblem) -> dict[tuple[int, int], np.ndarray]:
    """Weighted edge matrices keyed (u, v) with u < v, parallel edges summed."""
    out: dict[tuple[int, int], np.ndarray] = {}
    for u, v, r, w in problem.edges:
        r = w * np.array(r)
        if u > v:
            u, v, r = v, u, r.T
        out[(u, v)] = out[(u, v)] + r if (u, v) in out else r
    return out


def _reduce(weighted, cost) -> dict[tuple[int, int], np.ndarray]:
    """Move row then column minima of each edge matrix into node costs; keep the non-zero remainders."""
    out = {}
    for (u, v), r in weighted.items():
        rows = r.min(axis=1)
        cols = (r - rows[:, None]).min(axis=0)
        cost[u] += rows
        cost[v] += cols
        rest = r - rows[:, None] - cols[None, :]
        rest[rest <= _ZERO * np.abs(r).max()] = 0.0
        if rest.any():
            out[(u, v)] = rest
    return out


def _eliminate(cost, mem, edges, binding):
    """Fold nodes with ≤ 2 edges into their neighbours where exact (see module docstring), in place.

    Returns the nodes left for the ILP and the eliminations in order as (v, neighbour or None, pick) with
    ``pick[i]`` v's strategy when the neighbour takes i (``pick[0]`` when there is none), or, for a node
    between two neighbours (series reduction: its edges become one edge between them, the best of v for
    each pair of their strategies; exact when every such best needs v's least memory), as (v, (u, w),
    pick) with ``pick[i][k]`` v's strategy when u takes i and w takes k.
    """
    adj = [set() for _ in cost]
    for u, v in edges:
        adj[u].add(v)
        adj[v].add(u)
    gone = [False] * len(cost)
    order = []

    def matrix(a, b):
        return edges[(a, b)] if a < b else edges[(b, a)].T

    stack = [v for v in range(len(cost) - 1, -1, -1) if len(adj[v]) <= 2]
    while stack:
        v = stack.pop()
        if gone[v] or len(adj[v]) > 2:
            continue
        if len(adj[v]) == 2:
            u, w = sorted(adj[v])
            total = cost[v][None, :, None] + matrix(u, v)[:, :, None] + matrix(v, w)[None, :, :]
            pick = total.argmin(axis=1)
            if binding and (mem[v][pick] > mem[v].min()).any():
                continue
            gone[v] = True
            order.append((v, (u, w), pick))
            edges.pop((min(u, v), max(u, v)))
            edges.pop((min(v, w), max(v, w)))
            merged = total.min(axis=1)
            edges[(u, w)] = edges[(u, w)] + merged if (u, w) in edges else merged
            for a, b in ((u, w), (w, u)):
                adj[a].discard(v)
                adj[a].add(b)
            stack += [w, u]
            continue
        u = next(iter(adj[v]), None)
        total = cost[v][None, :] if u is None else cost[v][None, :] + matrix(u, v)
        pick = [min(range(len(row)), key=lambda j: (row[j], mem[v][j], j)) for row in total]
        if binding and any(mem[v][j] > mem[v].min() for j in pick):
            continue
        gone[v] = True
        order.append((v, u, pick))
        if u is not None:
            cost[u] += total[np.arange(len(pick)), pick]
            mem[u] += mem[v][pick]
            edges.pop((min(u, v), max(u, v)))
            adj[u].discard(v)
            stack.append(u)
    return [v for v in range(len(cost)) if not gone[v]], order


def _build_ilp(prep: _Prepared, backend: str, linearization: str):
    """The MathOpt model over ``prep.alive``; returns (model, s variables per alive node, objective scale)."""
    model = mathopt.Model()
    obj = model.objective
    cost, mem, alive = prep.cost, prep.mem, prep.alive
    scale = max([np.ptp(cost[v]) for v in alive] + [r.max() for r in prep.edges.values()]) or 1.0
    s = {}
    for v in alive:
        s[v] = [model.add_binary_variable() for _ in cost[v]]
        _equal(model, s[v], None)
        for k, x in enumerate(s[v]):
            obj.set_linear_coefficient(x, (cost[v][k] - cost[v].min()) / scale)
    integer_e = backend == "cp-sat"  # CP-SAT rejects continuous variables; e is integral anyway
    for (u, v), r in prep.edges.items():
        if linearization == "alpa":   # over classes of equal rows / columns (exact, fewer variables)
            rows, row_of = np.unique(r, axis=0, return_inverse=True)
            _, col_of = np.unique(rows, axis=1, return_inverse=True)
            cols = [int(np.flatnonzero(col_of == b)[0]) for b in range(col_of.max() + 1)]
            e = [[model.add_variable(lb=0, ub=1, is_integer=integer_e) for _ in cols] for _ in rows]
            for a, row in enumerate(e):
                _equal(model, row, [s[u][i] for i in np.flatnonzero(row_of.ravel() == a)])
            for b in range(len(cols) - 1):  # the last class's constraint follows from the others
                _equal(model, [row[b] for row in e], [s[v][j] for j in np.flatnonzero(col_of.ravel() == b)])
            for a, b in np.ndindex(len(rows), len(cols)):
                obj.set_linear_coefficient(e[a][b], rows[a, cols[b]] / scale)
        else:
            for i, j in zip(*np.nonzero(r)):
                x = model.add_variable(lb=0, ub=1, is_integer=integer_e)
                c = model.add_linear_constraint(lb=-1)
                for y, a in ((x, 1), (s[u][i], -1), (s[v][j], -1)):
                    c.set_coefficient(y, a)
                obj.set_linear_coefficient(x, r[i, j] / scale)
    if prep.limit is not None:
        budget = prep.limit - sum(mem[v].min() for v in alive)  # memory above each node's least
        c = model.add_linear_constraint(ub=1)
        for v in alive:
            for k, x in enumerate(s[v]):
                extra = mem[v][k] - mem[v].min()
                if extra > budget:
                    x.upper_bound = 0
                elif extra:
                    c.set_coefficient(x, extra / budget)
    return model, s, scale


def _equal(model, terms, target) -> None:
    """Constraint Σ terms = Σ target (= 1 when target is None; a variable or a list of them)."""
    c = model.add_linear_constraint(lb=float(target is None), ub=float(target is None))
    for x in terms:
        c.set_coefficient(x, 1)
    for y in [] if target is None else target if isinstance(target, list) else [target]:
        c.set_coefficient(y, -1)


def _run(model, s, scale, time_limit_s, backend, relative_gap=0.0):
    """Solve deterministically; return (status, strategy per alive node or None, absolute gap in seconds)."""
    params = mathopt.SolveParameters(time_limit=timedelta(seconds=time_limit_s), random_seed=0,
                                     relative_gap_tolerance=relative_gap, absolute_gap_tolerance=0.0,
                                     threads=None if backend == "highs" else 1)  # HiGHS refuses `threads`
    result = mathopt.solve(model, BACKENDS[backend], params=params)
    reason = result.termination.reason
    if reason == mathopt.TerminationReason.INFEASIBLE or not result.has_primal_feasible_solution():
        return ("infeasible" if reason == mathopt.TerminationReason.INFEASIBLE else "timeout"), None, None
    picks = [int(np.argmax(result.variable_values(xs))) for xs in s.values()]
    bounds = result.termination.objective_bounds
    gap = max(0.0, bounds.primal_bound - bounds.dual_bound) * scale
    if reason == mathopt.TerminationReason.OPTIMAL:   # within the gap tolerance asked for
        return "optimal", picks, gap if relative_gap else 0.0
    return "feasible", picks, gap


def _polish(problem, weighted, choice, memory_limit) -> None:
    """Move each node, in order, to its lowest-index strategy that raises neither cost nor memory past the limit."""
    incident = [[] for _ in choice]
    for (u, v), r in weighted.items():
        incident[u].append((v, r))
        incident[v].append((u, r.T))
    memory = problem.evaluate(choice)[1]
    for v, (c, m, w) in enumerate(zip(problem.costs, problem.memories, problem.weights)):
        def local(k):
            return w * c[k] + sum(r[k, choice[o]] for o, r in incident[v])
        here = local(choice[v])
        for k in range(choice[v]):
            grow = w * (m[k] - m[choice[v]])
            if local(k) <= here + _ZERO * abs(here) and (memory_limit is None or memory + grow <= memory_limit):
                memory += grow
                choice[v] = k
                break
