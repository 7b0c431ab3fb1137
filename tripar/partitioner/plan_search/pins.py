"""What the user pinned, and the one check of pins that cannot hold.

:class:`Pins` fixes any of the search's choices (None: the search chooses it). It is
the options object of ``tripar.auto_parallel`` (whose keyword pins fill one in) and of
``tripar plan``/``simulate``/``train`` (whose flags do). :func:`check_pins` is the one
place pins are checked -- their values, against each other, the devices, the global
batch and the model -- before anything is costed or any process starts. Its errors
name each pin in the caller's language (:class:`Spelling`): ``tp=3`` for the Python
API, ``--tp 3`` for the command line. :func:`no_config_message` says why no
configuration is left when the pins allow none.

>>> try:
...     check_pins(Pins(dp=3), devices=8, global_batch=16)
... except ConfigError as error:
...     print(error)
dp=3 does not divide the 8 devices (dp*tp*pp must equal 8); pin dp to one of 1, 2, 4, 8
>>> try:
...     check_pins(Pins(dp=3), devices=8, global_batch=16, spelling=Spelling.CLI)
... except ConfigError as error:
...     print(error)
--dp 3 does not divide the 8 devices (dp*tp*pp must equal 8); pin --dp to one of 1, 2, 4, 8
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields
from typing import Any

from tripar.errors import ConfigError
from tripar.graph.proxy import ProxyGraph
from tripar.partitioner.hardware import Cluster
from tripar.plan.config import RECOMPUTE, SCHEDULES, ZERO_STAGES

__all__ = ["Pins", "Spelling", "check_pins", "divisors", "no_config_message"]

_DEGREES = ("dp", "tp", "pp")
_COUNTS = ("dp", "tp", "pp", "vpp", "micro_batch_size", "num_microbatches")


@dataclass(frozen=True, slots=True)
class Pins:
    """What the user fixed; None means the search chooses it."""

    dp: int | None = None
    """Data-parallel degree: replicas of the model, each with its share of the batch."""
    tp: int | None = None
    """Tensor-parallel degree: ranks each layer's proven regions are sharded over."""
    pp: int | None = None
    """Pipeline-parallel degree: ranks the stages are spread over."""
    vpp: int | None = None
    """Virtual stages per pipeline rank (> 1 means the interleaved-1f1b schedule)."""
    micro_batch_size: int | None = None
    """Samples per microbatch."""
    num_microbatches: int | None = None
    """Microbatches per data-parallel replica per step (global batch = dp x micro batch
    size x num_microbatches)."""
    schedule: str | None = None
    """One of SCHEDULES (``gpipe``, ``1f1b``, ``interleaved-1f1b``, ``zb-h1``, ``scp``,
    ``chimera``: two pipelines in opposite directions, even pp and microbatches)."""
    recompute: str | None = None
    """``none``, ``selective`` (every stage recomputes only its blocks' selective segments,
    such as the attention core), ``full``, ``stage-aware``, or None (auto: stage-aware,
    which recomputes per stage only what does not fit, selectively where that is
    cheaper)."""
    zero: int | None = None
    """1: optimizer state sharded over data-parallel ranks (ZeRO-1); 2: gradients too
    (ZeRO-2); 0: replicated; None lets the search decide."""
    sp: bool | None = None
    """Sequence parallelism: True runs the token-wise parts between tensor-parallel
    regions on a 1/tp slice of the sequence (needs tp > 1 and a sequence length divisible
    by tp), False never; None lets the search decide."""
    tp_overlap: int | None = None
    """Sub-pipelined tensor parallelism: each microbatch runs as this many parts along the
    batch inside tensor-parallel stages, one part's collectives overlapping the next
    part's compute (needs tp > 1 and a microbatch size divisible by it); 1 disables it;
    None lets the search choose among 1, 2 and 4."""

    def pinned(self) -> dict[str, Any]:
        """The fields that are set, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    def implied(self) -> Pins:
        """The pins as the search reads them: a ``vpp`` > 1 implies interleaved-1f1b, and
        a ``zero`` given as a bool is 0 or 1."""
        schedule = self.schedule
        if self.vpp is not None and self.vpp > 1 and schedule is None:
            schedule = "interleaved-1f1b"
        zero = None if self.zero is None else int(self.zero)
        if (schedule, zero) == (self.schedule, self.zero):
            return self
        return Pins(**{**self.pinned(), "schedule": schedule, "zero": zero})


class Spelling(enum.Enum):
    """How an error names a pin: as the Python API's keyword or the command line's flag."""

    API = "api"
    CLI = "cli"

    def name(self, pin: str) -> str:
        """``tp`` / ``--tp``; ``global_batch`` is ``global_batch_size`` / ``--global-batch``."""
        if self is Spelling.API:
            return {"global_batch": "global_batch_size"}.get(pin, pin)
        return "--" + {"micro_batch_size": "micro-batch",
                       "num_microbatches": "microbatches"}.get(pin, pin.replace("_", "-"))

    def of(self, pin: str, value: Any) -> str:
        """``tp=3`` / ``--tp 3``."""
        if self is Spelling.API:
            return f"{self.name(pin)}={value!r}" if isinstance(value, str) else \
                f"{self.name(pin)}={value}"
        return f"{self.name(pin)} {value}"


def divisors(n: int) -> list[int]:
    """Every divisor of ``n``, ascending.

    >>> divisors(12)
    [1, 2, 3, 4, 6, 12]
    """
    return [d for d in range(1, n + 1) if n % d == 0]


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _nearby(batch: int, unit: int) -> tuple[int, int]:
    lower = max(unit, batch // unit * unit)
    return lower, lower + unit


def check_pins(pins: Pins, devices: int, global_batch: int, *,
               graph: ProxyGraph | None = None, heads: int | None = None,
               hidden: int | None = None, spelling: Spelling = Spelling.API) -> None:
    """Raise one ConfigError, with the numbers and a fix, for pins no plan can meet.

    Checked: each pin's value; pins against each other (vpp and the schedule, scp and no
    recomputation); the degrees against the ``devices``; the global batch against dp,
    the micro batch size and the number of microbatches; and the model: a pinned tp
    against the degrees its tensor-parallel regions are proven at (``graph``), or, before
    the model is captured, against its ``heads`` and ``hidden`` size; pp x vpp against
    its blocks (``graph``). Errors name pins as ``spelling`` does.
    """
    s = spelling
    for name in _COUNTS:
        value = getattr(pins, name)
        if value is not None and not _positive(value):
            raise ConfigError(f"{s.name(name)} must be a positive integer, got {value!r}")
    if not _positive(global_batch):
        raise ConfigError(f"{s.name('global_batch')} must be a positive integer, got "
                          f"{global_batch!r}")
    if pins.schedule is not None and pins.schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {pins.schedule!r} ({s.name('schedule')}); "
                          f"choose one of {', '.join(SCHEDULES)}")
    if pins.recompute is not None and pins.recompute not in RECOMPUTE:
        raise ConfigError(f"unknown recompute {pins.recompute!r} ({s.name('recompute')}); "
                          f"choose one of {', '.join(RECOMPUTE)}")
    if pins.zero is not None and pins.zero not in ZERO_STAGES:
        raise ConfigError(f"{s.name('zero')} must be one of "
                          f"{', '.join(map(str, ZERO_STAGES))} (the ZeRO stage), got "
                          f"{pins.zero!r}")
    _check_sp(pins, graph, devices, s)
    _check_tp_overlap(pins, devices, s)
    if pins.vpp is not None and pins.vpp > 1 and pins.schedule not in (None,
                                                                       "interleaved-1f1b"):
        raise ConfigError(f"{s.of('vpp', pins.vpp)} needs schedule interleaved-1f1b, but "
                          f"the schedule is pinned to {pins.schedule!r}")
    if pins.schedule == "scp" and pins.recompute == "none":
        raise ConfigError(f"schedule scp is 1f1b with stage-aware recomputation; with "
                          f"{s.of('recompute', 'none')} use {s.of('schedule', '1f1b')}, or "
                          f"allow recomputation")
    if pins.schedule == "scp" and pins.recompute == "selective":
        raise ConfigError(f"schedule scp recomputes whole stages; with "
                          f"{s.of('recompute', 'selective')} use another schedule, e.g. "
                          f"{s.of('schedule', '1f1b')}")
    if (pins.recompute == "selective" and graph is not None
            and not any(b.selective_nodes for b in graph.blocks)):
        raise ConfigError(f"{s.of('recompute', 'selective')}: no block of this model has a "
                          "part cheap to recompute and costly to keep (a fused attention "
                          "kernel already keeps no score matrix); use "
                          f"{s.of('recompute', 'stage-aware')} or {s.of('recompute', 'full')}")
    if pins.schedule == "chimera":
        _check_chimera(pins, devices, s)
    _check_tp(pins, graph, heads, hidden, devices, s)
    _check_degrees(pins, devices, s)
    if graph is not None and pins.pp is not None:
        n, stages = len(graph.blocks), pins.pp * (pins.vpp or 1)
        if stages > n:
            raise ConfigError(f"pp*vpp = {stages} stages ({s.of('pp', pins.pp)}"
                              + (f", {s.of('vpp', pins.vpp)}" if pins.vpp else "")
                              + f") for {n} blocks; each stage needs at least one block: "
                              f"use pp*vpp <= {n}")
    _check_batch(pins, devices, global_batch, s)


def _check_chimera(pins: Pins, devices: int, s: Spelling) -> None:
    """Chimera runs two pipelines in opposite directions: rank r holds stage r of one and
    stage pp-1-r of the other, and each takes half the microbatches."""
    chimera = s.of("schedule", "chimera")
    if pins.pp is not None and pins.pp % 2:
        even = [p for p in divisors(devices) if p % 2 == 0]
        fix = (f"pin an even {s.name('pp')} ({', '.join(map(str, even))} divide the {devices} "
               f"devices)" if even else "it needs an even number of devices; use another "
               "schedule")
        raise ConfigError(f"{chimera} needs an even pp, but {s.of('pp', pins.pp)}: rank r holds "
                          f"stage r of the down pipeline and stage pp-1-r of the up pipeline; "
                          f"{fix}")
    if devices % 2:
        raise ConfigError(f"{chimera} needs an even pp, so an even number of devices, but "
                          f"there are {devices}; use another schedule")
    m = pins.num_microbatches
    if m is not None and m % 2:
        raise ConfigError(f"{chimera} needs an even number of microbatches, but "
                          f"{s.of('num_microbatches', m)}: each of its two pipelines takes "
                          f"half; use {s.of('num_microbatches', max(2, m - 1))} or "
                          f"{s.of('num_microbatches', m + 1)}")


def _check_sp(pins: Pins, graph: ProxyGraph | None, devices: int, s: Spelling) -> None:
    """sp=True needs a tensor-parallel degree > 1 that divides the sequence."""
    if pins.sp is None:
        return
    if not isinstance(pins.sp, bool):
        raise ConfigError(f"{s.name('sp')} must be True or False, got {pins.sp!r}"
                          if s is Spelling.API else f"--sp takes no value, got {pins.sp!r}")
    if not pins.sp:
        return
    on = "sp=True" if s is Spelling.API else "--sp"
    off = "sp=False" if s is Spelling.API else "--no-sp"
    if pins.tp == 1 or devices == 1:
        raise ConfigError(f"{on} (sequence parallelism) splits the sequence over the "
                          f"tensor-parallel ranks, but {s.of('tp', 1)}"
                          + (" (one device)" if devices == 1 else "")
                          + f"; pin {s.name('tp')} > 1 or use {off}")
    if graph is None:
        return
    seq = graph.seq_len
    degrees = [pins.tp] if pins.tp else sorted({d for r in graph.tp_regions for d in r.degrees
                                               if devices % d == 0})
    fit = [d for d in degrees if d > 1 and seq % d == 0]
    if not fit:
        shown = ", ".join(map(str, degrees)) or "none"
        raise ConfigError(f"{on} (sequence parallelism) splits the sequence of {seq} tokens "
                          f"over the tensor-parallel ranks, but no tensor-parallel degree "
                          f"({'pinned' if pins.tp else 'proven'}: {shown}) divides it; use a "
                          f"sequence length divisible by the degree, or {off}")
    if not any(b.sequence_saved_bytes for b in graph.blocks):
        raise ConfigError(f"{on}: the model has no token-wise part between its "
                          "tensor-parallel regions (no norm, dropout or residual add runs "
                          f"token-wise on their outputs); use {off}")


def _check_tp_overlap(pins: Pins, devices: int, s: Spelling) -> None:
    """tp_overlap=k > 1 needs tensor parallelism, and k dividing the microbatch size (or,
    at micro-batch size 1, the sequence, split without sp: the space checks the length)."""
    k = pins.tp_overlap
    if k is None:
        return
    if not _positive(k):
        raise ConfigError(f"{s.name('tp_overlap')} must be a positive integer, got {k!r}")
    if k == 1:
        return
    on = s.of("tp_overlap", k)
    if pins.tp == 1 or devices == 1:
        raise ConfigError(f"{on} overlaps tensor-parallel collectives with compute, but "
                          f"{s.of('tp', 1)}" + (" (one device)" if devices == 1 else "")
                          + f"; pin {s.name('tp')} > 1 or use {s.of('tp_overlap', 1)}")
    b = pins.micro_batch_size
    if b == 1 and pins.sp:
        sp_on, sp_off = ("sp=True", "sp=False") if s is Spelling.API else ("--sp", "--no-sp")
        raise ConfigError(f"{on} with {s.of('micro_batch_size', 1)} splits the sequence, "
                          f"which {sp_on} already shards over the tensor-parallel ranks; "
                          f"use {sp_off}, or pin a micro-batch size divisible by {k} to "
                          "split along the batch")
    if b is not None and b > 1 and b % k:
        raise ConfigError(f"{on} splits each microbatch into {k} parts along the batch, but "
                          f"{s.of('micro_batch_size', b)} is not divisible by {k}; use a "
                          f"{s.name('tp_overlap')} that divides it")


def _check_degrees(pins: Pins, devices: int, s: Spelling) -> None:
    pinned = {k: getattr(pins, k) for k in _DEGREES if getattr(pins, k) is not None}
    for name, value in pinned.items():
        if devices % value:
            raise ConfigError(f"{s.of(name, value)} does not divide the {devices} devices "
                              f"(dp*tp*pp must equal {devices}); pin {s.name(name)} to one "
                              f"of {', '.join(map(str, divisors(devices)))}")
    product = math.prod(pinned.values())
    if len(pinned) == 3 and product != devices:
        hint = (f" (e.g. {s.of('dp', devices // (pins.tp * pins.pp))})"
                if devices % (pins.tp * pins.pp) == 0 else "")
        raise ConfigError(f"dp*tp*pp = {pins.dp}*{pins.tp}*{pins.pp} = {product}, but there "
                          f"are {devices} devices; choose degrees whose product is "
                          f"{devices}{hint}")
    if pinned and devices % product:
        shown = ", ".join(s.of(k, v) for k, v in pinned.items())
        raise ConfigError(f"the pinned degrees {shown} multiply to {product}, which does not "
                          f"divide the {devices} devices (dp*tp*pp must equal {devices}); "
                          f"pin degrees whose product divides {devices}: "
                          f"{', '.join(map(str, divisors(devices)))}")


def _check_tp(pins: Pins, graph: ProxyGraph | None, heads: int | None, hidden: int | None,
              devices: int, s: Spelling) -> None:
    tp = pins.tp
    if tp is None or tp == 1:
        return
    if graph is not None:
        config = graph.model_config or {}
        heads = config.get("heads") or max((r.heads for r in graph.tp_regions), default=0)
        hidden = hidden or config.get("hidden")
    why = next((f"{s.of('tp', tp)} does not divide the model's {what} ({size})"
                for what, size in (("attention heads", heads), ("hidden size", hidden))
                if size and size % tp), None)
    if graph is None:
        if why:
            size = next(n for n in (heads, hidden) if n and n % tp)
            fit = [d for d in divisors(size) if d > 1 and devices % d == 0]
            raise ConfigError(f"{why}; a tensor-parallel degree must split every layer "
                              f"evenly: pin {s.name('tp')} to a divisor of {size}"
                              + (f" ({', '.join(map(str, fit))})" if fit else "")
                              + f" or {s.of('tp', 1)}")
        return
    proven = sorted({d for r in graph.tp_regions for d in r.degrees})
    if tp in proven and not why:  # a tp that leaves attention whole is refused, as before
        return                    # capture (the API and every command agree)
    proven = [d for d in proven if not any(n and n % d for n in (heads, hidden))]
    why = why or f"{s.of('tp', tp)} splits no layer of the model evenly"
    raise ConfigError(f"{why}: no tensor-parallel region of the model is proven to shard "
                      f"{tp} ways (proven degrees: {', '.join(map(str, proven)) or 'none'}); "
                      "use " + "".join(f"{s.of('tp', d)} or " for d in proven)
                      + s.of("tp", 1))


def _check_batch(pins: Pins, devices: int, batch: int, s: Spelling) -> None:
    gb = s.of("global_batch", batch)
    if pins.dp is not None and batch % pins.dp:
        lower, upper = _nearby(batch, pins.dp)
        raise ConfigError(f"{gb} is not divisible by {s.of('dp', pins.dp)}; use "
                          f"{s.of('global_batch', lower)} or {upper}, or another "
                          f"{s.name('dp')}")
    rest = devices // math.prod(getattr(pins, k) or 1 for k in _DEGREES)
    dps = [pins.dp] if pins.dp is not None else divisors(max(rest, 1))
    for name in ("micro_batch_size", "num_microbatches"):
        value = getattr(pins, name)
        if value is None or any(batch % (d * value) == 0 for d in dps):
            continue
        if pins.dp is not None:
            unit = pins.dp * value
            lower, upper = _nearby(batch, unit)
            raise ConfigError(f"{gb} is not divisible by {s.name('dp')} x {s.name(name)} = "
                              f"{pins.dp} x {value} = {unit}; use "
                              f"{s.of('global_batch', lower)} or {upper}")
        raise ConfigError(f"{gb} is not divisible by {s.of(name, value)} times any "
                          f"data-parallel degree ({', '.join(map(str, dps))}); use a "
                          f"{s.name('global_batch')} that is a multiple of {value}")
    if pins.micro_batch_size is not None and pins.num_microbatches is not None:
        per_replica = pins.micro_batch_size * pins.num_microbatches
        if batch % per_replica or not any(d * per_replica == batch for d in dps):
            raise ConfigError(
                f"{gb} is not {s.name('micro_batch_size')} x {s.name('num_microbatches')} = "
                f"{pins.micro_batch_size} x {pins.num_microbatches} = {per_replica} samples "
                f"times a data-parallel degree ({', '.join(map(str, dps))}); pin one of "
                f"them, not both, or change the {s.name('global_batch')}")


def no_config_message(graph: ProxyGraph, cluster: Cluster, batch: int, pins: Pins) -> str:
    pinned = ", ".join(f"{k}={v}" for k, v in pins.pinned().items())
    return (f"no configuration matches {cluster.devices} devices, global batch {batch} and "
            f"{len(graph.blocks)} blocks" + (f" with the pins {pinned}" if pinned else "")
            + ": dp*tp*pp must equal the device count, dp must divide the global batch, "
              "tp must be a degree the model's tensor-parallel regions support, "
              + ("tp_overlap must divide the micro-batch size (at micro-batch 1, the "
                 f"sequence of {graph.seq_len} tokens, and sp must be off), "
                 if pins.tp_overlap not in (None, 1) else "")
            + "and pp*vpp must not exceed the blocks; relax a pin or change the batch")
