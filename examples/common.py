"""Pieces the zoo models share: weight initialisation and the language-model loss."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def init_weights(module: nn.Module) -> None:
    """GPT-2 style init: N(0, 0.02) for linear and embedding weights, zero biases (use with ``Module.apply``);
    nothing on the meta device, where there are no values (a 175B model is built for planning in a blink)."""
    if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.is_meta:
        return
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def lm_output(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Logits when there are no targets, else the mean token cross-entropy."""
    if targets is None:
        return logits
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
