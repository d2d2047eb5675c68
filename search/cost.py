"""Cost model formulas (DESIGN §4): roofline compute, HBM time, alpha-beta ring collectives.

Pure functions of numbers and a :class:`~search.cluster.Cluster`; no torch, no I/O.

>>> from search.cluster import get_cluster
>>> c = get_cluster("a100-80g")
>>> round(collective_time("all_reduce", 1e9, 8, c, spans_nodes=False) * 1e3, 3)   # ms
5.903
"""
from __future__ import annotations

import math

from search.cluster import Cluster
from search.errors import BadInput

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")


def compute_time(flops: float, dtype: str, cluster: Cluster) -> float:
    """Seconds for ``flops`` at the achievable rate: flops / (peak[dtype] × compute_efficiency)."""
    return flops / (cluster.peak(dtype) * cluster.compute_efficiency)


def memory_time(nbytes: float, cluster: Cluster) -> float:
    """Seconds to move ``nbytes`` through device memory (memory-bound ops)."""
    return nbytes / cluster.memory_bandwidth


def _check(kind: str, group_size: int) -> None:
    if kind not in COLLECTIVES:
        raise BadInput(f"unknown collective {kind!r}; known: {list(COLLECTIVES)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise BadInput(f"collective group size must be a positive integer, got {group_size!r}")


def bytes_sent_per_rank(kind: str, nbytes: float, group_size: int) -> float:
    """Algorithmic bytes one rank sends. ``nbytes``: the full buffer (for all-gather /
    reduce-scatter the gathered, unsharded size; for all-to-all the bytes each rank holds; for p2p
    the message). all-reduce 2(p−1)/p·n, all-gather / reduce-scatter / all-to-all (p−1)/p·n, p2p n.
    A group of one sends nothing (p2p included: a stage talking to itself is a no-op)."""
    _check(kind, group_size)
    p = group_size
    if p == 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (p - 1) / p * nbytes
    if kind == "p2p":
        return float(nbytes)
    return (p - 1) / p * nbytes


def collective_time(kind: str, nbytes: float, group_size: int, cluster: Cluster, *,
                    spans_nodes: bool, calls: int = 1) -> float:
    """Ring alpha-beta time (seconds) of one collective; B, α are the inter-node link when the
    group spans nodes (the slowest link it uses), else the intra-node link.

    all-reduce 2(p−1)/p·n/B + 2(p−1)α; all-gather, reduce-scatter (p−1)/p·n/B + (p−1)α;
    all-to-all (p−1)/p·n/B; p2p n/B + α; p == 1 -> 0. The bandwidth term is scaled by the cluster's
    measured ``factor(kind)`` (1 on the built-in GPU profiles). ``calls``: the ``nbytes`` moved as that
    many equal collectives (the same bandwidth term, ``calls`` latencies).
    """
    _check(kind, group_size)
    if calls > 1:
        return calls * collective_time(kind, nbytes / calls, group_size, cluster, spans_nodes=spans_nodes)
    p = group_size
    if p == 1:
        return 0.0
    if spans_nodes:
        bw, alpha = cluster.inter_bandwidth, cluster.inter_latency
    else:
        bw, alpha = cluster.intra_bandwidth, cluster.intra_latency
    sent = bytes_sent_per_rank(kind, nbytes, p) * cluster.factor(kind)
    if kind == "all_reduce":
        return sent / bw + 2 * (p - 1) * alpha
    if kind in ("all_gather", "reduce_scatter"):
        return sent / bw + (p - 1) * alpha
    if kind == "all_to_all":
        return sent / bw
    return sent / bw + alpha  # p2p


def group_spans_nodes(mesh_shape: tuple[int, ...], axis: int, devices_per_node: int) -> bool:
    """Whether a process group along mesh ``axis`` crosses a node boundary.

    Axes are outer -> inner; the last axis is innermost (contiguous ranks). A group along ``axis``
    has stride prod(mesh_shape[axis+1:]) and size mesh_shape[axis], so its ranks lie within a block
    of prod(mesh_shape[axis:]) consecutive ranks; it spans nodes iff that block exceeds a node.
    (Assumes node sizes divide / are divided by the block, which ``Cluster.with_devices`` ensures.)
    """
    shape = tuple(mesh_shape)
    if not -len(shape) <= axis < len(shape):
        raise BadInput(f"mesh axis {axis} out of range for mesh shape {shape}")
    if shape[axis] == 1:
        return False
    return math.prod(shape[axis:]) > devices_per_node
