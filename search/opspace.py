"""Per-op strategy search (Alpa's intra-op ILP): one placement per op on every mesh axis, resharding
priced per edge, a memory limit, solved once per repeated block (TAPAS).

Every op's strategies are the product over the mesh axes of its one-axis options (``search.oprules``),
kept where every sharded dim divides. A strategy costs its compute (work divided over the axes it
splits) and the gradient sync of the parameters it reads (a weight replicated on an axis the op splits
gets a partial gradient: all-reduced there, as data parallelism does); its memory is its saved
activations over the output's shards plus the parameters' states (params, grads, Adam) over theirs.
An edge u -> v costs the forward reshard of u's output into v's input placement and the backward
reshard of v's input gradient into the placement u's backward needs (per axis: all-gather,
all-reduce, reduce-scatter or all-to-all, DESIGN §4, on the link the axis spans). A value read by
several ops that need its gradient goes through a *hub*: one placement for the readers (one gather
for all of them) and one placement where their gradients are summed (partial sums add up for free,
then one all-reduce), as autograd does; a parameter read by several ops (tied embeddings) is a hub
whose states and final gradient sync it pays itself. Values that depend on no input and no parameter
(position tables, masks) are replicated constants and cost nothing.

Folding: nodes of every instance of a template share one ILP variable, weighted by the instances;
the graph walked is the folding's excerpt (``search.fold.excerpt``: the blocks' first, second and
last instances, the second weighted for the ones it stands for), so building and solving the ILP
costs O(template + nodes outside blocks), not O(depth). ``no_fold`` gives every node its own variable.
Under a memory limit one strategy for every block is not enough: the unfolded optimum shards some
blocks more than others to fill memory. There the k instances are split into runs of 1, 2, 4, ...
instances (the remainder last: ``search.ilp.binary_parts``), each run with its own variables and the
edges between runs priced, so any n of k blocks can take one strategy and the rest another, at
O(template × log k) variables.

    >>> from examples.zoo import build
    >>> from planner.capture import capture
    >>> from search.cluster import get_cluster
    >>> mg = capture(*build("gpt2-small", batch=8))
    >>> sol = solve_ops(mg, fold(mg), (2, 4), get_cluster("a100-80g", 8), dtype="bf16")
    >>> [describe(sol.param_placements[f"blocks.0.mlp.{m}.weight"]) for m in ("fc", "proj")]   # Megatron on tp
    ['R,S0', 'R,S1']
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.fx as fx

from search import cost
from search.baseline import check_degrees, divisors, dtype_scale
from search.candidate import DTYPE_BYTES, Candidate
from search.cluster import Cluster, normalize_dtype
from search.errors import BadInput
from search.fold import Folding, excerpt, fold
from search.graph import ModelGraph
from search.ilp import IlpProblem, binary_parts, solve
from search.memory import model_state_bytes
from search.oprules import P, R, Option, name, options, shape_of, tensor_inputs
from search.placement import op_name
from search.saved import annotate_saved
from search.space import backward_transient, node_work

TIME_LIMIT_S = 30.0
RELATIVE_GAP = 1e-3   # the ILP stops within 0.1% of the optimum (deterministic; the gap is written to the plan)
SKIP = {"_assert_tensor_metadata"}   # asserts on fake tensors: no value, dropped when emitted


@dataclass(frozen=True)
class Strategy:
    """One op's placement on every mesh axis (per axis: ``R``, ``P`` or a dim; see ``search.oprules``)."""

    out: tuple
    ins: tuple              # per tensor input slot: a per-axis tuple
    grads: tuple            # per slot: where its gradient arrives, per axis
    split: tuple            # per axis: the work is divided

    def work_div(self, mesh: tuple) -> int:
        return math.prod(n for n, s in zip(mesh, self.split) if s)


@dataclass
class OpSolution:
    """The ILP's choice on one mesh: a strategy per node and what it costs per device per step."""

    mesh: tuple
    strategies: dict[str, Strategy]          # node name -> strategy (every instance of a block)
    param_placements: dict[str, tuple]       # parameter FQN -> its placement per axis
    step_time_s: float
    breakdown: dict                          # seconds: compute, forward / backward resharding, gradient sync
    memory: dict                             # bytes per device: params, grads, optimizer, activations
    comm_bytes: float                        # bytes one device sends per step
    solver: dict                             # status, gap, variables
    warnings: list[str] = field(default_factory=list)

    @property
    def peak_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def feasible(self) -> bool:
        return self.solver["status"] in ("optimal", "feasible")

    def placements(self) -> dict:
        """The plan's ``placements`` section: per node its output and input placements, per value read by
        several ops its hub (where its readers take it, where their gradients are summed), per parameter
        its placement (strings, graph order)."""
        nodes, hubs = {}, {}
        for key, s in self.strategies.items():
            if key.startswith("hub:"):
                hubs[key[4:]] = {"at": describe(s.out), "grad": describe(s.grads[0])}
            else:
                nodes[key] = {"out": describe(s.out), "in": [describe(i) for i in s.ins]}
        return {"nodes": nodes, "hubs": hubs, "params": {k: describe(v) for k, v in self.param_placements.items()}}


def value_specs(shape: tuple, mesh: tuple) -> list[tuple]:
    """Every placement of a value of ``shape``: per axis R or a dim it divides (jointly), R first."""
    per_axis = [[R] + [d for d, s in enumerate(shape) if s > 1 and s % n == 0] if n > 1 else [R] for n in mesh]
    return [spec for spec in itertools.product(*per_axis) if _divides(spec, shape, mesh)]


def _divides(spec: tuple, shape: tuple | None, mesh: tuple) -> bool:
    if shape is None:
        return True
    for d in {p for p in spec if isinstance(p, int)}:
        if d >= len(shape) or shape[d] % math.prod(n for n, p in zip(mesh, spec) if p == d):
            return False
    return True


def strategies(opts: list[Option], in_shapes: list, out_shape, mesh: tuple) -> list[Strategy]:
    """The product of ``opts`` over the axes of ``mesh`` (an axis of size 1 takes only the replicated
    option), kept where every sharded dim divides; duplicates dropped, order deterministic."""
    per_axis = [opts if n > 1 else opts[:1] for n in mesh]
    got, seen = [], set()
    for combo in itertools.product(*per_axis):
        ins = tuple(tuple(o.ins[j] for o in combo) for j in range(len(in_shapes)))
        out = tuple(o.out for o in combo)
        s = Strategy(out, ins, tuple(tuple(o.grad(j) for o in combo) for j in range(len(in_shapes))),
                     tuple(o.split for o in combo))
        if (s.out, s.ins) in seen or not _divides(out, out_shape, mesh) or \
                not all(_divides(i, sh, mesh) for i, sh in zip(ins, in_shapes)):
            continue
        seen.add((s.out, s.ins))
        got.append(s)
    return got


def need(spec: tuple) -> tuple:
    """Where a value's gradient must arrive for its producer's backward: sharded like the value, else whole."""
    return tuple(p if isinstance(p, int) else R for p in spec)


class Pricer:
    """Seconds and bytes of reshards on one mesh of one cluster (cached by sizes)."""

    def __init__(self, mesh: tuple, cl: Cluster):
        self.mesh, self.cl = mesh, cl
        self.spans = tuple(cost.group_spans_nodes(mesh, a, cl.devices_per_node) for a in range(len(mesh)))
        self.reshard = lru_cache(maxsize=None)(self._reshard)

    def _reshard(self, src: tuple, dst: tuple, nbytes: float) -> tuple[float, float]:
        """(seconds, bytes sent per device) to turn placement ``src`` into ``dst`` for a value of
        ``nbytes`` (whole), one :func:`reshard_steps` move at a time (the emission runs the same moves)."""
        local = nbytes / math.prod(n for n, p in zip(self.mesh, src) if isinstance(p, int))
        secs = sent = 0.0
        for a, s, d in reshard_steps(src, dst, self.mesh):
            n = self.mesh[a]
            if d == P or (s == R and isinstance(d, int)):   # a local slice (or a replica read as partial)
                if isinstance(d, int):
                    local /= n
                continue
            if isinstance(s, int) and d == R:
                kind, full = "all_gather", local * n
                local *= n
            elif s == P and d == R:
                kind, full = "all_reduce", local
            elif s == P:
                kind, full = "reduce_scatter", local
                local /= n
            else:   # a dim to another dim
                kind, full = "all_to_all", local
            secs += cost.collective_time(kind, full, n, self.cl, spans_nodes=self.spans[a])
            sent += cost.bytes_sent_per_rank(kind, full, n)
        return secs, sent


def reshard_steps(src: tuple, dst: tuple, mesh: tuple) -> list[tuple[int, object, object]]:
    """The one-axis moves ``(axis, from, to)`` that turn placement ``src`` into ``dst``: axes that
    shrink the local tensor first, the others after, each by one collective (or a local slice) on
    its axis. A dim sharded by several axes is nested outer to inner (DTensor's order), so an axis
    moves only once no later axis shards a dim it moves from or to: such inner shards are gathered
    first and sliced again when their turn comes.

    >>> reshard_steps((R, 1), (R, 2), (2, 4))     # one all-to-all on the inner axis
    [(1, 1, 2)]
    >>> reshard_steps((2, 2), (0, 2), (2, 2))     # the inner shard of dim 2 is gathered first
    [(1, 2, 'R'), (0, 2, 0), (1, 'R', 2)]
    """
    cur, steps = list(src), []

    def move(a: int, d):
        dims = {x for x in (cur[a], d) if isinstance(x, int)}
        for b in range(a + 1, len(mesh)):
            if mesh[b] > 1 and cur[b] in dims:
                steps.append((b, cur[b], R))
                cur[b] = R
        steps.append((a, cur[a], d))
        cur[a] = d

    for a in sorted(range(len(mesh)), key=lambda a: (not isinstance(dst[a], int), a)):
        if cur[a] != dst[a] and mesh[a] > 1:
            move(a, dst[a])
    for a in range(len(mesh)):   # inner axes gathered above go back where they belong
        if cur[a] != dst[a] and mesh[a] > 1:
            move(a, dst[a])
    return steps


def _value_bytes(node: fx.Node) -> float:
    v = node.meta.get("val")
    if isinstance(v, (list, tuple)):
        return float(sum(x.numel() * x.element_size() for x in v if isinstance(x, torch.Tensor)))
    return float(v.numel() * v.element_size()) if isinstance(v, torch.Tensor) else 0.0


def _float(node: fx.Node) -> bool:
    v = node.meta.get("val")
    if isinstance(v, (list, tuple)):
        v = next((x for x in v if isinstance(x, torch.Tensor)), None)
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


class _Graph:
    """The facts the ILP needs of the graph it walks: which nodes are parameters, constants, batched
    (depend on an input) or need gradients, and the readers of every value."""

    def __init__(self, gm: fx.GraphModule, params: set[str]):
        self.nodes = list(gm.graph.nodes)
        self.param = {n.name for n in self.nodes if n.op == "get_attr" and n.target in params}
        self.batched, self.grad, self.dynamic = set(), set(), set()
        for n in self.nodes:
            ins = [a.name for a in tensor_inputs(n)]
            if n.op == "placeholder" or any(a in self.batched for a in ins):
                self.batched.add(n.name)
            if n.name in self.param or (n.op == "call_function" and any(a in self.grad for a in ins) and _float(n)):
                self.grad.add(n.name)
            if n.op == "placeholder" or n.name in self.param or any(a in self.dynamic for a in ins):
                self.dynamic.add(n.name)
        self.readers: dict[str, list[tuple[fx.Node, int]]] = {}
        for n in self.nodes:
            if n.op == "call_function" and n.name in self.dynamic and not _skipped(n):
                for j, a in enumerate(tensor_inputs(n)):
                    self.readers.setdefault(a.name, []).append((n, j))
        out = next(n for n in self.nodes if n.op == "output")
        self.outputs = [a for a in tensor_inputs(out) if a.name in self.dynamic]


def _skipped(n: fx.Node) -> bool:
    return op_name(n) in SKIP


def solve_ops(mg: ModelGraph, folding: Folding, mesh: tuple, cl: Cluster, *, dtype: str,
              memory_limit: float | None = None, global_batch: int | None = None) -> OpSolution:
    """The cheapest per-op placements of ``mg`` on ``mesh`` (axis sizes, outermost first) that fit
    ``memory_limit`` bytes per device (default: the device's memory), for a step of ``global_batch``
    samples (default: the captured batch). Nodes of every instance of a template of ``folding`` take
    one strategy."""
    dtype = normalize_dtype(dtype)
    builder = _Builder(mg, folding, tuple(mesh), cl, dtype, (global_batch or mg.batch_size) / mg.batch_size)
    limit = memory_limit if memory_limit is not None else cl.memory_bytes
    return builder.solve(limit)


class _Builder:
    def __init__(self, mg: ModelGraph, folding: Folding, mesh: tuple, cl: Cluster, dtype: str, batch_scale: float):
        self.mg, self.mesh, self.cl, self.dtype = mg, mesh, cl, dtype
        self.dtype_scale = dtype_scale(mg, dtype)
        self.batch_scale = batch_scale
        self.pricer = Pricer(mesh, cl)
        annotate_saved(mg.gm, folding=folding)
        ex = excerpt(mg.gm, folding)
        self.weight = ex.weight
        self.shapes = {n: tuple(p.shape) for n, p in mg.gm.named_parameters(remove_duplicate=False)}   # tied names too
        self.g = _Graph(ex.gm, set(self.shapes))
        self.var_of: dict[str, str] = {}     # node name -> the node whose variable it shares (its first instance's)
        self.instance: dict[str, tuple[str, int]] = {}   # node of a block -> (template, instance index)
        self.count = {t.id: len(t.instances) for t in folding.templates}
        for t in folding.templates:
            for first, names in folding.correspondence(t.id).items():
                self.var_of.update({n: first for n in names})
                self.instance.update({n: (t.id, i) for i, n in enumerate(names)})
        self.groups: dict[str, list[tuple[int, int]]] = {}   # template -> its instance groups (first, last)
        self.warnings: list[str] = []
        self.transient = backward_transient(mg.gm) * self.dtype_scale * batch_scale

    def w(self, node: fx.Node) -> int:
        return self.weight.get(node.name, 1)

    def var(self, node: fx.Node) -> str:
        return self.var_of.get(node.name, node.name)

    def group_instances(self, grouped: bool) -> None:
        """Split every template's instances into runs of 1, 2, 4, ... (and the remainder), each its own
        ILP variables, or keep them as one run."""
        self.groups = {}
        for t, k in self.count.items():
            sizes = binary_parts(k) if grouped else [k]
            starts = list(itertools.accumulate([0] + sizes[:-1]))
            self.groups[t] = [(a, a + n - 1) for a, n in zip(starts, sizes)]

    def runs(self, t: str, lo: int, hi: int) -> list[tuple[int, int]]:
        """(group, how many of instances lo..hi it holds) for each of template t's groups they meet."""
        return [(g, min(hi, b) - max(lo, a) + 1) for g, (a, b) in enumerate(self.groups[t]) if a <= hi and lo <= b]

    def key(self, name: str) -> str:
        """The ILP variable of a node of the whole graph."""
        if name not in self.instance:
            return name
        t, i = self.instance[name]
        return f"{self.var_of[name]}@{self.runs(t, i, i)[0][0]}"

    def span(self, node: fx.Node) -> tuple[str, int, int] | None:
        """(template, first, last instance) a kept node of a block stands for."""
        if node.name not in self.instance:
            return None
        t, i = self.instance[node.name]
        return t, i, i + self.w(node) - 1

    def pieces(self, node: fx.Node) -> list[tuple[str, int]]:
        """(ILP variable, instances it counts) of a kept node: one per instance group it stands in."""
        span = self.span(node)
        if span is None:
            return [(node.name, self.w(node))]
        return [(f"{self.var(node)}@{g}", c) for g, c in self.runs(*span)]

    def links(self, a: fx.Node, n: fx.Node) -> list[tuple[str, str, int]]:
        """(producer variable, reader variable, count) of the edges the kept edge a -> n stands for. In
        one template an edge is inside an instance (same group) or from the previous instance (the
        previous group at a group's first instance)."""
        sa, sn = self.span(a), self.span(n)
        if sa is None or sn is None or sa[0] != sn[0]:
            src = max(self.pieces(a), key=lambda p: p[1])[0]   # a one-piece producer (a rare many-piece: its largest)
            return [(src, v, c) for v, c in self.pieces(n)]
        t, lo, _ = sn
        out = []
        for g, c in self.runs(*sn):
            v, first = f"{self.var(n)}@{g}", self.groups[t][g][0]
            if sa[1] != lo and lo <= first and first > 0:   # the group's first instance reads the group before
                out.append((f"{self.var(a)}@{g - 1}", v, 1))
                c -= 1
            if c:
                out.append((f"{self.var(a)}@{g}", v, c))
        return out

    def scale(self, node: fx.Node) -> float:
        """Bytes per captured byte of this value in the step: dtype, and the batch if it carries one."""
        return self.dtype_scale * (self.batch_scale if node.name in self.g.batched else 1.0)

    # ---- strategies and their own costs

    def op_strategies(self, node: fx.Node) -> list[Strategy]:
        slots = tensor_inputs(node)
        opts = options(node)
        if opts is None:
            self.warnings.append(f"{op_name(node)} ({node.name}): no sharding rule, runs replicated")
            opts = [Option(R, (R,) * len(slots), False)]
        return strategies(opts, [shape_of(a) for a in slots], shape_of(node), self.mesh)

    def op_cost(self, node: fx.Node, s: Strategy) -> tuple[float, float, float, float]:
        """(compute s, gradient-sync s, gradient-sync bytes, memory) of ``node`` under ``s``, with the
        parameters only it reads (their placement is its input's)."""
        div = s.work_div(self.mesh)
        work = node_work(node, div, in_block=False)
        k = self.batch_scale
        compute = cost.compute_time((work.fwd_flops + work.bwd_flops) * k, self.dtype, self.cl) + \
            cost.memory_time(work.mem_bytes * k * self.dtype_scale, self.cl)
        out_div = math.prod(n for n, p in zip(self.mesh, s.out) if isinstance(p, int))
        memory = node.meta.get("saved_bytes", 0) * self.scale(node) / out_div
        sync = sent = 0.0
        for j, a in enumerate(tensor_inputs(node)):
            if a.name in self.g.param and len(self.g.readers[a.name]) == 1:
                t, b, m = self.param_cost(a, s.ins[j], s.grads[j])
                sync, sent, memory = sync + t, sent + b, memory + m
        return compute, sync, sent, memory

    def param_cost(self, p: fx.Node, spec: tuple, grad: tuple) -> tuple[float, float, float]:
        """(s, bytes, memory) of a parameter held as ``spec`` whose gradient arrives as ``grad``."""
        t, b = self.pricer.reshard(grad, need(spec), math.prod(self.shapes[p.target]) * DTYPE_BYTES[self.dtype])
        return t, b, float(sum(self.states(p.target, spec).values()))

    def states(self, fqn: str, spec: tuple) -> dict:
        """Bytes per device of a parameter's params, grads and Adam state held as ``spec``."""
        shards = math.prod(n for n, x in zip(self.mesh, spec) if isinstance(x, int))
        return model_state_bytes(-(-math.prod(self.shapes[fqn]) // shards), dtype=self.dtype, zero_stage=0, dp=1)

    def edge(self, src: tuple, dst: tuple, grad: tuple | None, back: tuple, value: fx.Node) -> tuple[float, float]:
        """(s, bytes) of value's edge: forward ``src`` -> ``dst``; backward ``grad`` -> ``back`` if it needs one."""
        nbytes = _value_bytes(value) * self.scale(value)
        t, b = self.pricer.reshard(src, dst, nbytes)
        if grad is not None and value.name in self.g.grad:
            t2, b2 = self.pricer.reshard(grad, back, nbytes)
            t, b = t + t2, b + b2
        return t, b

    # ---- the ILP

    def solve(self, limit: float) -> OpSolution:
        """The cheapest placements within ``limit``. A finite limit gives each template's instance groups
        their own variables, so blocks can mix strategies to fill memory as the unfolded ILP does; should
        that ILP stop at its time limit short of optimal, one strategy per template is tried too and the
        faster plan kept."""
        if not math.isfinite(limit):
            return self._solve(limit, grouped=False)
        sol = self._solve(limit, grouped=True)
        if sol.solver["status"] == "optimal" or all(len(g) == 1 for g in self.groups.values()):
            return sol
        alt = self._solve(limit, grouped=False)
        return alt if alt.feasible and (not sol.feasible or alt.step_time_s < sol.step_time_s) else sol

    def _solve(self, limit: float, grouped: bool) -> OpSolution:
        g = self.g
        self.warnings = []
        self.group_instances(grouped)
        problem = IlpProblem()
        index: dict[str, int] = {}          # variable key -> ILP node
        strat: dict[str, list] = {}         # variable key -> its strategies
        parts: dict[str, list] = {}         # variable key -> per strategy (compute, sync, sync bytes, memory)
        edges: dict[tuple, list] = {}       # (u key, v key, tag) -> [matrix of (s, bytes), weight]
        matrices: dict[tuple, list] = {}    # (u, v, tag) without instance groups -> matrix

        def add(key: str, choices: list, costs: list, weight: int):
            if key in index:
                problem.weights[index[key]] += weight
                return
            strat[key], parts[key] = choices, costs
            index[key] = problem.add_node([c[0] + c[1] for c in costs], [c[3] for c in costs], weight)

        def link(u: str, v: str, tag, matrix_fn, weight: int):
            k = (u, v, tag)
            if k in edges:
                edges[k][1] += weight
                return
            base = (u.split("@")[0], v.split("@")[0], tag)
            if base not in matrices:
                matrices[base] = matrix_fn()
            edges[k] = [matrices[base], weight]

        hubs = {a for a, rs in g.readers.items() if len(rs) > 1 and a in g.grad}
        for n in g.nodes:
            if n.name not in g.dynamic or (n.op == "call_function" and _skipped(n)):
                continue
            if n.op == "placeholder":
                specs = value_specs(shape_of(n) or (), self.mesh) if shape_of(n) else [(R,) * len(self.mesh)]
                add(n.name, [Strategy(s, (), (), (False,) * len(self.mesh)) for s in specs],
                    [(0.0, 0.0, 0.0, 0.0)] * len(specs), self.w(n))
            elif n.name in g.param:
                if n.name in hubs:
                    self._add_hub(n, n.name, add, param=True, weight=self.w(n))
            elif n.op == "call_function":
                ss = self.op_strategies(n)
                costs = [self.op_cost(n, s) for s in ss]
                for key, c in self.pieces(n):
                    add(key, ss, costs, c)
            if n.name in hubs and n.name not in g.param:
                for key, c in self.pieces(n):
                    self._add_hub(n, key, add, param=False, weight=c)
                    link(key, "hub:" + key, None,
                         lambda n=n, key=key: self._matrix_to_hub(n, strat[key], strat["hub:" + key]), c)
        for n in g.nodes:   # edges into every op
            if n.op != "call_function" or n.name not in g.dynamic or _skipped(n):
                continue
            for j, a in enumerate(tensor_inputs(n)):
                if a.name not in g.dynamic or (a.name in g.param and a.name not in hubs and len(g.readers[a.name]) == 1):
                    continue
                hub = "hub:" if a.name in hubs else ""
                for u, v, c in self.links(a, n):
                    link(hub + u, v, j, lambda a=a, u=hub + u, v=v, j=j, h=bool(hub):
                         self._matrix_into(a, strat[u], strat[v], j, h), c)
        sink = {}
        for a in g.outputs:   # the caller gets whole outputs (the loss: an all-reduce of a scalar)
            for key, _ in self.pieces(a):
                sink[key] = [self.pricer.reshard(s.out, (R,) * len(self.mesh), _value_bytes(a) * self.scale(a))
                             for s in strat[key]]
                for i, (t, _) in enumerate(sink[key]):
                    problem.costs[index[key]][i] += t / problem.weights[index[key]]
        for (u, v, _), (matrix, weight) in edges.items():
            problem.add_edge(index[u], index[v], [[t for t, _ in row] for row in matrix], weight)
        sol = solve(problem, memory_limit=limit - self.transient, time_limit_s=TIME_LIMIT_S, relative_gap=RELATIVE_GAP)
        choice = sol.choice
        if choice is None:   # nothing fits: report the leanest assignment, infeasible
            choice = tuple(min(range(len(m)), key=m.__getitem__) for m in problem.memories)
        pick = {key: choice[i] for key, i in index.items()}
        return self._solution(problem, pick, index, strat, parts, edges, sink, sol)

    def _add_hub(self, n: fx.Node, key: str, add, param: bool, weight: int):
        """A hub variable: (readers' placement F, placement where the readers' gradients are summed)."""
        specs = value_specs(shape_of(n) or (), self.mesh)
        choices, costs = [], []
        for f in specs:
            grads = [need(f)]
            if any(p == R and m > 1 for p, m in zip(f, self.mesh)):
                grads.append(tuple(P if p == R and m > 1 else p for p, m in zip(f, self.mesh)))
            for gsum in grads:
                choices.append(Strategy(f, (f,), (gsum,), (False,) * len(self.mesh)))
                if param:
                    t, b, m = self.param_cost(n, f, gsum)
                    costs.append((0.0, t, b, m))
                else:
                    costs.append((0.0, 0.0, 0.0, 0.0))
        add("hub:" + key, choices, costs, weight)

    def _matrix_to_hub(self, value: fx.Node, src: list, hub: list) -> list:
        return [[self.edge(s.out, h.out, h.grads[0], need(s.out), value) for h in hub] for s in src]

    def _matrix_into(self, value: fx.Node, src: list, dst: list, j: int, from_hub: bool) -> list:
        """Edge matrix from the producer's (or hub's) strategies into slot j of the reader's."""
        rows = []
        for s in src:
            back = s.grads[0] if from_hub else need(s.out)
            rows.append([self.edge(s.out, d.ins[j], d.grads[j], back, value) for d in dst])
        return rows

    def _solution(self, problem, pick, index, strat, parts, edges, sink, sol) -> OpSolution:
        compute = sync = fwd_bwd = sent = 0.0
        memory = 0.0
        for key, i in pick.items():
            w = problem.weights[index[key]]
            c, t, b, m = parts[key][i]
            compute, sync, sent, memory = compute + w * c, sync + w * t, sent + w * b, memory + w * m
            if key in sink:
                fwd_bwd, sent = fwd_bwd + sink[key][i][0], sent + sink[key][i][1]
        for (u, v, _), (matrix, weight) in edges.items():
            t, b = matrix[pick[u]][pick[v]]
            fwd_bwd, sent = fwd_bwd + weight * t, sent + weight * b
        strategies_by_node, params = {}, {}
        full = self.mg.gm.graph.nodes
        by_var: dict[str, list[str]] = {}
        for n in full:
            by_var.setdefault(self.key(n.name), []).append(n.name)
        for key, i in pick.items():   # every instance's node; "hub:<value>": its readers' placement
            hub = "hub:" if key.startswith("hub:") else ""
            for name_ in by_var.get(key[len(hub):], [key[len(hub):]]):
                strategies_by_node[hub + name_] = strat[key][i]
        for n in full:   # every parameter: a hub's placement, else its one reader's input placement
            if n.op != "get_attr" or n.target not in self.shapes:
                continue
            if "hub:" + n.name in strategies_by_node:
                params[n.target] = strategies_by_node["hub:" + n.name].out
                continue
            if not n.users:   # an alias no node reads (a tied weight): placed with the name that is read
                continue
            reader = next(iter(n.users))
            s = strategies_by_node[reader.name]
            params[n.target] = s.ins[[a.name for a in tensor_inputs(reader)].index(n.name)]
        aliases: dict[int, list[str]] = {}
        for fqn, p in self.mg.gm.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(fqn)
        for names in aliases.values():
            placed = next((params[f] for f in names if f in params), (R,) * len(self.mesh))
            params.update({f: placed for f in names})
        params = {f: params[f] for f in self.shapes}   # model order
        breakdown = {"compute": compute, "reshard": fwd_bwd, "gradient_sync": sync}
        status = sol.status if sol.choice is not None else "infeasible"
        solver = {"status": status, "gap": sol.gap or 0.0, "variables": sum(len(c) for c in problem.costs)}
        acts = memory
        states = {"params": 0.0, "grads": 0.0, "optimizer": 0.0}
        for fqn, spec in params.items():
            if fqn not in self.mg.param_shapes:   # a tied alias
                continue
            for k, v in self.states(fqn, spec).items():
                states[k] += v
        acts -= sum(states.values())
        mem = {**states, "activations": acts + self.transient}
        return OpSolution(self.mesh, strategies_by_node, params, sum(breakdown.values()), breakdown, mem, sent,
                          solver, sorted(set(self.warnings)))


def describe(spec: tuple) -> str:
    """``("R", 0)`` -> ``"R,S0"``."""
    return ",".join(name(p) for p in spec)


def ops_candidates(mg: ModelGraph, cl: Cluster, *, global_batch: int, dtype: str, memory_limit: float | None,
                   fix: dict | None, folding: Folding) -> list[Candidate]:
    """One priced candidate per dp × tp mesh (tp, the inner axis, within a node; ``fix`` may pin dp and
    tp), the ILP choosing every op's placement on both axes; best first, infeasible last."""
    fix = dict(fix or {})
    unknown = set(fix) - {"dp", "tp", "pp", "sp", "zero", "microbatches", "recompute"}
    pinned = {k: v for k, v in fix.items() if k not in ("dp", "tp") and v not in (1, 0, "none")}
    if unknown or pinned:
        raise BadInput(f"the per-op search plans dp x tp meshes (one microbatch, no ZeRO, pipeline, sequence "
                       f"parallelism or recompute yet); it cannot take --fix {sorted(unknown | set(pinned))}")
    devices = cl.devices
    check_degrees(fix, devices, ("dp", "tp"))
    limit = memory_limit if memory_limit is not None else cl.memory_bytes
    meshes = [(devices // t, t) for t in divisors(devices) if t <= cl.devices_per_node
              and fix.get("tp", t) == t and fix.get("dp", devices // t) == devices // t]
    # without the limit the ILP collapses to an exact dynamic program (fast); its step time bounds the
    # limited one's from below, so a mesh whose free optimum is already slower than a plan that fits is
    # not solved under the limit (and not listed)
    free = {m: solve_ops(mg, folding, m, cl, dtype=dtype, memory_limit=math.inf, global_batch=global_batch)
            for m in meshes}
    out, best = [], math.inf
    for mesh in sorted(meshes, key=lambda m: (free[m].step_time_s, m[1])):
        if free[mesh].step_time_s >= best:
            continue
        sol = free[mesh]
        if sol.peak_memory > limit:
            sol = solve_ops(mg, folding, mesh, cl, dtype=dtype, memory_limit=limit, global_batch=global_batch)
        dp, tp = mesh
        c = Candidate(dp, tp, 0, max(global_batch // dp, 1), 1, "none", step_time_s=sol.step_time_s,
                      breakdown=dict(sol.breakdown), memory=dict(sol.memory), comm_bytes=sol.comm_bytes,
                      solver=dict(sol.solver), placements=sol.placements(), warnings=list(sol.warnings))
        if not sol.feasible or sol.peak_memory > limit:
            c.feasible = False
            c.reason = (f"needs {sol.peak_memory / 2**30:.3g} GiB > {limit / 2**30:.3g} GiB per device"
                        if sol.peak_memory > limit else f"ILP {sol.solver['status']}")
        else:
            best = min(best, sol.step_time_s)
        out.append(c)
    if not out:
        raise BadInput(f"no dp x tp factorization of {devices} devices (tp <= {cl.devices_per_node} per node) "
                       f"matches --fix {fix}")
    out.sort(key=lambda c: (not c.feasible, c.step_time_s if c.feasible else c.peak_memory, c.tp))
    return out
