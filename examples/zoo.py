"""Model zoo: published GPT / Llama-2 / BERT sizes plus tiny presets for tests.

    >>> from examples.zoo import build, list_models
    >>> model, args, kwargs = build("gpt-tiny", batch=2)            # meta device by default
    >>> [tuple(a.shape) for a in args], kwargs
    ([(2, 32), (2, 32)], {})
    >>> "gpt3-175b" in [m.name for m in list_models()]
    True

``build`` returns ``(model, args, kwargs)``: the example inputs are token ids and targets (int64), so
``model(*args, **kwargs)`` is the mean cross-entropy loss of one training step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from examples.bert import Bert, BertConfig
from examples.dit import DiT, DiTConfig, example_inputs as dit_inputs
from examples.evoformer import Evoformer, EvoformerConfig, example_inputs as evoformer_inputs
from examples.gpt import GPT, GPTConfig
from examples.llama import Llama, LlamaConfig
from search.errors import BadInput


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "gpt" | "llama" | "bert"
    config: Any  # GPTConfig | LlamaConfig | BertConfig
    description: str


_FAMILIES = {"gpt": GPT, "llama": Llama, "bert": Bert, "dit": DiT, "evoformer": Evoformer}


def _gpt(name, desc, **kw) -> ModelSpec:
    return ModelSpec(name, "gpt", GPTConfig(**kw), desc)


def _llama(name, desc, **kw) -> ModelSpec:
    return ModelSpec(name, "llama", LlamaConfig(**kw), desc)


def _bert(name, desc, **kw) -> ModelSpec:
    return ModelSpec(name, "bert", BertConfig(**kw), desc)


def _dit(name, desc, **kw) -> ModelSpec:
    return ModelSpec(name, "dit", DiTConfig(**kw), desc)


def _evoformer(name, desc, **kw) -> ModelSpec:
    return ModelSpec(name, "evoformer", EvoformerConfig(**kw), desc)


_SPECS = [
    _gpt("gpt2-small", "GPT-2 small, 124M", vocab=50257, seq=1024, hidden=768, layers=12, heads=12),
    _gpt("gpt2-xl", "GPT-2 XL, 1.5B", vocab=50257, seq=1024, hidden=1600, layers=48, heads=25),
    _gpt("gpt3-6.7b", "GPT-3 6.7B", vocab=50257, seq=2048, hidden=4096, layers=32, heads=32),
    _gpt("gpt3-175b", "GPT-3 175B", vocab=50257, seq=2048, hidden=12288, layers=96, heads=96),
    _llama("llama2-7b", "Llama-2 7B", vocab=32000, seq=4096, hidden=4096, layers=32, heads=32,
           kv_heads=32, ffn=11008),
    _llama("llama2-70b", "Llama-2 70B (grouped-query attention, 8 kv heads)", vocab=32000, seq=4096,
           hidden=8192, layers=80, heads=64, kv_heads=8, ffn=28672),
    _bert("bert-large", "BERT-large, 340M", vocab=30522, seq=512, hidden=1024, layers=24, heads=16),
    _gpt("gpt-tiny", "tiny GPT for tests", vocab=128, seq=32, hidden=64, layers=2, heads=4),
    _gpt("gpt-tiny-eager", "tiny GPT, eager matmul-softmax attention (selective recompute)", vocab=128, seq=32,
         hidden=64, layers=2, heads=4, attention="eager"),
    _llama("llama-tiny", "tiny Llama for tests", vocab=128, seq=32, hidden=64, layers=2, heads=4,
           kv_heads=2, ffn=128),
    _bert("bert-tiny", "tiny BERT for tests", vocab=128, seq=32, hidden=64, layers=2, heads=4),
    _dit("dit-xl", "video DiT-XL/2, 16 frames x 1024 tokens, spatial/temporal blocks (448M)", frames=16,
         tokens=1024, in_channels=16, hidden=1152, heads=16, depth=28),
    _dit("dit-tiny", "tiny video DiT for tests", frames=8, tokens=16, in_channels=4, hidden=32, heads=4, depth=4),
    _evoformer("evoformer-af2", "AlphaFold-2-sized Evoformer pair stack: 384 residues, c_z 128, 48 blocks",
               residues=384, in_channels=65, pair=128, heads=4, tri=128, blocks=48, bins=64),
    _evoformer("evoformer-tiny", "tiny Evoformer pair stack for tests", residues=12, in_channels=8, pair=16,
               heads=2, tri=16, blocks=2, bins=8),
]

MODELS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}


def list_models() -> list[ModelSpec]:
    """All presets, sorted by name."""
    return sorted(MODELS.values(), key=lambda s: s.name)


def get(name: str) -> ModelSpec:
    """The preset called ``name``; ``BadInput`` naming the valid presets otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise BadInput(f"unknown model {name!r}: expected one of {', '.join(sorted(MODELS))}") from None


def build(name: str, *, batch: int = 2, seq: int | None = None, device: str | torch.device = "meta",
          seed: int = 0) -> tuple[torch.nn.Module, tuple, dict]:
    """Build preset ``name`` on ``device`` with example inputs ``(ids, targets)`` of shape (batch, seq).

    Weights are initialised after ``torch.manual_seed(seed)``, so the same seed gives the same model.
    ``seq`` defaults to the preset's sequence length; a longer ``seq`` grows the position table.
    """
    spec = get(name)
    if batch < 1:
        raise BadInput(f"batch must be >= 1, got {batch}")
    seq = spec.config.seq if seq is None else int(seq)
    if seq < 1:
        raise BadInput(f"seq must be >= 1, got {seq}")
    device = torch.device(device)
    torch.manual_seed(seed)
    if spec.family == "dit":  # latents [batch, T, N, C_in] and a denoising target; seq = frames T
        config = dataclasses.replace(spec.config, frames=seq)
        with device:
            model = DiT(config)
        return model, dit_inputs(config, batch, device, seed), {}
    if spec.family == "evoformer":  # pair features [batch, N, N, C_in] and distogram bins; seq = residues N
        config = dataclasses.replace(spec.config, residues=seq)
        with device:
            model = Evoformer(config)
        return model, evoformer_inputs(config, batch, device, seed), {}
    config = spec.config if seq <= spec.config.seq else dataclasses.replace(spec.config, seq=seq)
    with device:
        model = _FAMILIES[spec.family](config)
    vocab = config.vocab
    if device.type == "meta":
        ids = torch.empty(batch, seq, dtype=torch.long, device=device)
        tgt = torch.empty(batch, seq, dtype=torch.long, device=device)
    else:
        g = torch.Generator(device="cpu").manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.long).to(device)
        tgt = torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.long).to(device)
    return model, (ids, tgt), {}
