"""Per-device memory accounting: model states under ZeRO, and the Megatron activation formula.

>>> model_state_bytes(1_000_000, dtype="bf16", zero_stage=1, dp=4)
{'params': 2000000, 'grads': 2000000, 'optimizer': 3000000}
"""
from __future__ import annotations

from search.cluster import normalize_dtype
from search.errors import BadInput

# bytes per parameter: (param, grad, optimizer state) — optimizer state for Adam under mixed
# precision is fp32 master weights + m + v (12 B); in pure fp32 the params are the master, so m + v (8 B).
_ADAM = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}
# SGD with momentum: one fp32 buffer (+ fp32 master under mixed precision).
_SGD = {"fp32": (4, 4, 4), "bf16": (2, 2, 8), "fp16": (2, 2, 8)}
_OPTIMIZERS = {"adam": _ADAM, "adamw": _ADAM, "sgd": _SGD}


def model_state_bytes(num_params: int, *, dtype: str, zero_stage: int, dp: int,
                      optimizer: str = "adam") -> dict:
    """Bytes per device of params, grads and optimizer state for ``num_params`` parameters that
    this device holds before ZeRO (the caller has already divided by tp / pp).

    ZeRO-1 shards the optimizer state over ``dp``, ZeRO-2 also the gradients, ZeRO-3 also the
    parameters. Sharded sizes are rounded up (ceil) to whole bytes.
    """
    if optimizer not in _OPTIMIZERS:
        raise BadInput(f"unknown optimizer {optimizer!r}; known: {sorted(_OPTIMIZERS)}")
    if zero_stage not in (0, 1, 2, 3):
        raise BadInput(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise BadInput(f"dp must be a positive integer, got {dp!r}")
    if num_params < 0:
        raise BadInput(f"num_params must be >= 0, got {num_params!r}")
    pb, gb, ob = _OPTIMIZERS[optimizer][normalize_dtype(dtype)]

    def shard(nbytes: int, sharded: bool) -> int:
        return -(-nbytes // dp) if sharded else nbytes

    n = int(num_params)
    return {
        "params": shard(n * pb, zero_stage >= 3),
        "grads": shard(n * gb, zero_stage >= 2),
        "optimizer": shard(n * ob, zero_stage >= 1),
    }


def transformer_activation_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                                 recompute: str = "none") -> float:
    """Activation bytes per transformer layer per device, 16-bit (Korthikanti et al., DESIGN §4).

    no TP: s b h (34 + 5 a s / h); TP t: s b h (10 + 24/t + 5 a s / (h t));
    TP + SP: s b h (34/t + 5 a s / (h t)); full recompute keeps only the layer input, 2 s b h
    (divided by t under SP, where the input is sequence-sharded). Reference oracle for tests.
    """
    if recompute not in ("none", "full"):
        raise BadInput(f"recompute must be 'none' or 'full', got {recompute!r}")
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    if sp:
        return sbh * (34 / t + 5 * a * s / (h * t))
    if t == 1:
        return sbh * (34 + 5 * a * s / h)
    return sbh * (10 + 24 / t + 5 * a * s / (h * t))
