"""BERT-style encoder: token + position + type embeddings, post-LN blocks, bidirectional SDPA, MLM head.

    >>> import torch
    >>> from examples.bert import Bert, BertConfig
    >>> model = Bert(BertConfig(vocab=128, seq=32, hidden=64, layers=2, heads=4))
    >>> ids = torch.randint(0, 128, (2, 32))
    >>> model(ids, ids).dim()
    0
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.common import init_weights, lm_output


@dataclass
class BertConfig:
    vocab: int
    seq: int
    hidden: int
    layers: int
    heads: int
    ffn: int | None = None  # None -> 4 * hidden
    type_vocab: int = 2
    tie_embeddings: bool = True
    norm_eps: float = 1e-12

    def __post_init__(self):
        if self.ffn is None:
            self.ffn = 4 * self.hidden
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hd = C // self.heads
        q = self.query(x).view(B, T, self.heads, hd).transpose(1, 2)
        k = self.key(x).view(B, T, self.heads, hd).transpose(1, 2)
        v = self.value(x).view(B, T, self.heads, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.out(y)


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.fc = nn.Linear(cfg.hidden, cfg.ffn)
        self.proj = nn.Linear(cfg.ffn, cfg.hidden)
        self.ln_2 = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x))  # post-LN
        return self.ln_2(x + self.proj(F.gelu(self.fc(x))))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.seq, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.emb_ln = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        # MLM head: transform (dense + GELU + LayerNorm) then decoder to the vocabulary
        self.head_dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.head_ln = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab)
        self.apply(init_weights)
        if cfg.tie_embeddings:
            self.decoder.weight = self.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        types = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(types)
        x = self.emb_ln(x)
        for layer in self.layers:
            x = layer(x)
        logits = self.decoder(self.head_ln(F.gelu(self.head_dense(x))))
        return lm_output(logits, labels)
