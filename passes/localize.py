"""localize_args: the one way a pass applies the local arguments its placement rules computed."""
from __future__ import annotations

import torch.fx as fx


def localize_args(graph: fx.Graph, local_args: dict[str, tuple]) -> None:
    """Set each named node's args (view sizes made local, ...); ``("drop",)`` erases a node nothing
    reads (an export metadata assert that the local shapes would fail)."""
    nodes = {n.name: n for n in graph.nodes}
    for name, args in local_args.items():
        node = nodes[name]
        if args == ("drop",):
            if not node.users:
                graph.erase_node(node)
            continue
        node.args = args
