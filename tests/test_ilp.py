"""search.ilp against brute-force enumeration, plus weights, determinism, preprocessing and a 2000-node chain."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from search.errors import BadInput
from search.ilp import BACKENDS, IlpProblem, solve


def random_problem(seed: int, n: int, max_k: int = 4) -> IlpProblem:
    """Random weighted DAG: costs in [0, 1), integer memories, some zero / additive / parallel / reversed edges."""
    rng = np.random.default_rng(seed)
    p = IlpProblem()
    for _ in range(n):
        k = int(rng.integers(1, max_k + 1))
        p.add_node(rng.random(k), rng.integers(0, 50, k), weight=int(rng.integers(1, 4)))
    for v in range(1, n):
        for u in rng.choice(v, size=min(v, int(rng.integers(1, 3))), replace=False):
            ku, kv = len(p.costs[u]), len(p.costs[v])
            kind = rng.integers(0, 4)
            matrix = {0: rng.random((ku, kv)), 1: np.zeros((ku, kv)),
                      2: rng.random(ku)[:, None] + rng.random(kv)[None, :],
                      3: rng.random((ku, kv)) * (rng.random((ku, kv)) < 0.5)}[int(kind)]
            w = int(rng.integers(1, 4))
            if rng.random() < 0.2:
                p.add_edge(v, int(u), matrix.T, weight=w)
            else:
                p.add_edge(int(u), v, matrix, weight=w)
    return p


def brute_force(p: IlpProblem, limit):
    """(best objective or None, least memory) by enumerating every assignment, vectorized."""
    ks = [len(c) for c in p.costs]
    idx = np.indices(ks).reshape(len(ks), -1)
    cost = sum(w * np.array(c)[idx[v]] for v, (c, w) in enumerate(zip(p.costs, p.weights)))
    cost = cost + sum(w * np.array(r)[idx[u], idx[v]] for u, v, r, w in p.edges)
    mem = sum(w * np.array(m)[idx[v]] for v, (m, w) in enumerate(zip(p.memories, p.weights)))
    ok = np.ones(idx.shape[1], bool) if limit is None else mem <= limit
    return (float(cost[ok].min()) if ok.any() else None), float(mem.min())


def limit_for(p: IlpProblem, mode: int, rng) -> float | None:
    """None, a limit some assignment meets exactly + 0.5, or one below the least memory."""
    if mode == 0:
        return None
    choice = [int(rng.integers(len(c))) for c in p.costs]
    memory = p.evaluate(choice)[1]
    return memory + 0.5 if mode == 1 else sum(w * min(m) for m, w in zip(p.memories, p.weights)) - 0.5


def check_against_brute_force(p, limit, **kw):
    sol = solve(p, memory_limit=limit, **kw)
    best, least = brute_force(p, limit)
    assert sol.min_memory == pytest.approx(least)
    if best is None:
        assert sol.status == "infeasible" and sol.choice is None
        return sol
    assert sol.status == "optimal"
    assert sol.objective == pytest.approx(best, rel=1e-6, abs=1e-9)
    assert (sol.objective, sol.memory) == pytest.approx(p.evaluate(sol.choice))
    assert limit is None or sol.memory <= limit
    return sol


@settings(max_examples=150, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), mode=st.sampled_from([0, 1, 1, 2]))
def test_matches_brute_force(seed, n, mode):
    p = random_problem(seed, n, max_k=4 if n <= 7 else 3)
    check_against_brute_force(p, limit_for(p, mode, np.random.default_rng(seed + 1)))


@pytest.mark.parametrize("backend,linearization", [(b, "alpa") for b in BACKENDS] + [("highs", "mccormick")])
def test_backends_and_linearizations(backend, linearization):
    for seed in range(8):
        p = random_problem(seed, 9, max_k=3)
        check_against_brute_force(p, limit_for(p, 1, np.random.default_rng(seed)), backend=backend,
                                  linearization=linearization)


def test_weights_count_instances():
    """A node of weight 3 costs what three tied copies cost; the weight can flip the choice."""
    heavy, light = IlpProblem(), IlpProblem()
    for p, w in ((heavy, 3), (light, 1)):
        a = p.add_node([1.0, 0.0], [0, 0], weight=w)   # strategy 1 is cheaper per instance ...
        b = p.add_node([0.0, 0.0], [0, 0])
        p.add_edge(a, b, [[0.0, 0.0], [2.5, 2.5]])      # ... but its resharding is paid once
    assert solve(light).choice == (0, 0) and solve(light).objective == pytest.approx(1.0)
    assert solve(heavy).choice == (1, 0) and solve(heavy).objective == pytest.approx(2.5)
    edge = IlpProblem()
    a, b = edge.add_node([0.0, 1.0], [0, 0]), edge.add_node([0.0, 1.0], [0, 0])
    edge.add_edge(a, b, [[0.0, 0.0], [0.0, 0.0]])
    edge.add_edge(a, b, [[0.4, 0.0], [0.0, 0.0]], weight=3)  # (0, 0) costs 1.2, not 0.4
    assert solve(edge).objective == pytest.approx(1.0)


def test_deterministic_and_ties_go_to_lower_index():
    """Every strategy is duplicated (pairs 2i, 2i+1 identical): the chosen index is always the even one."""
    rng = np.random.default_rng(7)
    p = IlpProblem()
    for _ in range(60):
        c, m = rng.random(2), rng.integers(0, 50, 2)
        p.add_node(np.repeat(c, 2), np.repeat(m, 2))
    for v in range(1, 60):
        for u in {v - 1, int(rng.integers(v))}:
            p.add_edge(u, v, np.repeat(np.repeat(rng.random((2, 2)), 2, axis=0), 2, axis=1))
    limit = p.evaluate([0] * 60)[1] + 0.5
    first, second = solve(p, memory_limit=limit), solve(p, memory_limit=limit)
    assert first.status == "optimal" and first.num_variables > 0
    assert first.choice == second.choice
    assert all(k % 2 == 0 for k in first.choice)


def test_additive_and_zero_edges_get_no_edge_variables():
    rng = np.random.default_rng(3)
    p = IlpProblem()
    for _ in range(5):
        p.add_node(rng.random(3), [20, 10, 0])  # the binding limit keeps nodes in the ILP
    for u, v in [(0, 1), (1, 2), (2, 3), (3, 4), (0, 4), (1, 3)]:
        p.add_edge(u, v, rng.random(3)[:, None] + rng.random(3)[None, :] if u else np.zeros((3, 3)))
    sol = check_against_brute_force(p, 45.0)
    assert 0 < sol.num_variables <= 15  # only one-hot s variables


def test_tiny_resharding_costs_next_to_large_ones_count():
    """A 2e-6 s entry beside a 1 s entry of the same matrix still decides: (1, 1, ·) beats (0, 1, ·)."""
    for clique in (False, True):  # a pair is solved by elimination, four all linked (degree 3) by the ILP
        p = IlpProblem()
        a, b = p.add_node([0.0, 1e-6], [0, 0]), p.add_node([1.5e-6, 0.0], [0, 0])
        p.add_edge(a, b, [[0.0, 2e-6], [1.0, 0.0]])
        if clique:
            c, d = p.add_node([0.0, 0.0], [0, 0]), p.add_node([0.0, 0.0], [0, 0])
            for u, v in ((a, c), (b, c), (a, d), (b, d), (c, d)):
                p.add_edge(u, v, [[1e-7, 0.0], [0.0, 1e-7]])
        sol = solve(p)
        assert (sol.num_variables > 0) == clique
        assert sol.objective == pytest.approx(brute_force(p, None)[0], rel=1e-9)


def test_scale_invariance():
    """Seconds around 1e-9 and bytes around 1e10 give the same choice as unit-sized numbers."""
    for seed in range(5):
        p = random_problem(seed, 10, max_k=3)
        limit = limit_for(p, 1, np.random.default_rng(seed))
        q = IlpProblem([[c * 1e-9 for c in cs] for cs in p.costs], [[m * 1e9 for m in ms] for ms in p.memories],
                       p.weights, [(u, v, [[x * 1e-9 for x in row] for row in r], w) for u, v, r, w in p.edges])
        assert solve(q, memory_limit=limit * 1e9).choice == solve(p, memory_limit=limit).choice


def chain(n: int, k: int, seed: int) -> IlpProblem:
    rng = np.random.default_rng(seed)
    p = IlpProblem()
    for v in range(n):
        p.add_node(rng.random(k), rng.integers(10, 100, k))
        if v:
            p.add_edge(v - 1, v, rng.random((k, k)) * (1 - np.eye(k)))
    return p


def viterbi(p: IlpProblem) -> float:
    best = np.array(p.costs[0])
    for u, v, r, _ in p.edges:
        best = (best[:, None] + np.array(r)).min(axis=0) + np.array(p.costs[v])
    return float(best.min())


def test_chain_2000_nodes():
    p = chain(2000, 4, seed=0)
    free = solve(p)
    assert free.status == "optimal" and free.objective == pytest.approx(viterbi(p), rel=1e-9)
    limit = 0.5 * (free.memory + free.min_memory)
    tight = solve(p, memory_limit=limit, time_limit_s=60)
    assert tight.status == "optimal" and tight.num_variables > 8000
    assert tight.memory <= limit and tight.objective >= free.objective


def test_time_limit_reports_status():
    p = chain(2000, 4, seed=1)
    sol = solve(p, memory_limit=p.evaluate([0] * 2000)[1], time_limit_s=0.001)
    assert sol.status in ("timeout", "feasible", "optimal")
    assert (sol.choice is None) == (sol.status == "timeout")


@pytest.mark.parametrize("call", [
    lambda p: p.add_node([], []),
    lambda p: p.add_node([1.0], [1.0, 2.0]),
    lambda p: p.add_node([1.0], [1.0], weight=0),
    lambda p: p.add_edge(0, 0, [[0.0]]),
    lambda p: p.add_edge(0, 1, [[0.0, 1.0]]),
    lambda p: solve(p, backend="gurobi"),
])
def test_bad_input(call):
    p = IlpProblem()
    p.add_node([1.0], [1.0])
    p.add_node([1.0], [1.0])
    with pytest.raises(BadInput):
        call(p)
