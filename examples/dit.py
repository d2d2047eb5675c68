"""Video DiT: alternating spatial and temporal transformer blocks over latents [B, T, N, C_in].

    >>> import torch
    >>> from examples.dit import DiT, DiTConfig
    >>> torch.manual_seed(0) and None
    >>> model = DiT(DiTConfig(frames=4, tokens=8, in_channels=4, hidden=32, heads=4, depth=2))
    >>> x, target = torch.randn(2, 4, 8, 4), torch.randn(2, 4, 8, 4)
    >>> tuple(model(x).shape), model(x, target).dim()
    ((2, 4, 8, 4), 0)

The residual stream between blocks is always [B, T, N, hidden]. Even blocks are spatial (attention
over the N tokens of each frame, batch B*T), odd blocks temporal (attention over the T frames of each
token, batch B*N), as in Latte / Open-Sora's STDiT. Pre-norm, GELU MLP, learned spatial and temporal
position embeddings, a linear patch embedding in and a linear head out; ``forward(x, target)`` is the
MSE denoising loss. No data-dependent control flow: ``torch.export`` captures it, also on meta.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.common import init_weights


@dataclass
class DiTConfig:
    frames: int       # T
    tokens: int       # N spatial tokens (patches) per frame
    in_channels: int  # C_in latent channels per token (a flattened patch)
    hidden: int
    heads: int
    depth: int        # number of blocks; block i is spatial for even i, temporal for odd i
    mlp_ratio: int = 4

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")

    @property
    def seq(self) -> int:
        """The planner's sequence length: the number of frames (inputs are [B, T, N, C_in])."""
        return self.frames

    @property
    def temporal_blocks(self) -> int:
        return self.depth // 2


class Attention(nn.Module):
    """Self-attention along dim 1 of a [batch, seq, hidden] input."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, s, c))


class Block(nn.Module):
    """Pre-norm attention + MLP; ``temporal`` picks the attended axis of the [B, T, N, H] stream."""

    def __init__(self, cfg: DiTConfig, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden)
        self.fc1 = nn.Linear(cfg.hidden, cfg.mlp_ratio * cfg.hidden)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, N, H = x.shape
        h = self.norm1(x)
        if self.temporal:  # [B, N, T, H] -> batch B*N, sequence T
            h = self.attn(h.transpose(1, 2).reshape(B * N, T, H)).view(B, N, T, H).transpose(1, 2)
        else:  # batch B*T, sequence N
            h = self.attn(h.reshape(B * T, N, H)).view(B, T, N, H)
        x = x + h
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = nn.Linear(cfg.in_channels, cfg.hidden)
        self.temporal_pos = nn.Parameter(torch.zeros(cfg.frames, cfg.hidden))
        self.spatial_pos = nn.Parameter(torch.zeros(cfg.tokens, cfg.hidden))
        self.blocks = nn.ModuleList(Block(cfg, temporal=i % 2 == 1) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.in_channels)
        self.apply(init_weights)
        nn.init.normal_(self.temporal_pos, std=0.02)
        nn.init.normal_(self.spatial_pos, std=0.02)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        h = self.patch_embed(x) + self.temporal_pos.unsqueeze(1) + self.spatial_pos
        for block in self.blocks:
            h = block(h)
        pred = self.head(self.norm(h))
        return pred if target is None else F.mse_loss(pred, target)


def example_inputs(cfg: DiTConfig, batch: int, device: str | torch.device = "meta",
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy latents and the denoising target, both [batch, T, N, C_in] (empty on meta)."""
    shape = (batch, cfg.frames, cfg.tokens, cfg.in_channels)
    device = torch.device(device)
    if device.type == "meta":
        return torch.empty(shape, device=device), torch.empty(shape, device=device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)
