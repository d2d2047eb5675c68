"""Piecewise plans: which plan wins where over a range of the sequence length S (or global batch B).

``plan_range(search, lo, hi, step, limit, symbol)`` takes ``search(v, bounds) -> Outcome`` — the search
at one value (the planner runs it on ``search.specialize``: the symbolic capture evaluated at that
point, no tracing), which may skip the configurations ``bounds`` rules out there — and returns the
pieces of the grid ``lo, lo + step, ..., hi`` on which one plan wins, with every breakpoint exact on
the grid:

1. **Probe** a geometric grid (``lo``, ``lo·2``, ``lo·4``, ..., ``hi``).
2. Between two evaluated values with different winners P and Q, **solve** for the crossing: the
   memory of P against the limit when P stops fitting, else the step-time difference of P and Q
   (every search prices every configuration it does not rule out, and the winners of its neighbours
   with their chunkings: ``Bounds.inner``). For one configuration they are polynomials of low degree
   in the varying symbol (FLOPs, bytes and saved activations of the capture are: ``search.symbolic``;
   attention is the S² term) while its inner choices stay put, so the root of the parabola through the
   three evaluated values nearest the bracket closes in at once (exact for a quadratic; extrapolated
   past the left end when the right one did not price P); a kink (an attention variant's exposed
   communication reaching zero, say) makes it bisect.
3. **Confirm** by evaluating the first grid value past the root and, when P does not win there, the
   one before it: the breakpoint is exact when that one gives P (the value past it may give Q or a
   plan between P and Q, whose own breakpoints follow). Otherwise the new value splits the interval and
   step 2 repeats on the part whose ends still differ (every second guess bisects: O(log) at worst),
   until every boundary is between neighbouring grid values.

Every search is **bounded** by the values searched before it (:class:`Bounds`): a configuration (mesh,
ZeRO, microbatch, recompute) only gets slower and hungrier as the symbol grows — more tokens or samples
per step are more work and more activations, for every choice inside it — so one that did not fit at
a smaller value does not fit now, and one whose least step time at a smaller value exceeds the step
time of something of its tier priced here already cannot win now (the winners next to v are priced
first, so that bound is tight early). The search skips those; the winner and its price are what the
full search gives (``tests/test_range.py`` checks it against fresh plans), at a fraction of the
pricing (``bench/run_range.py`` reports how many configurations were skipped). A piece's plan lists
as alternatives the configurations its bounded search priced.

Each piece's step time and memory are then written as polynomials in the symbol, interpolated
through three of its evaluated values and kept only when every other evaluated value of the piece
agrees (``_expressions``). Pieces narrower than the probe spacing whose neighbours agree are not seen
(the probes are ``PROBE_RATIO`` apart); every reported breakpoint is exact on the grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import sympy

PROBE_RATIO = 2


@dataclass
class Outcome:
    """The search at one value: the winner's ``decision`` (hashable: equal decisions are one plan,
    ``None`` when nothing fits), its configuration ``key`` and every priced configuration's (step time
    s, peak memory bytes, fits) in ``costs`` (configurations may be priced at two levels of detail, e.g.
    one attention variant and the mesh's best: ``family``). ``configs`` holds what :class:`Bounds` reads:
    per priced configuration (a tuple, its tier first) the least step time of any of its choices and
    whether its memory fits; ``config`` is the winner's."""

    decision: object
    key: object = None
    costs: dict = field(default_factory=dict)
    reason: str = ""                             # why nothing fits (decision None)
    family: object = None                        # a coarser configuration of ``key`` (its best variant)
    configs: dict = field(default_factory=dict)
    config: tuple | None = None
    skipped: int = 0                             # configurations the bounded search did not price
    inner: object = None                         # the winner's choice inside its configuration (chunking)

    @property
    def cost(self) -> tuple[float, float, bool] | None:
        return self.costs.get(self.key)

    def price(self, other: "Outcome") -> tuple[float, float, bool] | None:
        """``other``'s winning configuration priced here: its own key, else its family's best."""
        if other.key is None:
            return None
        return self.costs.get(other.key) or self.costs.get(other.family)


@dataclass
class Bounds:
    """What the values searched so far prove about value v (module docstring): ``dead`` configurations
    did not fit in memory at a smaller value and ``floor`` is each one's least step time at a smaller value;
    ``best`` per tier is the fastest fitting step time priced at v so far (:meth:`saw`). The search
    prices ``keep`` (the winners next to v) in a first pass (:meth:`passes`), so that ``best`` is tight
    before the others are judged. ``only`` (when set) restricts a search to those configurations.
    ``inner``: the neighbours' winning choices inside their configurations (``Outcome.inner``), which
    the search prices at v too, so that a breakpoint where only that choice changes (one more chunk)
    has both sides' costs for step 2."""

    floor: dict = field(default_factory=dict)
    dead: set = field(default_factory=set)
    best: dict = field(default_factory=dict)
    keep: frozenset = frozenset()
    only: frozenset | None = None
    inner: dict = field(default_factory=dict)   # configuration -> the neighbours' inner choices to price too
    skipped: int = 0

    def passes(self) -> list["Bounds"]:
        """The passes a search makes over its configurations: ``keep`` only first (sharing ``best``), then
        the rest."""
        return [Bounds(best=self.best, only=self.keep, inner=self.inner), self] if self.keep else [self]

    def skip(self, config: tuple) -> bool:
        """Whether the search leaves ``config`` out at v (those ruled out are counted in ``skipped``)."""
        if self.only is not None:
            return config not in self.only
        if config in self.keep:
            return True  # priced by the first pass
        out = config in self.dead or self.floor.get(config, -math.inf) > self.best.get(config[0], math.inf)
        self.skipped += out
        return out

    def saw(self, config: tuple, step_time: float, fits: bool) -> None:
        """A configuration priced at v: when it fits, nothing slower in its tier can win."""
        if fits:
            self.best[config[0]] = min(self.best.get(config[0], math.inf), step_time)


@dataclass
class Breakpoint:
    at: int                      # the first value of the right piece
    cause: str                   # "memory" | "time" | "plan"
    left: tuple | None           # the left plan's configuration (time, memory, fits) at ``at``
    right: tuple | None          # the right plan's at ``at``


@dataclass
class Piece:
    lo: int
    hi: int                      # the next piece's lo - 1: off-grid values belong to the piece on their left
    outcome: Outcome             # at lo
    step_time: sympy.Expr | None = None   # of the varying symbol, where interpolation was confirmed
    memory: sympy.Expr | None = None


@dataclass
class RangeResult:
    pieces: list[Piece]
    breakpoints: list[Breakpoint]
    evaluated: dict[int, Outcome]   # every value searched, in order


def plan_range(search: Callable[[int, Bounds], Outcome], lo: int, hi: int, step: int, limit: float,
               symbol: sympy.Symbol) -> RangeResult:
    """Pieces of ``lo..hi`` (grid ``step``) by the procedure of the module docstring; ``limit``: bytes
    per device the plans must fit."""
    seen: dict[int, Outcome] = {}

    def at(v: int) -> Outcome:
        if v not in seen:
            seen[v] = search(v, _bounds(seen, v))
        return seen[v]

    probes = _probes(lo, hi, step)
    for v in probes:
        at(v)
    misses: dict[int, int] = {}  # per probe interval, guesses that did not close a boundary: every second bisects
    while True:
        values = sorted(seen)
        open_ = [(x, y) for x, y in zip(values, values[1:]) if y - x > step and seen[x].decision != seen[y].decision]
        if not open_:
            break
        x, y = open_[0]
        origin = max(p for p in probes if p <= x)
        g = _guess(seen, x, y, step, limit, bisect=misses.get(origin, 0) % 2 == 1)
        if at(g).decision != seen[x].decision and g - step > x:
            at(g - step)  # the other side of the root: closes a boundary of P when the root was right
        closed = g - step in seen and seen[g - step].decision == seen[x].decision != seen[g].decision
        misses[origin] = 0 if closed else misses.get(origin, 0) + 1
    values = sorted(seen)
    starts = [values[0]] + [y for x, y in zip(values, values[1:]) if seen[x].decision != seen[y].decision]
    ends = [s - 1 for s in starts[1:]] + [hi]  # values between grid points belong to the piece on their left
    pieces = [Piece(s, e, seen[s]) for s, e in zip(starts, ends)]
    for p in pieces:
        p.step_time, p.memory = _expressions(seen, p, symbol)
    for s in starts[1:]:  # the left plan priced where the right one takes over, if that search skipped it
        left, right = seen[s - step], seen[s]
        if left.config is not None and right.price(left) is None:
            right.costs = {**search(s, Bounds(only=frozenset({left.config}))).costs, **right.costs}
    breaks = [_breakpoint(seen, s, step) for s in starts[1:]]
    return RangeResult(pieces, breaks, dict(sorted(seen.items())))


def _bounds(seen: dict[int, Outcome], v: int) -> Bounds:
    """What the smaller searched values prove about ``v`` (:class:`Bounds`), keeping the winners of its
    neighbours. (A configuration that fits at a larger value is not an upper bound at v: it may not
    exist there — a microbatch size that does not divide the batch, a sequence-parallel degree that
    leaves too few tokens per rank.)"""
    b = Bounds()
    for u, o in seen.items():
        if u < v:
            for config, (least, fits) in o.configs.items():
                b.floor[config] = max(b.floor.get(config, -math.inf), least)
                if not fits:
                    b.dead.add(config)
    below, above = [u for u in seen if u < v], [u for u in seen if u > v]
    near = ([max(below)] if below else []) + ([min(above)] if above else [])
    b.keep = frozenset(seen[u].config for u in near if seen[u].config is not None)
    for u in near:
        if seen[u].config is not None and seen[u].inner is not None:
            b.inner.setdefault(seen[u].config, set()).add(seen[u].inner)
    return b


def _probes(lo: int, hi: int, step: int) -> list[int]:
    out, v = {lo, hi}, lo
    while v * PROBE_RATIO < hi:
        v *= PROBE_RATIO
        out.add(_snap(v, lo, step))
    return sorted(out)


def _snap(v: float, lo: int, step: int) -> int:
    return lo + int(round((v - lo) / step)) * step


def _guess(seen: dict[int, Outcome], x: int, y: int, step: int, limit: float, bisect: bool) -> int:
    """The grid value in (x, y] where the winner P of ``x`` should stop winning: the first one past the
    root of P's memory minus the limit (P stops fitting) or else of P's step time minus that of the
    winner Q of ``y`` (Q gets faster), both polynomials of low degree in the varying symbol within a
    configuration: the root of the parabola (or line) through the three (two) evaluated values nearest
    the bracket where that difference is known — past x when y did not price P (extrapolated). The
    midpoint when ``bisect`` or when no root falls in the bracket."""
    left, right = seen[x], seen[y]
    root = None
    if not bisect and left.cost and left.cost[2]:
        def memory(o: Outcome):
            p = o.price(left)
            return p[1] - limit if p else None

        def time(o: Outcome):
            p, q = o.price(left), o.price(right)
            return p[0] - q[0] if p and q and p[2] and q[2] else None

        for gap in (memory, time):
            fx = gap(left)
            if fx is not None and fx <= 0:
                known = [(u, f) for u in seen if (f := gap(seen[u])) is not None]
                near = sorted(known, key=lambda uf: (max(x - uf[0], uf[0] - y, 0), uf[0]))[:3]
                root = _root(sorted(near), x, y)
                if root is not None:
                    break
    root = root if root is not None else (x + y) / 2
    return min(max(x + math.ceil((root - x) / step) * step, x + step), y)


def _root(points: list[tuple[float, float]], x: float, y: float) -> float | None:
    """The first root in (x, y] of the parabola (line, for two points) through ``points``; None if none."""
    if len(points) < 2:
        return None
    if len(points) == 3:
        (u0, f0), (u1, f1), (u2, f2) = points
        d01, d12 = (f1 - f0) / (u1 - u0), (f2 - f1) / (u2 - u1)
        a = (d12 - d01) / (u2 - u0)                   # f(u) = a u² + b u + c
        b = d01 - a * (u0 + u1)
        c = f0 - a * u0 * u0 - b * u0
    else:
        (u0, f0), (u1, f1) = points
        a, b = 0.0, (f1 - f0) / (u1 - u0)
        c = f0 - b * u0
    if abs(a) * (y - x) ** 2 <= 1e-12 * max(abs(b) * (y - x), abs(c), 1.0):  # a line
        roots = [-c / b] if b else []
    else:
        disc = b * b - 4 * a * c
        roots = [(-b + sgn * math.sqrt(disc)) / (2 * a) for sgn in (1, -1)] if disc >= 0 else []
    inside = sorted(r for r in roots if x < r <= y)
    return inside[0] if inside else None


def _expressions(seen: dict[int, Outcome], piece: Piece, symbol: sympy.Symbol):
    """(step time, memory) of the piece's configuration as polynomials in ``symbol`` interpolated
    through three of its evaluated values and confirmed at every other one (relative 1e-6); None
    where that does not hold or fewer than four values priced it. Values next to the piece where its
    plan was priced too (a neighbour's search prices it: ``Bounds``) make up the four when the piece
    holds fewer: the same plan has the same cost function there, and a kink fails the confirmation."""
    key = piece.outcome.key
    priced = [u for u in seen if seen[u].costs.get(key)] if key is not None else []
    inside = sorted(u for u in priced if piece.lo <= u <= piece.hi)
    outside = sorted((u for u in priced if not piece.lo <= u <= piece.hi),
                     key=lambda u: (max(piece.lo - u, u - piece.hi), u))
    inside = sorted(inside + outside[:max(0, 4 - len(inside))])
    if len(inside) < 4:
        return None, None
    out = []
    for i in (0, 1):
        pick = [inside[0], inside[len(inside) // 2], inside[-1]]
        f = sympy.interpolate([(sympy.Integer(u), sympy.Float(seen[u].costs[key][i])) for u in pick], symbol)
        ok = all(math.isclose(float(f.subs(symbol, u)), seen[u].costs[key][i], rel_tol=1e-6) for u in inside)
        out.append(sympy.expand(f) if ok else None)
    return tuple(out)


def _breakpoint(seen: dict[int, Outcome], at: int, step: int) -> Breakpoint:
    """Why the winner changes at ``at``: both plans priced there (the left one no longer fits, or is
    slower, or the difference is inside the configuration: ILP picks, stages)."""
    left, right = seen[at - step], seen[at]
    lost = right.price(left)
    if left.key is not None and (lost is None or not lost[2]):
        cause = "memory"
    elif right.key is not None and right.cost[0] < lost[0]:
        cause = "time"
    else:
        cause = "plan"
    return Breakpoint(at, cause, lost, right.cost)
