"""Turn a MODEL argument (zoo name, ``path/file.py:factory`` or ``hf:<model_type>[:k=v,...]``) into a model.

    >>> from planner.models import resolve_model
    >>> lm = resolve_model("gpt-tiny", batch=2)
    >>> lm.name, tuple(lm.args[0].shape)
    ('gpt-tiny', (2, 32))
    >>> lm = resolve_model("hf:gpt2:n_layer=2,n_embd=64,n_head=4,vocab_size=128", batch=2, seq=16)
    >>> tuple(lm.kwargs["input_ids"].shape)
    (2, 16)

Every failure is a :class:`search.errors.BadInput` with one line saying what was expected.
"""
from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from search.errors import BadInput

_FORMS = "a zoo name (see `autopar models`), 'path/file.py:factory', or 'hf:<model_type>[:key=value,...]'"


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)


def resolve_model(spec: str, *, batch: int = 2, seq: int | None = None, device: str | torch.device = "meta") -> LoadedModel:
    """Load ``spec`` with example inputs of shape (batch, seq) on ``device``."""
    from examples.zoo import MODELS, build

    if not isinstance(spec, str) or not spec.strip():
        raise BadInput(f"empty model spec: expected {_FORMS}")
    spec = spec.strip()
    if spec in MODELS:
        model, args, kwargs = build(spec, batch=batch, seq=seq, device=device)
        return LoadedModel(spec, model, args, kwargs)
    if spec.startswith("hf:"):
        return _load_hf(spec, batch=batch, seq=seq, device=device)
    if ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        return _load_factory(spec, batch=batch, seq=seq)
    if spec.endswith(".py"):
        raise BadInput(f"model spec {spec!r} names a file but no factory: expected 'path/file.py:factory'")
    close = difflib.get_close_matches(spec, list(MODELS), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise BadInput(f"unknown model {spec!r}{hint}: expected {_FORMS}; zoo models: {', '.join(sorted(MODELS))}")


# --- path/file.py:factory -------------------------------------------------------------------------

def _load_factory(spec: str, *, batch: int, seq: int | None) -> LoadedModel:
    path_s, fname = spec.rsplit(":", 1)
    path = Path(path_s).expanduser()
    if not path.is_file():
        raise BadInput(f"model file {path_s!r} not found: expected 'path/file.py:factory' with an existing file")
    if not fname.isidentifier():
        raise BadInput(f"factory name {fname!r} in {spec!r} is not a Python identifier: expected 'path/file.py:factory'")
    mod_name = f"_autopar_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    try:
        sp = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(sp)
        sys.modules[mod_name] = module
        sp.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - user code
        sys.modules.pop(mod_name, None)
        raise BadInput(f"importing {path_s} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    factory = getattr(module, fname, None)
    if factory is None or not callable(factory):
        funcs = sorted(n for n, v in vars(module).items()
                       if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == mod_name)
        avail = f"; callables in the file: {', '.join(funcs)}" if funcs else ""
        raise BadInput(f"{path_s} has no callable {fname!r}: expected a function returning (model, example_inputs){avail}")
    call_kw = {}
    try:
        params = inspect.signature(factory).parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for key, val in (("batch", batch), ("seq", seq)):
            if var_kw or key in params:
                call_kw[key] = val
    except (TypeError, ValueError):
        pass
    try:
        out = factory(**call_kw)
    except Exception as exc:  # noqa: BLE001 - user code
        raise BadInput(f"factory {fname}() in {path_s} raised {type(exc).__name__}: {_first_line(exc)}") from None
    model, args, kwargs = _unpack_factory_result(out, f"{path_s}:{fname}")
    return LoadedModel(f"{path.stem}:{fname}", model, args, kwargs)


def _unpack_factory_result(out, where: str) -> tuple[torch.nn.Module, tuple, dict]:
    expected = "expected (model, example_inputs) with example_inputs a tuple, or (model, args, kwargs)"
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise BadInput(f"{where} returned {type(out).__name__}: {expected}")
    model = out[0]
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"{where} returned {type(model).__name__} as the model: {expected} (model an nn.Module)")
    args, kwargs = out[1], (out[2] if len(out) == 3 else {})
    if isinstance(args, torch.Tensor):
        args = (args,)
    elif isinstance(args, dict) and len(out) == 2:
        args, kwargs = (), args
    if not isinstance(args, (tuple, list)):
        raise BadInput(f"{where} returned example inputs of type {type(args).__name__}: {expected}")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise BadInput(f"{where} returned kwargs of type {type(kwargs).__name__}: {expected} (kwargs a dict)")
    return model, tuple(args), dict(kwargs)


# --- hf:<model_type>[:key=value,...] ----------------------------------------------------------------

def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _parse_kv(text: str, spec: str) -> dict:
    kv = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not key.isidentifier() or not val:
            raise BadInput(f"malformed config override {item!r} in {spec!r}: expected key=value pairs separated by commas, "
                           "e.g. hf:gpt2:n_layer=2,n_embd=64")
        kv[key] = _parse_value(val)
    return kv


def _load_hf(spec: str, *, batch: int, seq: int | None, device) -> LoadedModel:
    body = spec[3:]
    model_type, _, rest = body.partition(":")
    model_type = model_type.strip()
    if not model_type:
        raise BadInput(f"model spec {spec!r} has no model type: expected 'hf:<model_type>[:key=value,...]', e.g. hf:gpt2")
    kv = _parse_kv(rest, spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except Exception as exc:  # noqa: BLE001
        raise BadInput(f"'hf:' models need the transformers package ({type(exc).__name__}: {_first_line(exc)}): "
                       "pip install transformers") from None
    known = list(CONFIG_MAPPING.keys())
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, known, n=5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise BadInput(f"unknown Hugging Face model_type {model_type!r}: {hint}expected one of the {len(known)} "
                       f"types in transformers.CONFIG_MAPPING (e.g. gpt2, llama, mistral, bert, opt)")
    config_cls = CONFIG_MAPPING[model_type]
    try:
        default = config_cls()
    except Exception:  # noqa: BLE001 - some configs need arguments; skip key validation then
        default = None
    if default is not None:
        valid = set(default.to_dict()) | set(getattr(config_cls, "attribute_map", {}) or {})
        bad = [k for k in kv if k not in valid and not hasattr(default, k)]
        if bad:
            close = difflib.get_close_matches(bad[0], sorted(valid), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise BadInput(f"unknown {config_cls.__name__} field(s) {', '.join(bad)}{hint} in {spec!r}: "
                           f"expected keys of {config_cls.__name__}")
    try:
        config = AutoConfig.for_model(model_type, **kv)
    except Exception as exc:  # noqa: BLE001
        raise BadInput(f"building {config_cls.__name__} from {spec!r} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    if hasattr(config, "use_cache"):
        config.use_cache = False
    device = torch.device(device)
    model, errors = None, []
    autos = [AutoModelForCausalLM, AutoModelForMaskedLM]
    if _is_encoder_only(model_type, config):  # BERT-like: its "causal" head needs is_decoder=True; use MLM
        autos.reverse()
    for auto in autos:
        try:
            with device:
                model = auto.from_config(config)
            break
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{auto.__name__}: {type(exc).__name__}: {_first_line(exc)}")
    if model is None:
        raise BadInput(f"cannot build a causal or masked LM for model_type {model_type!r} "
                       f"(transformers {transformers.__version__}): {'; '.join(errors)}")
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    max_pos = _max_positions(config)
    if seq is None:
        seq = min(128, max_pos) if max_pos else 128
    elif max_pos and seq > max_pos:
        raise BadInput(f"seq {seq} exceeds {model_type}'s max positions {max_pos}: pass --seq <= {max_pos} "
                       f"or raise it in the spec (e.g. hf:{model_type}:n_positions=...)")
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 1:
        raise BadInput(f"{config_cls.__name__} has no vocab_size: cannot make example token ids for {spec!r}")
    if device.type == "meta":
        ids = torch.empty(batch, seq, dtype=torch.long, device=device)
    else:
        g = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.long).to(device)
    return LoadedModel(f"hf:{model_type}", model, (), {"input_ids": ids, "labels": ids})


def _is_encoder_only(model_type: str, config) -> bool:
    """A BERT-like encoder: has both a masked-LM and a causal-LM class, and is not configured as a decoder."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return (model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and not getattr(config, "is_encoder_decoder", False) and not getattr(config, "is_decoder", False))


def _max_positions(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        val = getattr(config, attr, None)
        if isinstance(val, int) and val > 0:
            return val
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
