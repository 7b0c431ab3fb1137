"""Hardware profiles: what one device can do and how devices are connected.

A :class:`DeviceSpec` holds datasheet peaks (FLOP/s per dtype, memory,
memory bandwidth) and the :class:`Efficiency` curve that turns a peak into
what a kernel actually achieves. A :class:`Cluster` adds the topology:
nodes, devices per node and the intra-/inter-node links (bandwidth per
device and direction, latency per message).

The built-in GPUs carry the datasheet figures of ``shared/REFERENCE.md``
and the efficiency fitted to the Megatron-LM table
(``tripar/partitioner/calibration.json``, written by
``benchmarks/fit_calibration.py``). ``tripar calibrate`` measures the local
machine and writes a profile that :meth:`Cluster.from_file` reads back.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from tripar.errors import ConfigError

PROFILE_FORMAT = "tripar-cluster"
PROFILE_VERSION = 1
ADAM_STEP_BYTES = 28.0
"""Bytes a fused Adam step reads and writes per parameter (gradient, master, moments,
weight); ``Efficiency.optimizer_bytes`` defaults to it and ``tripar calibrate`` fits its
optimizer terms to timed AdamW steps: both describe an Adam step."""
OPTIMIZER_STEP_BYTES = {"adamw": ADAM_STEP_BYTES, "sgd": 12.0}
"""The optimizers the commands build (``--optimizer``), by the bytes their fused step reads
and writes per parameter: AdamW's weight, gradient and two moments; plain SGD's weight and
gradient (read) and weight (written)."""

DTYPE_BYTES = {"fp32": 4, "float32": 4, "tf32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2,
               "float16": 2, "fp64": 8, "float64": 8}
"""Bytes per element of the floating dtypes tripar trains in."""


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (``torch.float32`` and ``fp32`` spellings both work).

    >>> dtype_bytes("torch.bfloat16"), dtype_bytes("fp32")
    (2, 4)
    """
    key = canonical_dtype(dtype)
    return DTYPE_BYTES[key]


def canonical_dtype(dtype: str) -> str:
    """``fp32``, ``bf16``, ``fp16`` or ``fp64`` for any common spelling of a float dtype.

    >>> canonical_dtype("torch.float16")
    'fp16'
    """
    key = str(dtype).removeprefix("torch.").lower()
    aliases = {"float32": "fp32", "float": "fp32", "tf32": "fp32", "bfloat16": "bf16",
               "float16": "fp16", "half": "fp16", "float64": "fp64", "double": "fp64"}
    key = aliases.get(key, key)
    if key not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16, fp64")
    return key


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Achieved fractions of the datasheet peaks (fitted, never a single constant).

    A matrix product (m, k, n) reaches ``matmul_max * x / (x + matmul_half)``
    of peak FLOP/s, where ``x = m k n / (m k + k n + m n)`` is its arithmetic
    intensity in FLOPs per element moved, halved: small or skinny products
    are memory-bound and reach less. Work that is not a matrix product is
    charged by bytes over ``memory`` times the memory bandwidth, plus ``op_s`` per
    tensor operator and pass (CPU processes; 0 on GPUs). On a calibrated CPU the sum is
    scaled by ``block_forward`` / ``block_backward``, fitted to whole transformer blocks.

    >>> eff = Efficiency(matmul_max=0.8, matmul_half=100.0)
    >>> round(eff.matmul(4096, 4096, 4096), 3), round(eff.matmul(64, 64, 64), 3)
    (0.745, 0.141)
    """

    matmul_max: float
    """Fraction of peak FLOP/s an arbitrarily large matrix product reaches."""
    matmul_half: float
    """Size measure x at which a product reaches half of ``matmul_max``."""
    memory: float = 0.8
    """Fraction of the memory bandwidth that memory-bound kernels reach."""
    memory_traffic: float = 2.0
    """Bytes that non-matmul kernels (norms, softmax, activations, dropout) read and
    write in a forward pass per byte the block saves for backward; the backward moves
    twice as many."""
    link: float = 0.8
    """Fraction of a link's bandwidth that collectives and p2p reach (bus bandwidth)."""
    link_all_gather: float = 0.0
    """Fraction of the link an all-gather reaches, where it differs from the all-reduce's
    (gloo has no ring for it: on 2 CPU processes it is slower than half an all-reduce);
    ``tripar calibrate`` measures it. 0: ``link`` (built-in GPUs, older profiles)."""
    link_reduce_scatter: float = 0.0
    """The same for a reduce-scatter."""
    launch_s: float = 0.0
    """Fixed seconds per matrix product that no size hides (kernel launch, dispatch);
    0 where launches overlap the previous kernel, as in large-model training."""
    op_s: float = 0.0
    """Fixed seconds per tensor operator (``Block.ops``) and pass, forward and backward
    alike: Python, dispatch and autograd bookkeeping that runs on the critical path of
    a CPU process; 0 on GPUs, where it overlaps the kernels."""
    optimizer_bytes: float = ADAM_STEP_BYTES
    """Bytes an Adam step moves per parameter, at ``memory`` x the bandwidth (a fused
    Adam: 28; a per-tensor one reads and writes more). Another optimizer is costed by
    :meth:`Cluster.with_optimizer`."""
    optimizer_tensor_s: float = 0.0
    """Fixed seconds per parameter tensor and optimizer step (a per-tensor loop's kernel
    calls); 0 for fused or multi-tensor optimizers on GPUs."""
    block_forward: float = 1.0
    """Measured over modelled forward seconds of whole transformer blocks, fitted by
    ``tripar calibrate`` on a CPU (see ``fit_block_scales``): what the per-component terms
    above miss in a real layer (the attention kernel beyond its two products, the linear
    layers' bias and layout work). Multiplies a block's forward compute; 1 leaves the
    component model as it is (the built-in GPUs, profiles written before it existed)."""
    block_backward: float = 1.0
    """The same for the backward (B and W): measured over modelled backward seconds of
    whole blocks (autograd's bias-gradient reductions and gradient accumulation, the
    attention kernel's backward, which re-runs its products)."""
    node_sharing: float = 1.0
    """Factor on a block's compute when the other devices of its node compute at the same
    time (a plan of more than one device): CPU processes share the caches and the memory
    bandwidth. ``tripar calibrate`` fits it to blocks timed in 2 processes at once over
    the same blocks alone; 1 on GPUs (each has its own memory) and in older profiles."""
    source: str = ""
    """Where the numbers come from (fit, measurement)."""

    def __post_init__(self) -> None:
        for name in ("matmul_max", "memory", "link"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"Efficiency.{name} must be in (0, 1], got {value}")
        for name in ("link_all_gather", "link_reduce_scatter"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"Efficiency.{name} must be in [0, 1] (0: the all-reduce's "
                                  f"link), got {value}")
        for name in ("matmul_half", "memory_traffic", "launch_s", "op_s", "optimizer_bytes",
                     "optimizer_tensor_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"Efficiency.{name} must be a finite number >= 0, got {value}")
        for name in ("block_forward", "block_backward", "node_sharing"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"Efficiency.{name} must be a finite number > 0, got {value} "
                                  f"(1 keeps the component model)")

    @staticmethod
    def size(m: float, k: float, n: float) -> float:
        """The size measure x of a product (m, k) @ (k, n)."""
        return m * k * n / (m * k + k * n + m * n)

    def matmul(self, m: float, k: float, n: float) -> float:
        """Fraction of peak FLOP/s a product (m, k) @ (k, n) reaches."""
        x = self.size(m, k, n)
        return self.matmul_max * x / (x + self.matmul_half)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Efficiency:
        """The inverse of ``to_dict``; ConfigError names a missing, unknown or mistyped field.

        >>> Efficiency.from_dict({"matmul_max": 0.8, "matmul_half": "big"})
        Traceback (most recent call last):
        ...
        tripar.errors.ConfigError: efficiency field 'matmul_half' must be a number, got 'big'
        """
        data = _object(data, "efficiency")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown efficiency fields {sorted(unknown)}; known: {sorted(known)}")
        values = {name: _number(data, name, "efficiency") for name in known - {"source"}
                  if name in data or name in ("matmul_max", "matmul_half")}
        if "source" in data:
            values["source"] = _typed(data, "source", str, "efficiency")
        return cls(**values)


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One accelerator (or a CPU process): datasheet peaks plus its efficiency curve.

    >>> a100 = builtin_device("a100-80g")
    >>> a100.peak("bf16") / 1e12, a100.memory_bytes // 10**9
    (312.0, 80)
    """

    name: str
    peak_flops: tuple[tuple[str, float], ...]
    """(dtype, dense FLOP/s) pairs; dtype in fp32, bf16, fp16."""
    memory_bytes: int
    memory_bandwidth: float
    """Bytes per second of device memory."""
    efficiency: Efficiency
    default_dtype: str = "bf16"
    """The dtype training runs in on this device unless told otherwise."""

    def __post_init__(self) -> None:
        if not self.peak_flops or any(f <= 0 for _, f in self.peak_flops):
            raise ConfigError(f"device {self.name!r} needs positive peak FLOP/s, got "
                              f"{self.peak_flops}")
        if self.memory_bytes <= 0 or self.memory_bandwidth <= 0:
            raise ConfigError(f"device {self.name!r} needs positive memory and bandwidth, got "
                              f"{self.memory_bytes} B and {self.memory_bandwidth} B/s")

    def peak(self, dtype: str) -> float:
        """Dense peak FLOP/s in ``dtype`` (bf16 and fp16 fall back to each other)."""
        table = dict(self.peak_flops)
        key = canonical_dtype(dtype)
        for candidate in (key, {"bf16": "fp16", "fp16": "bf16"}.get(key, key)):
            if candidate in table:
                return table[candidate]
        raise ConfigError(f"device {self.name!r} has no peak for {dtype!r}; it lists "
                          f"{', '.join(table)}")

    def to_dict(self) -> dict:
        return {"name": self.name, "peak_flops": dict(self.peak_flops),
                "memory_bytes": self.memory_bytes, "memory_bandwidth": self.memory_bandwidth,
                "efficiency": self.efficiency.to_dict(), "default_dtype": self.default_dtype}

    @classmethod
    def from_dict(cls, data: dict) -> DeviceSpec:
        """The inverse of ``to_dict``; ConfigError names a missing or mistyped field."""
        data = _object(data, "device profile")
        peaks = _typed(data, "peak_flops", dict, "device profile")
        for dtype, flops in peaks.items():
            if isinstance(flops, bool) or not isinstance(flops, (int, float)) \
                    or not math.isfinite(flops):
                raise ConfigError(f"device profile field 'peak_flops' must map dtypes to "
                                  f"FLOP/s, got {dtype!r}: {_show(flops)}")
        return cls(name=_typed(data, "name", str, "device profile"),
                   peak_flops=tuple((canonical_dtype(k), float(v)) for k, v in peaks.items()),
                   memory_bytes=_typed(data, "memory_bytes", int, "device profile"),
                   memory_bandwidth=_number(data, "memory_bandwidth", "device profile"),
                   efficiency=Efficiency.from_dict(_typed(data, "efficiency", dict,
                                                          "device profile")),
                   default_dtype=canonical_dtype(_typed(data, "default_dtype", str,
                                                        "device profile", default="bf16")))


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_KIND = {int: "an integer", str: "a string", dict: "an object", float: "a number"}


def _object(data: object, owner: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{owner} must be a JSON object, got {_show(data)}")
    return data


def _typed(data: dict, name: str, kind: type, owner: str, *, default: object = ...) -> Any:
    """``data[name]`` if it is a ``kind`` (a bool is no int); ConfigError naming it otherwise."""
    if name not in data:
        if default is not ...:
            return default
        raise ConfigError(f"{owner} lacks field {name!r} ({_KIND[kind]}); write the profile "
                          f"with `tripar calibrate` or add the field")
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{owner} field {name!r} must be {_KIND[kind]}, got {_show(value)}")
    return value


def _number(data: dict, name: str, owner: str) -> float:
    """``data[name]`` as a finite float (an int is fine); ConfigError naming it otherwise."""
    if name not in data:
        raise ConfigError(f"{owner} lacks field {name!r} (a number); write the profile with "
                          f"`tripar calibrate` or add the field")
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{owner} field {name!r} must be a number, got {_show(value)}")
    if not math.isfinite(value):
        raise ConfigError(f"{owner} field {name!r} must be a finite number, got {value}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Cluster:
    """Identical devices in identical nodes.

    Bandwidths are per device and direction (a node's network is shared by
    its devices); latencies are per message.

    >>> c = Cluster.builtin("a100-80g", nodes=4, gpus_per_node=8)
    >>> c.devices, c.intra_bandwidth / 1e9, c.inter_bandwidth / 1e9
    (32, 300.0, 25.0)
    """

    device: DeviceSpec
    nodes: int
    devices_per_node: int
    intra_bandwidth: float
    """Bytes/s one device sends to another of its node (NVLink, shared memory)."""
    intra_latency: float
    """Seconds per message inside a node."""
    inter_bandwidth: float
    """Bytes/s one device sends to another node (its share of the node's network)."""
    inter_latency: float
    """Seconds per message between nodes."""
    name: str = ""
    measured: dict = field(default_factory=dict, compare=False)
    """Raw measurements of ``tripar calibrate`` (matmul sweep, bandwidths), for reports."""

    def __post_init__(self) -> None:
        for attr in ("nodes", "devices_per_node"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"cluster {attr} must be a positive integer, got {value!r}")
        for attr in ("intra_bandwidth", "inter_bandwidth"):
            value = getattr(self, attr)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"cluster {attr} must be a finite number of bytes/s > 0, got "
                                  f"{value}; give each device's bandwidth per direction "
                                  f"(`tripar calibrate` measures it)")
        for attr in ("intra_latency", "inter_latency"):
            value = getattr(self, attr)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"cluster {attr} must be a finite number of seconds >= 0, "
                                  f"got {value}")

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node

    def link(self, crosses_nodes: bool, kind: str = "all_reduce") -> tuple[float, float]:
        """(latency s, achieved bandwidth B/s) of the link, efficiency applied: the one of
        the collective ``kind`` (``all_gather``, ``reduce_scatter``) where it was measured,
        else the all-reduce's (and p2p's)."""
        eff = self.device.efficiency
        eff = {"all_gather": eff.link_all_gather,
               "reduce_scatter": eff.link_reduce_scatter}.get(kind) or eff.link
        if crosses_nodes:
            return self.inter_latency, self.inter_bandwidth * eff
        return self.intra_latency, self.intra_bandwidth * eff

    def with_optimizer(self, step_bytes: float) -> Cluster:
        """The same cluster costing an optimizer whose fused step reads and writes
        ``step_bytes`` per parameter (SGD 12, with momentum 20, Adam 28): the optimizer terms,
        which describe an Adam step (fitted to AdamW steps, or a fused Adam's 28 B), scaled
        by ``step_bytes / 28``, the bytes and the per-tensor calls alike.

        >>> a100 = Cluster.builtin("a100-80g")
        >>> a100.with_optimizer(12.0).device.efficiency.optimizer_bytes
        12.0
        """
        if not (step_bytes > 0 and math.isfinite(step_bytes)):
            raise ConfigError(f"an optimizer step moves a positive number of bytes per "
                              f"parameter, got {step_bytes}")
        eff = self.device.efficiency
        scale = step_bytes / ADAM_STEP_BYTES
        scaled = replace(eff, optimizer_bytes=eff.optimizer_bytes * scale,
                         optimizer_tensor_s=eff.optimizer_tensor_s * scale)
        return replace(self, device=replace(self.device, efficiency=scaled))

    def resized(self, *, nodes: int | None = None, devices_per_node: int | None = None) -> Cluster:
        """The same hardware with another node count or node size."""
        return replace(self, nodes=nodes or self.nodes,
                       devices_per_node=devices_per_node or self.devices_per_node)

    @classmethod
    def builtin(cls, gpu: str, *, nodes: int = 1, gpus_per_node: int = 8) -> Cluster:
        """A cluster of built-in devices, with the vendor's node network."""
        spec = builtin_device(gpu)
        links = _LINKS[spec.name]
        return cls(device=spec, nodes=nodes, devices_per_node=gpus_per_node,
                   intra_bandwidth=links[0], intra_latency=links[1],
                   inter_bandwidth=links[2], inter_latency=links[3],
                   name=f"{nodes}x{gpus_per_node} {spec.name}")

    def to_dict(self) -> dict:
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "name": self.name,
                "device": self.device.to_dict(), "nodes": self.nodes,
                "devices_per_node": self.devices_per_node,
                "intra_bandwidth": self.intra_bandwidth, "intra_latency": self.intra_latency,
                "inter_bandwidth": self.inter_bandwidth, "inter_latency": self.inter_latency,
                "measured": self.measured}

    @classmethod
    def from_dict(cls, data: dict) -> Cluster:
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ConfigError(f"not a tripar cluster profile: expected \"format\": "
                              f"\"{PROFILE_FORMAT}\" (write one with `tripar calibrate`)")
        if data.get("version") != PROFILE_VERSION:
            raise ConfigError(f"cluster profile version {data.get('version')!r} is not "
                              f"supported; this tripar reads version {PROFILE_VERSION}")
        device = data.get("device")
        if isinstance(device, str):
            spec = builtin_device(device)
        elif isinstance(device, dict):
            spec = DeviceSpec.from_dict(device)
        else:
            raise ConfigError("cluster profile needs \"device\": a built-in name "
                              f"({', '.join(BUILTIN_DEVICES)}) or a device object")
        owner = "cluster profile"
        return cls(device=spec, nodes=_typed(data, "nodes", int, owner),
                   devices_per_node=_typed(data, "devices_per_node", int, owner),
                   intra_bandwidth=_number(data, "intra_bandwidth", owner),
                   intra_latency=_number(data, "intra_latency", owner),
                   inter_bandwidth=_number(data, "inter_bandwidth", owner),
                   inter_latency=_number(data, "inter_latency", owner),
                   name=_typed(data, "name", str, owner, default=""),
                   measured=dict(_typed(data, "measured", dict, owner, default={})))

    def to_file(self, path: str | Path) -> None:
        """Write the profile as JSON (what ``--cluster FILE`` reads)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_file(cls, path: str | Path) -> Cluster:
        """Read a profile written by :meth:`to_file` or ``tripar calibrate``."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"cannot read cluster profile {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"cluster profile {path} is not UTF-8 text; write it with "
                              f"`tripar calibrate`") from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:  # JSONDecodeError, too long a number
            raise ConfigError(f"cluster profile {path} is not valid JSON: {error}; write it "
                              f"with `tripar calibrate`") from None
        try:
            return cls.from_dict(data)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None


# Datasheet figures (shared/REFERENCE.md). Peaks are dense; fp32 is the
# non-tensor-core figure. Bandwidths are per direction: NVLink's "600 GB/s"
# counts both directions, so one direction is 300 GB/s; a node's InfiniBand
# (8 x 200 Gb/s on DGX A100) is shared by its 8 GPUs: 25 GB/s each.
_GB = 1e9
_DEVICES: dict[str, tuple[dict[str, float], int, float]] = {
    # name: ({dtype: FLOP/s}, memory bytes, memory bandwidth B/s)
    "a100-40g": ({"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}, 40 * 10**9, 1.555e12),
    "a100-80g": ({"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}, 80 * 10**9, 2.039e12),
    "h100-80g": ({"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 80 * 10**9, 3.35e12),
    "h200": ({"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 141 * 10**9, 4.8e12),
    "v100-32g": ({"fp16": 125e12, "fp32": 15.7e12}, 32 * 10**9, 0.9e12),
    # One CPU process, as `tripar calibrate` measured the 2-core development VM (one thread:
    # 36 GFLOP/s fp32, 11.5 GB/s copy): no datasheet; calibrate your own machine.
    "cpu": ({"fp32": 36e9, "bf16": 36e9}, 16 * 2**30, 11.5e9),
}
# name: (intra B/s, intra latency s, inter B/s per device, inter latency s)
_LINKS: dict[str, tuple[float, float, float, float]] = {
    "a100-40g": (300 * _GB, 5e-6, 25 * _GB, 10e-6),
    "a100-80g": (300 * _GB, 5e-6, 25 * _GB, 10e-6),
    "h100-80g": (450 * _GB, 5e-6, 50 * _GB, 10e-6),
    "h200": (450 * _GB, 5e-6, 50 * _GB, 10e-6),
    # DGX-1: NVLink 300 GB/s both directions; 4 x 100 Gb/s EDR InfiniBand per 8 GPUs.
    "v100-32g": (150 * _GB, 5e-6, 6.25 * _GB, 10e-6),
    "cpu": (2.4 * _GB, 50e-6, 1.25 * _GB, 50e-6),  # gloo over loopback; 10 GbE between nodes
}

BUILTIN_DEVICES = tuple(_DEVICES)
"""Names ``--gpu`` accepts."""


def load_calibration() -> dict:
    """The fitted efficiency parameters shipped in ``calibration.json``.

    >>> sorted(load_calibration()["efficiency"])
    ['cpu', 'gpu']
    """
    text = resources.files("tripar.partitioner").joinpath("calibration.json").read_text()
    return json.loads(text)


def builtin_efficiency(kind: str) -> Efficiency:
    """The shipped efficiency curve for ``gpu`` or ``cpu`` devices."""
    data = load_calibration()["efficiency"][kind]
    return Efficiency.from_dict(data)


def builtin_device(name: str) -> DeviceSpec:
    """A built-in device by name; ConfigError names the known ones otherwise.

    >>> builtin_device("h100-80g").peak("bf16") / 1e12
    989.0
    """
    key = name.lower()
    if key not in _DEVICES:
        raise ConfigError(f"unknown GPU {name!r}; known devices: {', '.join(BUILTIN_DEVICES)} "
                          "(or measure this machine with `tripar calibrate` and pass --cluster)")
    peaks, memory, bandwidth = _DEVICES[key]
    kind = "cpu" if key == "cpu" else "gpu"
    return DeviceSpec(name=key, peak_flops=tuple(peaks.items()), memory_bytes=memory,
                      memory_bandwidth=bandwidth, efficiency=builtin_efficiency(kind),
                      default_dtype="fp32" if kind == "cpu" else "bf16")


def fit_matmul_times(samples: list[tuple[int, int, int, float]]) -> tuple[float, float, float]:
    """Fit ``seconds = 2 m k n / (peak x / (x + x_half)) + launch`` to measured products.

    For a fixed ``x_half`` the model is linear in ``1 / peak`` and ``launch``, solved by
    least squares on relative errors; ``x_half`` is searched on a log grid and refined.
    Returns (peak FLOP/s, x_half, launch seconds), the curve's ``e_max`` being 1.

    >>> def seconds(s):  # peak 1 TFLOP/s, x_half 100, 10 us per launch
    ...     x = Efficiency.size(s, s, s)
    ...     return 2 * s**3 / (1e12 * x / (x + 100.0)) + 1e-5
    >>> fitted = fit_matmul_times([(s, s, s, seconds(s)) for s in (64, 256, 1024, 4096)])
    >>> round(fitted[0] / 1e12, 3), round(fitted[1]), round(fitted[2] * 1e6, 2)
    (1.0, 100, 10.0)
    """
    points = [(2.0 * m * k * n, Efficiency.size(m, k, n), t) for m, k, n, t in samples if t > 0]
    if len(points) < 3:
        raise ConfigError(f"need at least 3 timed products to fit, got {len(points)}")

    def solve(half: float) -> tuple[float, float, float]:
        # minimise sum ((a u_i + b) / t_i - 1)^2 with u_i = flops (x + half) / x
        rows = [(f * (x + half) / x / t, 1.0 / t) for f, x, t in points]
        suu = sum(u * u for u, _ in rows)
        svv = sum(v * v for _, v in rows)
        suv = sum(u * v for u, v in rows)
        su, sv = sum(u for u, _ in rows), sum(v for _, v in rows)
        det = suu * svv - suv * suv
        a, b = ((su * svv - sv * suv) / det, (sv * suu - su * suv) / det) if det else (0.0, 0.0)
        if b < 0 or a <= 0:  # no fixed cost: fit the slope alone
            a, b = su / suu, 0.0
        error = sum((a * u + b * v - 1.0) ** 2 for u, v in rows)
        return error, a, b

    xs = [x for _, x, _ in points]
    lo, hi = math.log(min(xs) * 1e-3), math.log(max(xs) * 1e2)
    grid = [lo + (hi - lo) * i / 199 for i in range(200)]
    best = min(range(200), key=lambda i: solve(math.exp(grid[i]))[0])
    a_log, b_log = grid[max(best - 1, 0)], grid[min(best + 1, 199)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        c, d = b_log - ratio * (b_log - a_log), a_log + ratio * (b_log - a_log)
        if solve(math.exp(c))[0] < solve(math.exp(d))[0]:
            b_log = d
        else:
            a_log = c
    half = math.exp((a_log + b_log) / 2)
    _, a, b = solve(half)
    return 1.0 / a, half, b
