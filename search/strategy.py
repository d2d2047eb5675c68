"""ILP strategy search: which tensor-parallel cones to shard, for one (dp, tp, ZeRO, microbatch, recompute).

Each choice of the :class:`search.space.Space` (one cone position of a template, or a cone outside
repeated blocks) shards its first ``n`` instances. Instances are identical, so the count is all that
matters and the folded ILP has the optimum of the per-instance one. The count is encoded in binary
(bounded-knapsack splitting: parts 1, 2, 4, …, and a remainder, each a 0/1 ILP node), so a choice
over k instances costs O(log k) ILP nodes. Cost and memory coefficients are the exact differences the cost model prices for one instance
(``price({key: 1}) - price({})``): step time and per-device memory are affine in the work of the
sharded cones, except the largest-block terms under full and selective recompute, which the final exact pricing of
the chosen layout settles. Pricing runs once per choice, not once per instance: with folding the
search cost depends on the number of templates, not on depth.
"""
from __future__ import annotations

from typing import Callable

from search.candidate import Candidate
from search.ilp import IlpProblem, binary_parts, solve
from search.space import Space

TIME_LIMIT_S = 10.0


def ilp_select(space: Space, price: Callable[[dict[str, int]], Candidate], limit: float) -> Candidate:
    """The cheapest cones to shard that fit ``limit`` bytes per device, priced exactly."""
    base = price({})
    if not space.choices:
        base.solver = {"status": "optimal", "gap": 0.0, "variables": 0}
        return base
    problem, parts = IlpProblem(), []
    for choice in space.choices:
        one = price({choice.key: 1})
        dt, dm = one.step_time_s - base.step_time_s, one.peak_memory - base.peak_memory
        for part in binary_parts(choice.instances):
            problem.add_node([0.0, part * dt], [0.0, part * dm])
            parts.append((choice.key, part))
    sol = solve(problem, memory_limit=limit - base.peak_memory, time_limit_s=TIME_LIMIT_S)
    if sol.choice is None:  # nothing fits: report the leanest layout (priced, infeasible)
        picked = [int(m[1] < m[0]) for m in problem.memories]
    elif not any(sol.choice):  # sharding nothing would replicate the model tp ways: that is dp=1, not tp
        picked = [1] * len(parts)
    else:
        picked = sol.choice
    counts: dict[str, int] = {}
    for (key, part), on in zip(parts, picked):
        counts[key] = counts.get(key, 0) + part * on
    cand = price(counts)
    # Megatron-SP applies to the full layout only (not linear in the cones): compare with it; when the
    # ILP found nothing that fits, the full layout with Megatron-SP may still fit ("full-layout")
    full = price(space.all_sharded())
    if full.feasible and (not cand.feasible or full.step_time_s < cand.step_time_s):
        cand = full
    status = "full-layout" if sol.choice is None and cand.feasible else sol.status
    cand.solver = {"status": status, "gap": sol.gap or 0.0, "variables": sum(len(c) for c in problem.costs)}
    return cand
