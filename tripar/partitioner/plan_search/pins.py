"""What the user pinned, and the one clear error for pins that cannot hold.

:class:`Pins` fixes any of the search's choices (None: the search chooses it);
:func:`check_pins` rejects pins that contradict each other, the cluster, the batch or the
model before anything is costed, and :func:`no_config_message` says why no
configuration is left when the pins allow none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tripar.errors import ConfigError
from tripar.graph.proxy import ProxyGraph
from tripar.partitioner.hardware import Cluster
from tripar.plan.config import SCHEDULES


@dataclass(frozen=True, slots=True)
class Pins:
    """What the user fixed; None means the search chooses it."""

    dp: int | None = None
    tp: int | None = None
    pp: int | None = None
    vpp: int | None = None
    micro_batch_size: int | None = None
    schedule: str | None = None
    """One of SCHEDULES, or None (auto)."""
    recompute: str | None = None
    """``none``, ``full``, ``stage-aware``, or None (auto: stage-aware, which recomputes
    only what does not fit)."""
    zero: int | None = None

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "vpp", "micro_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"pinned {name} must be a positive integer, got {value!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of "
                              f"{', '.join(SCHEDULES)}")
        if self.recompute not in (None, "none", "full", "stage-aware"):
            raise ConfigError(f"unknown recompute {self.recompute!r}; choose none, full or "
                              f"stage-aware")
        if self.zero not in (None, 0, 1):
            raise ConfigError(f"zero must be 0 or 1, got {self.zero!r}")
        if self.vpp is not None and self.vpp > 1 and self.schedule not in (None,
                                                                           "interleaved-1f1b"):
            raise ConfigError(f"vpp={self.vpp} needs schedule interleaved-1f1b, but the "
                              f"schedule is pinned to {self.schedule!r}")


def divisors(n: int) -> list[int]:
    """Every divisor of ``n``, ascending.

    >>> divisors(12)
    [1, 2, 3, 4, 6, 12]
    """
    return [d for d in range(1, n + 1) if n % d == 0]


def check_pins(graph: ProxyGraph, cluster: Cluster, batch: int, pins: Pins,
               state: object) -> None:
    """One clear ConfigError for pins that contradict each other, the cluster, the batch
    or the model (``state``, the search's candidate space, is not read)."""
    devices, n = cluster.devices, len(graph.blocks)
    if pins.tp is not None and pins.tp > 1:
        proven = sorted({d for r in graph.tp_regions for d in r.degrees})
        if pins.tp not in proven:
            heads = graph.model_config.get("heads") or max(
                (r.heads for r in graph.tp_regions), default=0)
            why = (f"; the model has {heads} attention heads, which {pins.tp} does not divide"
                   if heads and heads % pins.tp else "")
            raise ConfigError(f"--tp {pins.tp}: no tensor-parallel region of the model is "
                              f"proven to shard {pins.tp} ways{why}; proven degrees: "
                              f"{', '.join(map(str, proven)) or 'none'} (or --tp 1)")
    for name in ("dp", "tp", "pp"):
        value = getattr(pins, name)
        if value is not None and devices % value:
            raise ConfigError(f"--{name} {value} does not divide the {devices} devices "
                              f"(dp*tp*pp must equal {devices}); pin one of "
                              f"{', '.join(map(str, divisors(devices)))}")
    pinned = [getattr(pins, k) for k in ("dp", "tp", "pp") if getattr(pins, k) is not None]
    product = math.prod(pinned)
    if pinned and (devices % product or (len(pinned) == 3 and product != devices)):
        raise ConfigError(f"the pinned degrees (dp={pins.dp}, tp={pins.tp}, pp={pins.pp}) "
                          f"multiply to {product}, which does not divide into the {devices} "
                          f"devices as dp*tp*pp = {devices}; change one of them")
    if pins.schedule == "scp" and pins.recompute == "none":
        raise ConfigError("schedule scp is 1f1b with stage-aware recomputation; with "
                          "--recompute none use --schedule 1f1b, or allow recomputation")
    if pins.pp is not None and pins.pp * (pins.vpp or 1) > n:
        raise ConfigError(f"pp*vpp = {pins.pp * (pins.vpp or 1)} stages for {n} blocks; "
                          f"each stage needs at least one block, use pp*vpp <= {n}")
    if pins.dp is not None and batch % pins.dp:
        raise ConfigError(f"the global batch {batch} is not divisible by dp={pins.dp}; use a "
                          f"global batch that is a multiple of {pins.dp} or another --dp")
    if pins.micro_batch_size is not None:
        dps = [pins.dp] if pins.dp else [d for d in divisors(devices)]
        if not any(batch % (d * pins.micro_batch_size) == 0 for d in dps):
            shown = (f"dp x micro-batch = {pins.dp} x {pins.micro_batch_size} = "
                     f"{pins.dp * pins.micro_batch_size}" if pins.dp else
                     f"micro-batch {pins.micro_batch_size} times any data-parallel degree")
            raise ConfigError(f"the global batch {batch} is not divisible by {shown}; use a "
                              f"global batch that is a multiple of it, or another "
                              f"--micro-batch" + ("/--dp" if pins.dp else ""))


def no_config_message(graph: ProxyGraph, cluster: Cluster, batch: int, pins: Pins) -> str:
    pinned = ", ".join(f"{k}={getattr(pins, k)}" for k in Pins.__slots__
                       if getattr(pins, k) is not None)
    return (f"no configuration matches {cluster.devices} devices, global batch {batch} and "
            f"{len(graph.blocks)} blocks" + (f" with the pins {pinned}" if pinned else "")
            + ": dp*tp*pp must equal the device count, dp must divide the global batch, "
              "tp must be a degree the model's tensor-parallel regions support, and "
              "pp*vpp must not exceed the blocks; relax a pin or change the batch")
