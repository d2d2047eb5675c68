"""Evoformer-like pair stack (AlphaFold 2): triangle updates of a pair representation [B, N, N, c].

    >>> import torch
    >>> from examples.evoformer import Evoformer, EvoformerConfig, example_inputs
    >>> cfg = EvoformerConfig(residues=8, in_channels=4, pair=16, heads=2, tri=16, blocks=1, bins=8)
    >>> torch.manual_seed(0) and None
    >>> model = Evoformer(cfg)
    >>> feats, bins = example_inputs(cfg, batch=2, device="cpu")
    >>> tuple(model(feats).shape), model(feats, bins).dim()
    ((2, 8, 8, 8), 0)

Each block adds, in turn (AF2 supplement, Algorithms 11, 13, 14, 15; pair stack only, no MSA):
the outgoing triangle multiplicative update z_ij += g_ij * Linear(LN(sum_k a_ik * b_jk)), triangle
attention around the starting node (row i attends over its j with a bias b_jk shared by all rows), around
the ending node (the same on the transposed pair) and a transition MLP. Inputs are pair features
[B, N, N, C_in] (e.g. relative positions) and distogram bins [B, N, N]; the loss is the mean
cross-entropy of a distogram head on the symmetrised pair. Attention is one ``scaled_dot_product_attention``
on [B, N, heads, N, d] with the triangle bias as its float mask. Projections whose outputs every row
needs (the bias, the "right" edge b_jk) are submodules of their own, so the per-row parts of each update
are whole module scopes. No data-dependent control flow: ``torch.export`` captures it, also on meta.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.common import init_weights


@dataclass
class EvoformerConfig:
    residues: int     # N: the pair representation is [B, N, N, pair]
    in_channels: int  # C_in pair input features
    pair: int         # c_z
    heads: int        # triangle attention heads (head dim pair // heads)
    tri: int          # hidden channels of the triangle multiplication
    blocks: int
    bins: int = 64    # distogram bins
    transition: int = 4

    def __post_init__(self):
        if self.pair % self.heads:
            raise ValueError(f"pair ({self.pair}) must be divisible by heads ({self.heads})")

    @property
    def seq(self) -> int:
        """The planner's sequence length: the number of residues."""
        return self.residues


class GatedLinear(nn.Module):
    """sigmoid(gate(x)) * proj(x)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Linear(cin, cout)
        self.gate = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x)) * self.proj(x)


class TriangleMultiplication(nn.Module):
    """Outgoing edges: x_ij = sum_k a_ik * b_jk; row i of the update needs a's row i and all of b."""

    def __init__(self, cfg: EvoformerConfig):
        super().__init__()
        self.norm_in = nn.LayerNorm(cfg.pair)
        self.right = GatedLinear(cfg.pair, cfg.tri)  # b: every row needs all of it
        self.left = GatedLinear(cfg.pair, cfg.tri)   # a
        self.norm_out = nn.LayerNorm(cfg.tri)
        self.out = nn.Linear(cfg.tri, cfg.pair)
        self.gate = nn.Linear(cfg.pair, cfg.pair)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self.norm_in(z)
        b = self.right(z)
        x = torch.einsum("bikc,bjkc->bijc", self.left(z), b)
        return torch.sigmoid(self.gate(z)) * self.out(self.norm_out(x))


class PairBias(nn.Module):
    """The triangle bias b_jk per head as an attention mask [B, 1, heads, N, N], shared by all rows."""

    def __init__(self, cfg: EvoformerConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.pair, cfg.heads, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z).permute(0, 3, 1, 2).unsqueeze(1)


class GatedRowAttention(nn.Module):
    """Gated multi-head attention of each row i over its entries j, with an additive mask."""

    def __init__(self, cfg: EvoformerConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.pair, 3 * cfg.pair, bias=False)
        self.gate = nn.Linear(cfg.pair, cfg.pair)
        self.out = nn.Linear(cfg.pair, cfg.pair)

    def forward(self, z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, I, J, C = z.shape
        q, k, v = self.qkv(z).view(B, I, J, 3, self.heads, C // self.heads).permute(3, 0, 1, 4, 2, 5)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, I, heads, J, d]
        o = o.permute(0, 1, 3, 2, 4).reshape(B, I, J, C)
        return self.out(torch.sigmoid(self.gate(z)) * o)


class TriangleAttention(nn.Module):
    """Around the starting node (rows); ``ending=True``: around the ending node (columns)."""

    def __init__(self, cfg: EvoformerConfig, ending: bool):
        super().__init__()
        self.ending = ending
        self.norm = nn.LayerNorm(cfg.pair)
        self.bias = PairBias(cfg)
        self.attn = GatedRowAttention(cfg)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.ending:
            z = z.transpose(1, 2)
        z = self.norm(z)
        out = self.attn(z, self.bias(z))
        return out.transpose(1, 2) if self.ending else out


class Transition(nn.Module):
    def __init__(self, cfg: EvoformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.pair)
        self.fc = nn.Linear(cfg.pair, cfg.transition * cfg.pair)
        self.proj = nn.Linear(cfg.transition * cfg.pair, cfg.pair)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.fc(self.norm(z))))


class Block(nn.Module):
    def __init__(self, cfg: EvoformerConfig):
        super().__init__()
        self.tri_mul = TriangleMultiplication(cfg)
        self.row_attn = TriangleAttention(cfg, ending=False)
        self.col_attn = TriangleAttention(cfg, ending=True)
        self.transition = Transition(cfg)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z + self.tri_mul(z)
        z = z + self.row_attn(z)
        z = z + self.col_attn(z)
        return z + self.transition(z)


class Evoformer(nn.Module):
    def __init__(self, cfg: EvoformerConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Linear(cfg.in_channels, cfg.pair)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
        self.norm = nn.LayerNorm(cfg.pair)
        self.head = nn.Linear(cfg.pair, cfg.bins)
        self.apply(init_weights)

    def forward(self, feats: torch.Tensor, bins: torch.Tensor | None = None) -> torch.Tensor:
        z = self.embed(feats)
        for block in self.blocks:
            z = block(z)
        z = self.norm(z)
        logits = self.head(z + z.transpose(1, 2))  # distogram logits [B, N, N, bins]
        if bins is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), bins.reshape(-1))


def example_inputs(cfg: EvoformerConfig, batch: int, device: str | torch.device = "meta",
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair features [batch, N, N, C_in] and distogram bins [batch, N, N] (int64; empty on meta)."""
    n = cfg.residues
    device = torch.device(device)
    if device.type == "meta":
        return (torch.empty(batch, n, n, cfg.in_channels, device=device),
                torch.empty(batch, n, n, dtype=torch.long, device=device))
    g = torch.Generator(device="cpu").manual_seed(seed)
    feats = torch.randn(batch, n, n, cfg.in_channels, generator=g)
    bins = torch.randint(0, cfg.bins, (batch, n, n), generator=g)
    return feats.to(device), bins.to(device)
