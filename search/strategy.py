"""ILP strategy search: which tensor-parallel cones to shard, for one (dp, tp, ZeRO, microbatch, recompute).

Each choice of the :class:`search.space.Space` (one cone position of a template, or a cone outside
repeated blocks) is an ILP node whose strategy ``n`` shards its first ``n`` instances. Instances are
identical, so the count is all that matters and the folded ILP has the optimum of the per-instance
one. Cost and memory coefficients are the exact differences the cost model prices for one instance
(``price({key: 1}) - price({})``): step time and per-device memory are affine in the work of the
sharded cones, except the largest-block term under full recompute, which the final exact pricing of
the chosen layout settles. Pricing runs once per choice, not once per instance: with folding the
search cost depends on the number of templates, not on depth.
"""
from __future__ import annotations

from typing import Callable

from search.baseline import Candidate
from search.ilp import IlpProblem, solve
from search.space import Space

TIME_LIMIT_S = 10.0


def ilp_select(space: Space, price: Callable[[dict[str, int]], Candidate], limit: float) -> Candidate:
    """The cheapest cones to shard that fit ``limit`` bytes per device, priced exactly."""
    base = price({})
    if not space.choices:
        base.solver = {"status": "optimal", "gap": 0.0, "variables": 0}
        return base
    problem = IlpProblem()
    for choice in space.choices:
        one = price({choice.key: 1})
        dt, dm = one.step_time_s - base.step_time_s, one.peak_memory - base.peak_memory
        counts = range(choice.instances + 1)
        problem.add_node([n * dt for n in counts], [n * dm for n in counts])
    sol = solve(problem, memory_limit=limit - base.peak_memory, time_limit_s=TIME_LIMIT_S)
    if sol.choice is None:  # nothing fits: report the leanest layout (priced, infeasible)
        counts = [min(range(len(m)), key=m.__getitem__) for m in problem.memories]
    elif not any(sol.choice):  # sharding nothing would replicate the model tp ways: that is dp=1, not tp
        counts = [c.instances for c in space.choices]
    else:
        counts = sol.choice
    cand = price({c.key: n for c, n in zip(space.choices, counts)})
    cand.solver = {"status": sol.status, "gap": sol.gap or 0.0, "variables": sum(len(c) for c in problem.costs)}
    return cand
