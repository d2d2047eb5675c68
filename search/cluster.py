"""Cluster profiles: devices, per-device peak FLOP/s and memory, link bandwidth/latency (DESIGN §2).

A :class:`Cluster` is frozen and hashable. Built-in profiles are ``a100-80g``, ``h100-80g`` and
``cpu`` (this machine, measured by ``python -m runtime.calibrate`` and only *loaded* here).
Any other name is treated as a path to a JSON file in :meth:`Cluster.to_dict` format.

>>> c = get_cluster("a100-80g", devices=16)
>>> (c.nodes, c.devices_per_node, c.devices)
(2, 8, 16)

fp32 peak: the built-in GPU profiles use the true FP32 (non-tensor-core) rate, because PyTorch's
default is ``torch.backends.cuda.matmul.allow_tf32 = False``; a user who enables TF32 can write a
JSON profile with ``"fp32": 156e12`` (A100) / ``494e12`` (H100 dense TF32).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from search.errors import BadInput

DTYPES = ("fp32", "bf16", "fp16")
GiB = 1024 ** 3

_FIELDS = (
    "name", "nodes", "devices_per_node", "peak_flops", "memory_bytes", "memory_bandwidth",
    "intra_bandwidth", "intra_latency", "inter_bandwidth", "inter_latency", "compute_efficiency",
    "kernel_launch_s", "collective_factor",
)
FACTOR_KINDS = ("all_gather", "reduce_scatter")  # collectives a profile may price off the ring model
KERNEL_LAUNCH_S = 5e-6  # fixed cost of one kernel launch on a GPU; profiles without a measured one get it


@dataclass(frozen=True)
class Cluster:
    """``nodes`` × ``devices_per_node`` identical devices. Bandwidths are bytes/s per device
    (one direction); latencies in seconds; ``peak_flops`` is a sorted tuple of (dtype, FLOP/s)."""

    name: str
    nodes: int
    devices_per_node: int
    peak_flops: tuple[tuple[str, float], ...]
    memory_bytes: int
    memory_bandwidth: float
    intra_bandwidth: float
    intra_latency: float
    inter_bandwidth: float
    inter_latency: float
    compute_efficiency: float = 0.6
    kernel_launch_s: float = KERNEL_LAUNCH_S  # per-kernel overhead: what makes many small chunks slower than one op
    # measured time of a collective kind over its ring-model time (1 when absent): gloo's reduce-scatter
    # costs an all-reduce, so the measured ``cpu`` profile prices it at about 2
    collective_factor: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        for field in ("peak_flops", "collective_factor"):
            v = getattr(self, field)
            object.__setattr__(self, field, tuple(sorted(v.items() if isinstance(v, dict) else (tuple(x) for x in v))))

    def factor(self, kind: str) -> float:
        """How much slower than the ring model a ``kind`` collective runs on this cluster."""
        return dict(self.collective_factor).get(kind, 1.0)

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s per device for ``dtype`` ("fp32", "bf16", "fp16"; torch names accepted)."""
        key = normalize_dtype(dtype)
        for k, v in self.peak_flops:
            if k == key:
                return v
        raise BadInput(f"cluster {self.name!r} has no peak FLOP/s for dtype {dtype!r}; "
                       f"it knows {[k for k, _ in self.peak_flops]}")

    def with_devices(self, n: int) -> "Cluster":
        """Same device/link profile with ``n`` devices: one partial node when n <= devices_per_node,
        else ``n / devices_per_node`` full nodes."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise BadInput(f"devices must be a positive integer, got {n!r}")
        dpn = self.devices_per_node
        if n <= dpn:
            return replace(self, nodes=1, devices_per_node=n)
        if n % dpn:
            lo, hi = (n // dpn) * dpn, (n // dpn + 1) * dpn
            raise BadInput(
                f"devices={n} does not fill whole nodes of cluster {self.name!r} "
                f"({dpn} devices per node); use at most {dpn} devices (one node) or a multiple of "
                f"{dpn}, e.g. {lo} or {hi}")
        return replace(self, nodes=n // dpn)

    def to_dict(self) -> dict:
        d = {f: getattr(self, f) for f in _FIELDS}
        d["peak_flops"] = dict(self.peak_flops)
        d["collective_factor"] = dict(self.collective_factor)
        return d

    @classmethod
    def from_dict(cls, d, *, source: str = "cluster") -> "Cluster":
        """Validate and build. Every error is a BadInput naming the field."""
        if not isinstance(d, dict):
            raise BadInput(f"{source}: expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_FIELDS), key=str)
        if unknown:
            raise BadInput(f"{source}: unknown field(s) {unknown}; known fields: {list(_FIELDS)}")
        required = [f for f in _FIELDS if f not in ("compute_efficiency", "kernel_launch_s", "collective_factor")]
        missing = [f for f in required if f not in d]
        if missing:
            raise BadInput(f"{source}: missing field(s) {missing}")

        def num(field, value, *, integer=False, allow_zero=False, at_most=None):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadInput(f"{source}: field {field!r} must be a number, got {value!r}")
            if integer and not (isinstance(value, int) or float(value).is_integer()):
                raise BadInput(f"{source}: field {field!r} must be an integer, got {value!r}")
            try:
                fvalue = float(value)
            except OverflowError:
                raise BadInput(f"{source}: field {field!r} is out of range: {value!r}") from None
            if not math.isfinite(fvalue) or value < 0 or (value == 0 and not allow_zero):
                raise BadInput(f"{source}: field {field!r} must be a finite "
                               f"{'non-negative' if allow_zero else 'positive'} number, got {value!r}")
            if at_most is not None and value > at_most:
                raise BadInput(f"{source}: field {field!r} must be <= {at_most}, got {value!r}")
            return int(value) if integer else float(value)

        name = d["name"]
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise BadInput(f"{source}: field 'name' must be a non-empty string, got {name!r}")
        pf = d["peak_flops"]
        if not isinstance(pf, dict) or not pf:
            raise BadInput(f"{source}: field 'peak_flops' must be an object mapping dtype "
                           f"({', '.join(DTYPES)}) to FLOP/s, got {pf!r}")
        peaks = {}
        for k, v in pf.items():
            if k not in DTYPES:
                raise BadInput(f"{source}: field 'peak_flops' has unknown dtype {k!r}; "
                               f"known: {list(DTYPES)}")
            peaks[k] = num(f"peak_flops.{k}", v)
        if "fp32" not in peaks:
            raise BadInput(f"{source}: field 'peak_flops' must give at least 'fp32'")
        cf = d.get("collective_factor", {})
        if not isinstance(cf, dict) or set(cf) - set(FACTOR_KINDS):
            raise BadInput(f"{source}: field 'collective_factor' must be an object mapping some of "
                           f"{', '.join(FACTOR_KINDS)} to a number, got {cf!r}")
        factors = {k: num(f"collective_factor.{k}", v, at_most=100.0) for k, v in cf.items()}
        return cls(
            name=name,
            nodes=num("nodes", d["nodes"], integer=True),
            devices_per_node=num("devices_per_node", d["devices_per_node"], integer=True),
            peak_flops=tuple(sorted(peaks.items())),
            memory_bytes=num("memory_bytes", d["memory_bytes"], integer=True),
            memory_bandwidth=num("memory_bandwidth", d["memory_bandwidth"]),
            intra_bandwidth=num("intra_bandwidth", d["intra_bandwidth"]),
            intra_latency=num("intra_latency", d["intra_latency"], allow_zero=True),
            inter_bandwidth=num("inter_bandwidth", d["inter_bandwidth"]),
            inter_latency=num("inter_latency", d["inter_latency"], allow_zero=True),
            compute_efficiency=num("compute_efficiency", d.get("compute_efficiency", 0.6), at_most=1.0),
            kernel_launch_s=num("kernel_launch_s", d.get("kernel_launch_s", KERNEL_LAUNCH_S), allow_zero=True, at_most=1.0),
            collective_factor=tuple(sorted(factors.items())),
        )


def normalize_dtype(dtype) -> str:
    """"fp32"/"float32"/torch.float32 -> "fp32"; likewise bf16, fp16."""
    s = str(dtype).replace("torch.", "").lower()
    aliases = {"fp32": "fp32", "float32": "fp32", "float": "fp32",
               "bf16": "bf16", "bfloat16": "bf16",
               "fp16": "fp16", "float16": "fp16", "half": "fp16"}
    if s not in aliases:
        raise BadInput(f"unknown dtype {dtype!r}; use one of {list(DTYPES)}")
    return aliases[s]


A100_80G = Cluster(
    name="a100-80g", nodes=1, devices_per_node=8,
    peak_flops=(("bf16", 312e12), ("fp16", 312e12), ("fp32", 19.5e12)),
    memory_bytes=80 * GiB, memory_bandwidth=2.0e12,
    intra_bandwidth=300e9, intra_latency=5e-6,      # NVLink3/NVSwitch, 300 GB/s per direction per GPU
    inter_bandwidth=25e9, inter_latency=1e-5,       # 8x200 Gb/s HDR IB per node -> 25 GB/s per GPU
    compute_efficiency=0.6,
)
H100_80G = Cluster(
    name="h100-80g", nodes=1, devices_per_node=8,
    peak_flops=(("bf16", 989e12), ("fp16", 989e12), ("fp32", 67e12)),
    memory_bytes=80 * GiB, memory_bandwidth=3.35e12,
    intra_bandwidth=450e9, intra_latency=5e-6,      # NVLink4, 450 GB/s per direction per GPU
    inter_bandwidth=50e9, inter_latency=1e-5,       # 8x400 Gb/s NDR IB per node -> 50 GB/s per GPU
    compute_efficiency=0.6,
)
_BUILTIN = {c.name: c for c in (A100_80G, H100_80G)}


def builtin_names() -> list[str]:
    return sorted([*_BUILTIN, "cpu"])


def cpu_cache_path(ranks: int = 2) -> Path:
    """Where the ``cpu`` profile measured for ``ranks`` ranks lives: ``$AUTOPAR_CACHE/cpu-<ranks>.json``
    when AUTOPAR_CACHE is set (a directory), else ``~/.cache/autopar/cpu-<ranks>.json`` (ranks share
    the cores, so each rank count has its own profile)."""
    root = os.environ.get("AUTOPAR_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "autopar"
    return base / f"cpu-{ranks}.json"


def load_cluster_file(path, *, source: str | None = None) -> Cluster:
    """Read and validate a JSON cluster file (json only; never executes anything)."""
    p = Path(path)
    src = source or str(p)
    try:
        if p.stat().st_size > 1_000_000:
            raise BadInput(f"{src}: cluster file is too large ({p.stat().st_size} bytes) to be a cluster profile")
        text = p.read_text(encoding="utf-8")
    except BadInput:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read cluster file {src}: {e}") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise BadInput(f"cluster file {src} is not valid JSON: {e}") from None
    return Cluster.from_dict(data, source=f"cluster file {src}")


def load_cpu_profile(path=None, ranks: int = 2) -> Cluster:
    """Load the ``cpu`` profile measured for ``ranks`` ranks; BadInput telling the user to calibrate
    when missing."""
    p = Path(path) if path is not None else cpu_cache_path(ranks)
    if not p.exists():
        raise BadInput(f"no measured 'cpu' cluster profile at {p}; run calibration first: "
                       f"python -m runtime.calibrate --ranks {ranks} (set AUTOPAR_CACHE to choose the cache "
                       "directory)")
    return load_cluster_file(p)


def get_cluster(name_or_path: str, devices: int | None = None) -> Cluster:
    """Built-in profile by name, or a JSON cluster file by path; resized to ``devices`` if given."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise BadInput(f"cluster must be a built-in name ({', '.join(builtin_names())}) "
                       f"or a JSON file path, got {name_or_path!r}")
    if name_or_path in _BUILTIN:
        c = _BUILTIN[name_or_path]
    elif name_or_path == "cpu":
        c = load_cpu_profile(ranks=devices or 2)
    else:
        p = Path(name_or_path)
        if p.exists():
            c = load_cluster_file(p)
        elif name_or_path.endswith(".json") or os.sep in name_or_path:
            raise BadInput(f"cluster file {name_or_path} does not exist")
        else:
            raise BadInput(f"unknown cluster {name_or_path!r}; built-in clusters: "
                           f"{', '.join(builtin_names())} (or give a path to a JSON cluster file)")
    return c if devices is None else c.with_devices(devices)
