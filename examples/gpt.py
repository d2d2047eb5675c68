"""GPT-2/GPT-3 style decoder: pre-LN blocks, fused qkv projection, causal SDPA, tied LM head.

    >>> import torch
    >>> from examples.gpt import GPT, GPTConfig
    >>> torch.manual_seed(0) and None
    >>> model = GPT(GPTConfig(vocab=128, seq=32, hidden=64, layers=2, heads=4))
    >>> idx = torch.randint(0, 128, (2, 32))
    >>> model(idx, idx).dim()
    0

Plain ``nn.Module`` with no data-dependent control flow, so ``torch.export`` (non-strict) captures it,
and cheap to build under ``with torch.device("meta"):`` at any size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.common import init_weights, lm_output


@dataclass
class GPTConfig:
    vocab: int
    seq: int
    hidden: int
    layers: int
    heads: int
    ffn: int | None = None  # None -> 4 * hidden
    tie_embeddings: bool = True
    attention: str = "sdpa"  # "sdpa" (fused) or "eager": matmul, causal mask, softmax, matmul

    def __post_init__(self):
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"attention must be 'sdpa' or 'eager', got {self.attention!r}")
        if self.ffn is None:
            self.ffn = 4 * self.hidden
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.hidden, self.heads, self.eager = cfg.hidden, cfg.heads, cfg.attention == "eager"
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hd = C // self.heads
        q, k, v = self.qkv(x).split(self.hidden, dim=-1)
        q = q.view(B, T, self.heads, hd).transpose(1, 2)
        k = k.view(B, T, self.heads, hd).transpose(1, 2)
        v = v.view(B, T, self.heads, hd).transpose(1, 2)
        if self.eager:  # the attention-score tensors [B, heads, T, T] are saved for backward
            scores = (q @ k.transpose(-2, -1)) * hd ** -0.5
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            y = scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, cfg.ffn)
        self.proj = nn.Linear(cfg.ffn, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.hidden)
        self.wpe = nn.Embedding(cfg.seq, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * layers)
        std = 0.02 / (2 * cfg.layers) ** 0.5
        for block in self.blocks if not self.lm_head.weight.is_meta else ():
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return lm_output(logits, targets)
