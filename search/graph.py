"""ModelGraph: the captured fx graph plus the per-node facts the search prices.

Every call_function node of interest carries ``node.meta["autopar"]`` = :class:`NodeInfo`.
Shapes are global (the whole batch, unsharded); FLOPs and bytes are for one forward/backward
of that global shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.functions import FloorDiv


@dataclass
class NodeInfo:
    op: str                      # short op name, e.g. "linear", "view", "scaled_dot_product_attention"
    shape: tuple[int, ...] | None  # output shape (first tensor output), global
    dtype: str | None            # output dtype, e.g. "float32"
    fwd_flops: int               # forward FLOPs
    bwd_flops: int               # backward FLOPs (0 when nothing requires grad)
    bytes_read: int              # forward bytes read (inputs incl. parameters)
    bytes_written: int           # forward bytes written (outputs)
    params: tuple[str, ...] = ()  # FQNs of the parameters this node reads directly
    scope: str = ""              # innermost module path from nn_module_stack, e.g. "blocks.3.attn"
    source: str = ""             # "file.py:123" of the user code that produced the node
    output_bytes: int = 0        # bytes of the output tensor(s) (activation size if saved)


@dataclass
class ModelGraph:
    """A captured model: ``gm`` (parameters as get_attr with original FQNs) and its summary."""

    gm: fx.GraphModule
    name: str
    param_shapes: dict[str, tuple[int, ...]]   # FQN -> global shape, in model order
    param_dtypes: dict[str, str]
    layers: int                                # number of repeated blocks found by scope (0 if none)
    batch_size: int
    seq_len: int
    warnings: list[str] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        n = 0
        for shape in self.param_shapes.values():
            k = 1
            for d in shape:
                k *= d
            n += k
        return n

    def nodes(self):
        """call_function nodes with NodeInfo, in graph order."""
        for node in self.gm.graph.nodes:
            if "autopar" in node.meta:
                yield node


def expression(value, symbols: dict) -> sympy.Expr:
    """A traced size or fact (int or ``torch.SymInt``) as a sympy expression: export's shape-env
    symbols are renamed by ``symbols`` and torch's integer division becomes ``floor``."""
    if isinstance(value, torch.SymInt):
        return value.node.expr.xreplace(symbols).replace(FloorDiv, lambda a, b: sympy.floor(a / b))
    return sympy.Integer(value)
