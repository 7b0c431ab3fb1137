"""The outer search: dp, tp, pp, virtual stages, microbatches, schedule, ZeRO, recompute.

``search(graph, cluster, global_batch)`` enumerates every configuration with
``dp * tp * pp`` equal to the cluster's devices (pins fixed, the rest free),
orders them by a lower bound on their step time and costs them in that order
until the bound of the next one cannot beat the best found. Costing one
configuration means: block costs from the cost model (cached per tensor-parallel
degree and microbatch size; identical blocks costed once), the exact stage
partition with per-stage recomputation (:func:`~tripar.partitioner.partition.
solve_partition_dp`) under the in-flight microbatch counts of its schedule,
then the schedule played by the simulator. The result is a validated
:class:`~tripar.plan.plan.Plan` with the runners-up and why each lost.

Lower bound (never above the simulated step time): for gpipe, 1f1b and scp,
stage ``j`` cannot start before the first microbatch's forward has crossed the
stages before it, runs ``m`` forward+backward of its own, and the last
backward must then cross those stages again, so ``T >= sum_{s<j} t_s + m t_j``
for every j; over all splits of the total work ``W`` this is at least
``W / (1 - (1 - 1/m)^p)``. Interleaved and zero-bubble schedules get the
busiest-rank bound ``m W / p``. A configuration whose weights, gradients and
optimizer state alone exceed ``p`` devices is not costed.

Only the bound pruning is exact: candidates left after screening (see ``search``)
were not costed, and the plan's search status then says ``screened``, not
``optimal``. Deterministic: candidates are ordered by (bound, configuration), ties never
depend on dict or set order, and no clock enters a decision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from tripar.errors import ConfigError, InfeasibleError
from tripar.graph.proxy import ProxyGraph
from tripar.partitioner.collectives import (
    all_gather_time,
    all_reduce_time,
    p2p_time,
    reduce_scatter_time,
)
from tripar.partitioner.cost_model import (
    ADAM_STEP_BYTES,
    BUCKET_BYTES,
    block_costs,
    bytes_per_param,
    stage_costs,
    uniform_boundaries,
)
from tripar.partitioner.cost_model import shardable_regions as _shardable
from tripar.partitioner.hardware import Cluster, canonical_dtype, dtype_bytes
from tripar.partitioner.partition import PartitionProblem, solve_partition_dp
from tripar.partitioner.schedules import build_schedule
from tripar.partitioner.simulator import encode_schedule, simulate
from tripar.partitioner.stage_cost import StageCost
from tripar.partitioner.tp_choice import TPCandidate, choose_tp_regions
from tripar.plan.config import SCHEDULES, ParallelConfig
from tripar.plan.plan import (
    Alternative,
    Binding,
    ClusterInfo,
    Estimate,
    Inputs,
    ModelInfo,
    Plan,
    SolverRun,
    StagePlan,
    TPShard,
    model_fingerprint,
)
from tripar.plan.render import fmt_time

VIRTUAL_STAGES = (2, 3, 4, 6, 8)
"""vpp values tried for interleaved-1f1b."""


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


@dataclass(frozen=True, slots=True)
class Evaluated:
    """One costed configuration."""

    config: ParallelConfig
    step_time_s: float
    bubble_fraction: float
    peak_memory_bytes: int
    rank_memory_bytes: tuple[int, ...]
    busy_s: float
    """Busiest rank's compute."""
    idle_s: float
    """Pipeline time minus the busiest rank's compute."""
    tail_s: float
    """Step time after the pipeline (exposed data-parallel reduction, optimizer)."""
    boundaries: tuple[int, ...]
    recompute: tuple[tuple[int, ...], ...]
    costs: tuple[StageCost, ...]
    stage_time_s: tuple[float, ...]
    stage_memory_bytes: tuple[int, ...]
    in_flight: tuple[int, ...]
    schedule_lines: tuple[str, ...]
    partition_time_s: float
    partition_objective: float
    tp_regions: tuple[str, ...] = ()
    """Names (``block:kind``) of the regions sharded at ``config.tp``."""
    tp_note: str = ""
    """How the sharded regions were chosen."""

    def estimate(self, tokens: int) -> Estimate:
        return Estimate(self.step_time_s, tokens / self.step_time_s, self.peak_memory_bytes,
                        max(0.0, self.bubble_fraction), self.rank_memory_bytes, self.busy_s,
                        max(0.0, self.tail_s))


@dataclass(frozen=True, slots=True)
class SearchStats:
    candidates: int
    evaluated: int
    pruned_by_bound: int
    pruned_by_memory: int
    pruned_by_screen: int
    seconds: float
    work: int = 0
    """Clock-free cost of the search: partition work units (DP cells, stage evaluations),
    simulated actions and screened candidates."""
    partition_work: int = 0
    """The part of ``work`` spent in the stage partition solver."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _key(cfg: ParallelConfig) -> tuple:
    return (cfg.tp, cfg.pp, cfg.vpp, cfg.micro_batch_size, SCHEDULES.index(cfg.schedule),
            cfg.zero, cfg.recompute)


class _Search:
    """State of one search: caches of block costs, schedules and in-flight counts."""

    def __init__(self, graph: ProxyGraph, cluster: Cluster, global_batch: int, pins: Pins,
                 dtype: str | None, max_micro_batch: int) -> None:
        self.graph, self.cluster, self.batch, self.pins = graph, cluster, global_batch, pins
        self.dtype = canonical_dtype(dtype or cluster.device.default_dtype)
        self.max_micro_batch = max_micro_batch
        self.limit = cluster.device.memory_bytes
        self._blocks: dict[tuple, list] = {}
        self._groups: dict[int, list[tuple[str, tuple[str, ...]]]] = {}
        self._free: dict[tuple[int, int], frozenset[str]] = {}
        self._effects: dict[tuple[int, int], list[tuple[float, float, float, float]]] = {}
        self._choices: dict[tuple, tuple[frozenset[str], str]] = {}
        self._encoded: dict[tuple, object] = {}
        self.work = 0
        self.partition_work = 0
        self._schedules: dict[tuple, object] = {}
        self._inflight: dict[tuple, tuple[int, ...]] = {}
        self.partition_runs: list[tuple[float, float]] = []
        self._partitions: dict[PartitionProblem, object] = {}
        self._prefix: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    # ---- enumeration -----------------------------------------------------------------

    def tp_degrees(self, devices: int) -> list[int]:
        proven = {d for r in self.graph.tp_regions for d in r.degrees}
        if self.pins.tp is not None:
            return [self.pins.tp]
        return [t for t in _divisors(devices) if t == 1 or t in proven]

    def configs(self) -> list[ParallelConfig]:
        pins, devices = self.pins, self.cluster.devices
        n = len(self.graph.blocks)
        out = []
        for tp in self.tp_degrees(devices):
            if devices % tp:
                continue
            for pp in ([pins.pp] if pins.pp else _divisors(devices // tp)):
                if devices % (tp * pp) or pp > n:
                    continue
                dp = devices // (tp * pp)
                if (pins.dp and dp != pins.dp) or self.batch % dp:
                    continue
                per_replica = self.batch // dp
                sizes = ([pins.micro_batch_size] if pins.micro_batch_size else
                         [b for b in _divisors(per_replica) if b <= self.max_micro_batch])
                for b in sizes:
                    if per_replica % b:
                        continue
                    m = per_replica // b
                    for schedule, vpp in self._schedules_for(pp, m, n):
                        for zero in ([pins.zero] if pins.zero is not None else
                                     ([0, 1] if dp > 1 else [0])):
                            out.append(ParallelConfig(
                                dp=dp, tp=tp, pp=pp, micro_batch_size=b, num_microbatches=m,
                                vpp=vpp, schedule=schedule,
                                recompute=pins.recompute or "stage-aware", zero=zero))
        return sorted(out, key=_key)

    def _schedules_for(self, pp: int, m: int, blocks: int) -> list[tuple[str, int]]:
        pins = self.pins
        names = [pins.schedule] if pins.schedule else list(SCHEDULES)
        if pins.recompute == "none" and not pins.schedule:
            names.remove("scp")   # scp is 1f1b with recomputation
        if pp == 1 and not pins.schedule:
            names = ["1f1b"]  # one stage: every schedule is the same plain loop
        out = []
        for name in names:
            if name == "interleaved-1f1b":
                if pp == 1 or m % pp:
                    continue
                for v in ([pins.vpp] if pins.vpp else VIRTUAL_STAGES):
                    if v >= 2 and pp * v <= blocks:
                        out.append((name, v))
            elif pins.vpp in (None, 1):
                out.append((name, 1))
        return out

    # ---- bounds ----------------------------------------------------------------------

    def block_costs(self, tp: int, b: int, shard: frozenset[str] | None = None) -> list:
        """Block costs at degree ``tp`` and microbatch ``b`` with the regions ``shard``
        sharded (None: the time-optimal choice, ``free_choice``)."""
        if shard is None:
            shard = self.free_choice(tp, b)
        key = (tp, b, shard)
        if key not in self._blocks:
            cfg = ParallelConfig(dp=1, tp=tp, pp=1, micro_batch_size=b, num_microbatches=1)
            self._blocks[key] = block_costs(self.graph, self.cluster, cfg, dtype=self.dtype,
                                            tp_regions=shard)
        return self._blocks[key]

    # ---- tensor-parallel regions -----------------------------------------------------

    def groups(self, tp: int) -> list[tuple[str, tuple[str, ...]]]:
        """Regions proven at ``tp`` grouped by (block signature, kind): identical layers
        share one decision. Each group: (name, region names)."""
        if tp not in self._groups:
            signature = {b.name: b.signature for b in self.graph.blocks}
            proven = set(_shardable(self.graph, tp))
            grouped: dict[tuple[str, str], list[str]] = {}
            weights: dict[tuple[str, str], set[str]] = {}
            for r in self.graph.tp_regions:
                name = f"{r.block}:{r.kind}"
                if name in proven:
                    key = (signature.get(r.block, r.block), r.kind)
                    grouped.setdefault(key, []).append(name)
                    weights.setdefault(key, set()).update(
                        [fqn for fqn, _ in r.shards] + list(r.tied))
            self._groups[tp] = [(names[0] + (f" (+{len(names) - 1} alike)" if len(names) > 1
                                              else ""), tuple(names))
                                for names in _merge_sharing(grouped, weights)]
        return self._groups[tp]

    def all_regions(self, tp: int) -> frozenset[str]:
        key = ("all", tp)
        if key not in self._free:
            self._free[key] = frozenset(n for _, names in self.groups(tp) for n in names)
        return self._free[key]

    def uniform(self, stages: int) -> tuple[int, ...] | None:
        """``uniform_boundaries`` for ``stages`` (None when there are too few layers)."""
        key = ("uniform", stages)
        if key not in self._blocks:
            try:
                self._blocks[key] = uniform_boundaries(self.graph, stages)
            except ConfigError:
                self._blocks[key] = None
        return self._blocks[key]

    def chain_share(self, tp: int, b: int) -> float:
        """Least share of a block's work on the F ... B chain under zb-h1 (W off it), over
        the region choices a configuration may end with."""
        key = ("phi", tp, b)
        if key not in self._blocks:
            extremes = [self.block_costs(tp, b), self.block_costs(tp, b, frozenset()),
                        self.block_costs(tp, b, self.all_regions(tp))]
            self._blocks[key] = min(
                ((c.forward_s + c.backward_input_s)
                 / (c.forward_s + c.backward_input_s + c.backward_weight_s)
                 for cs in extremes for c in cs if c.forward_s + c.backward_input_s > 0),
                default=0.0)
        return self._blocks[key]

    def effects(self, tp: int, b: int) -> list[tuple[float, float, float, float]]:
        """Per group, for one microbatch on the whole model: (compute saved, collective
        time added, parameters saved, activation bytes saved) by sharding it alone."""
        key = (tp, b)
        if key not in self._effects:
            none = self.block_costs(tp, b, frozenset())
            out = []
            for _name, names in self.groups(tp):
                alone = self.block_costs(tp, b, frozenset(names))
                work = sum(c.forward_s + c.backward_input_s + c.backward_weight_s - c.tp_comm_s
                           for c in alone)
                base = sum(c.forward_s + c.backward_input_s + c.backward_weight_s for c in none)
                out.append((max(0.0, base - work), sum(c.tp_comm_s for c in alone),
                            max(0, sum(c.params for c in none) - sum(c.params for c in alone)),
                            max(0, sum(c.saved_bytes for c in none)
                                - sum(c.saved_bytes for c in alone))))
            self._effects[key] = out
        return self._effects[key]

    def free_choice(self, tp: int, b: int) -> frozenset[str]:
        """The regions whose sharding saves more compute than its collectives cost (the
        tensor-parallel ILP's answer when memory does not bind)."""
        key = (tp, b)
        if key not in self._free:
            if tp == 1:
                self._free[key] = frozenset()
            else:
                chosen = [names for (_n, names), (save, comm, _p, _a)
                          in zip(self.groups(tp), self.effects(tp, b)) if comm < save]
                self._free[key] = frozenset(n for names in chosen for n in names)
        return self._free[key]

    def tp_choice(self, cfg: ParallelConfig) -> tuple[frozenset[str], str]:
        """The regions to shard for ``cfg``: :func:`choose_tp_regions` on one decision per
        group, trading collective time against the memory of pipeline rank 0 (the rank
        holding the most microbatches) under a balanced split, without recomputation.
        When even sharding every region does not fit without recomputation, every region
        is sharded (recomputation then closes the gap)."""
        tp = cfg.tp
        if tp == 1:
            return frozenset(), ""
        inflight = self.in_flight(cfg)
        key = (tp, cfg.micro_batch_size, cfg.pp, cfg.vpp, cfg.dp, cfg.zero,
               inflight[0] if cfg.vpp == 1 else tuple(inflight[::cfg.pp]))
        if key not in self._choices:
            p, v, m = cfg.pp, cfg.vpp, cfg.num_microbatches
            held = sum(inflight[s] for s in range(0, p * v, p)) / (p * v)
            model, optimizer = bytes_per_param(self.dtype, cfg.zero, cfg.dp)
            per_param = model + optimizer
            steps = (p + m * v - 1) / (p * v)
            none = self.block_costs(tp, cfg.micro_batch_size, frozenset())
            memory = int(sum(c.params for c in none) * per_param / p
                         + sum(c.saved_bytes for c in none) * held)
            candidates = []
            device = self.cluster.device
            optimizer_rate = device.memory_bandwidth * device.efficiency.memory
            for (name, names), (save, comm, params, act) in zip(
                    self.groups(tp), self.effects(tp, cfg.micro_batch_size)):
                region = next(r for r in self.graph.tp_regions if f"{r.block}:{r.kind}"
                              == names[0])
                step_save = (save * steps + params / p * ADAM_STEP_BYTES / optimizer_rate)
                candidates.append(TPCandidate(region, step_save, comm * steps,
                                              int(params * per_param / p + act * held),
                                              group=name))
            try:
                choice = choose_tp_regions(candidates, degree=tp, memory_bytes=memory,
                                           memory_limit_bytes=self.limit)
                picked = {c.group for c in candidates
                          if any(c.region is r for r in choice.sharded)}
                note = (f"tensor-parallel ILP ({choice.solver}, {choice.status}): "
                        f"{len(picked)} of {len(candidates)} region groups sharded")
            except InfeasibleError:
                picked = {c.group for c in candidates}
                note = ("every region sharded: even then rank 0 needs recomputation to fit "
                        "(tensor-parallel ILP infeasible without it)")
            chosen = frozenset(n for name, names in self.groups(tp) if name in picked
                               for n in names)
            self._choices[key] = (chosen, note)
        return self._choices[key]

    def lower_bound(self, cfg: ParallelConfig) -> float:
        costs = self.block_costs(cfg.tp, cfg.micro_batch_size)   # the least work
        totals = [c.forward_s + c.backward_input_s + c.backward_weight_s for c in costs]
        work = sum(totals)
        m, p, v = cfg.num_microbatches, cfg.pp, cfg.vpp
        # share of each block's work that is forward: the chain before a stage's first F
        phi = 0.0   # share of a stage's work on the F ... B chain through it
        if cfg.schedule in ("gpipe", "1f1b", "scp"):
            phi = 1.0
        elif cfg.schedule == "zb-h1":  # W is off the chain
            phi = self.chain_share(cfg.tp, cfg.micro_batch_size)
        bound = m * work / p
        if p > 1 and 0 < phi / m < 1 and v == 1:
            bound = max(bound, phi * work / (1.0 - (1.0 - phi / m) ** p))
        return bound + self.tail_bound(cfg)

    def tail_bound(self, cfg: ParallelConfig) -> float:
        """Least time rank 0 spends after its last backward: reducing its last gradient
        bucket and the optimizer step, for no more than the first block's parameters."""
        params = self.block_costs(cfg.tp, cfg.micro_batch_size,
                                  self.all_regions(cfg.tp))[0].params   # the fewest
        device = self.cluster.device
        optimizer = params / (cfg.dp if cfg.zero else 1) * ADAM_STEP_BYTES / (
            device.memory_bandwidth * device.efficiency.memory)
        if cfg.dp == 1 or not params:
            return optimizer
        grad = min(params * dtype_bytes(self.dtype), BUCKET_BYTES)
        reduce = reduce_scatter_time if cfg.zero else all_reduce_time
        return optimizer + reduce(self.cluster, grad, cfg.dp, cfg.tp)

    def prefix(self, tp: int, b: int) -> dict[str, np.ndarray]:
        """Prefix sums over blocks of forward, total work, saved, input bytes and params."""
        key = (tp, b)
        if key not in self._prefix:
            costs = self.block_costs(tp, b)

            def cum(values) -> np.ndarray:
                return np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])

            self._prefix[key] = {
                "fwd": cum([c.forward_s for c in costs]),
                "work": cum([c.forward_s + c.backward_input_s + c.backward_weight_s
                             for c in costs]),
                "weight": cum([c.backward_weight_s for c in costs]),
                "act": cum([c.saved_bytes for c in costs]),
                "inp": cum([c.input_bytes for c in costs]),
                "params": cum([c.params for c in costs]),
            }
        return self._prefix[key]

    def screen(self, cfg: ParallelConfig) -> float:
        """A quick step-time estimate (uniform split by layers, the recompute share each
        stage needs to fit, the partition objective, the gradient reduction and optimizer
        step of an average stage); it only orders the candidates."""
        pre = self.prefix(cfg.tp, cfg.micro_batch_size)
        k = cfg.pp * cfg.vpp
        firsts = self.uniform(k)
        if firsts is None:
            return math.inf
        cuts = np.array((*firsts, len(self.graph.blocks)))
        lo, hi = cuts[:-1], cuts[1:]

        def span(name: str) -> np.ndarray:
            return pre[name][hi] - pre[name][lo]

        model, optimizer = bytes_per_param(self.dtype, cfg.zero, cfg.dp)
        fwd, work, act = span("fwd"), span("work"), span("act")
        save = act - span("inp")
        inflight = np.asarray(self.in_flight(cfg), dtype=np.float64)
        need = span("params") * (model + optimizer) + inflight * act - self.limit / cfg.vpp
        share = np.zeros(k)
        short = need > 0
        if short.any():
            if cfg.recompute == "none" or np.any(need[short] > inflight[short] * save[short]):
                return math.inf
            share[short] = need[short] / (inflight[short] * save[short])
        if cfg.recompute == "full":
            share[:] = 1.0
        times = work + share * fwd
        m, v = cfg.num_microbatches, cfg.vpp
        pipeline = float(times.sum()) / v + (m * v - 1) * float(times.max())
        if cfg.schedule == "zb-h1":
            weight = float(pre["weight"][-1]) / k
            pipeline -= min(weight, float(times.max())) * (cfg.pp - 1)
        params = float(pre["params"][-1]) / cfg.pp
        device = self.cluster.device
        tail = params * ADAM_STEP_BYTES / (device.memory_bandwidth * device.efficiency.memory)
        if cfg.dp > 1:
            reduce = reduce_scatter_time if cfg.zero else all_reduce_time
            tail /= cfg.dp if cfg.zero else 1
            grad = params * dtype_bytes(self.dtype)
            exposed = reduce(self.cluster, grad, cfg.dp, cfg.tp) - m * float(times.min()) / 2
            tail += max(reduce(self.cluster, min(grad, BUCKET_BYTES), cfg.dp, cfg.tp), exposed)
            if cfg.zero:
                tail += all_gather_time(self.cluster, grad, cfg.dp, cfg.tp)
        return pipeline + tail

    def static_bytes(self, cfg: ParallelConfig, shard: frozenset[str] | None = None
                     ) -> list[int]:
        model, optimizer = bytes_per_param(self.dtype, cfg.zero, cfg.dp)
        return [int(c.params * (model + optimizer))
                for c in self.block_costs(cfg.tp, cfg.micro_batch_size, shard)]

    def static_overflow(self, cfg: ParallelConfig) -> int:
        """Bytes by which the busiest device's static memory exceeds the device, at least
        (every proven region sharded, the weights spread evenly over the stages)."""
        model, optimizer = bytes_per_param(self.dtype, cfg.zero, cfg.dp)
        costs = self.block_costs(cfg.tp, cfg.micro_batch_size, self.all_regions(cfg.tp))
        total = sum(c.params for c in costs) * (model + optimizer)
        return math.ceil(total / cfg.pp) - self.limit

    def static_message(self, cfg: ParallelConfig, over: int) -> str:
        """Why ``cfg`` cannot hold its weights: the stage, the bytes short, the fix."""
        model, optimizer = bytes_per_param(self.dtype, cfg.zero, cfg.dp)
        costs = self.block_costs(cfg.tp, cfg.micro_batch_size, self.all_regions(cfg.tp))
        per_block = [c.params * (model + optimizer) for c in costs]
        try:
            firsts = (*uniform_boundaries(self.graph, cfg.pp), len(costs))
        except ConfigError:
            firsts = (0, len(costs))
        spans = [(sum(per_block[a:b]), a, b) for a, b in zip(firsts, firsts[1:])]
        need_s, a, b = max(spans, key=lambda x: x[0])
        stage = spans.index((need_s, a, b))
        need = over + self.limit
        names = self.graph.blocks
        replica = sum(per_block) * cfg.tp
        devices = math.ceil(replica / self.limit)
        return (f"pipeline stage {stage} of {cfg.pp} ({names[a].name}..{names[b - 1].name}) "
                f"needs at least {need} bytes ({need / 1e9:.1f} GB) for weights, gradients and "
                f"optimizer state alone (even split, every proven region sharded at "
                f"tp={cfg.tp}), {over} bytes more than the {self.limit} bytes "
                f"({self.limit / 1e9:.1f} GB) of a device; fix: one model replica needs at "
                f"least {devices} such devices (tp*pp >= {devices}), so use more devices "
                f"(at least {math.ceil(devices / self.cluster.devices_per_node)} nodes of "
                f"{self.cluster.devices_per_node}), or devices with more memory")

    # ---- costing one configuration ---------------------------------------------------

    def schedule(self, cfg: ParallelConfig, recompute: str):
        key = (cfg.schedule, cfg.pp, cfg.num_microbatches, cfg.vpp, recompute)
        if key not in self._schedules:
            sched = build_schedule(cfg.schedule, cfg.pp, cfg.num_microbatches, vpp=cfg.vpp,
                                   recompute=recompute)
            self._schedules[key] = sched
            self._encoded[key] = encode_schedule(sched)
        return self._schedules[key], self._encoded[key]

    def in_flight(self, cfg: ParallelConfig) -> tuple[int, ...]:
        """Peak microbatches each virtual stage holds under the schedule (the generators'
        warm-up depths: 1F1B-like ``min(p - s, m)``, GPipe ``m``, interleaved
        ``2 (p - 1 - r) + (v - 1) p + 1`` chunk-microbatches on rank r, shared by its v
        stages). The simulation afterwards checks the real peaks."""
        p, m, v = cfg.pp, cfg.num_microbatches, cfg.vpp
        if cfg.schedule == "gpipe":
            return (m,) * p
        if cfg.schedule == "interleaved-1f1b":
            total = m * v
            per_rank = [total if m == p else min(2 * (p - 1 - r) + (v - 1) * p + 1, total)
                        for r in range(p)]
            return tuple(-(-per_rank[s % p] // v) for s in range(p * v))
        return tuple(min(p - s, m) for s in range(p))

    def partition_problem(self, cfg: ParallelConfig, margin: Sequence[int],
                          shard: frozenset[str] | None = None) -> PartitionProblem:
        costs = self.block_costs(cfg.tp, cfg.micro_batch_size, shard)
        k = cfg.pp * cfg.vpp
        crosses = cfg.dp * cfg.tp >= self.cluster.devices_per_node
        cut = [p2p_time(self.cluster, c.output_bytes / cfg.tp, crosses) for c in costs[:-1]]
        width = dtype_bytes(self.dtype)
        params = sum(c.params for c in costs)
        buffers = (min(params * width, BUCKET_BYTES) * (cfg.dp > 1)
                   + 4 * max(c.output_bytes for c in costs))
        budget = [max(0, (self.limit - margin[s % cfg.pp]) // cfg.vpp - buffers)
                  for s in range(k)]
        policy = "stage-aware" if cfg.recompute == "stage-aware" else cfg.recompute
        return PartitionProblem(
            blocks=tuple(b.name for b in self.graph.blocks),
            forward_s=[c.forward_s for c in costs],
            backward_s=[c.backward_input_s + c.backward_weight_s for c in costs],
            recompute_s=[c.forward_s for c in costs],
            activation_bytes=[c.saved_bytes for c in costs],
            input_bytes=[c.input_bytes for c in costs],
            static_bytes=self.static_bytes(cfg, shard), in_flight=self.in_flight(cfg),
            memory_limit_bytes=budget, num_microbatches=cfg.num_microbatches,
            virtual_stages=cfg.vpp, cut_s=cut, recompute=policy)

    def evaluate(self, cfg: ParallelConfig) -> Evaluated:
        """Partition, cost and simulate ``cfg``; InfeasibleError when it does not fit.

        The regions sharded are the tensor-parallel ILP's choice (``tp_choice``) and the
        time-optimal one (``free_choice``); when they differ both are costed and the
        faster that fits is kept."""
        if cfg.tp == 1:
            return self._evaluate(cfg, frozenset(), "")
        ilp, note = self.tp_choice(cfg)
        free = self.free_choice(cfg.tp, cfg.micro_batch_size)
        options = [(ilp, note)] + ([(free, "regions whose sharding saves more compute than "
                                           "its collectives cost")] if free != ilp else [])
        results, errors = [], []
        for shard, why in options:
            if not shard:
                errors.append(f"at tp={cfg.tp} no proven region is worth sharding, so the "
                              f"{cfg.tp} tensor-parallel devices would only repeat work")
                continue
            try:
                results.append(self._evaluate(cfg, shard, why))
            except InfeasibleError as error:
                errors.append(str(error))
        if not results:
            raise InfeasibleError(errors[0])
        return min(results, key=lambda e: (e.step_time_s, len(e.tp_regions)))

    def _evaluate(self, cfg: ParallelConfig, shard: frozenset[str], note: str) -> Evaluated:
        margin = [0] * cfg.pp
        regions = None if cfg.tp == 1 else shard
        for _attempt in range(3):
            problem = self.partition_problem(cfg, margin, shard)
            if problem not in self._partitions:  # 1f1b, zb-h1 and scp share problems
                self._partitions[problem] = solve_partition_dp(problem)
                self.partition_runs.append((self._partitions[problem].solve_time_s, 0.0))
                self.work += self._partitions[problem].work
                self.partition_work += self._partitions[problem].work
            sol = self._partitions[problem]
            bounds = sol.boundaries
            rec = tuple(st.recompute for st in sol.stages)
            fractions = []
            for st in sol.stages:
                total = sum(problem.saving_bytes(b) for b in range(st.first, st.stop)
                            if problem.recomputable(b))
                saved = sum(problem.saving_bytes(b) for b in st.recompute)
                fractions.append(saved / total if total else 0.0)
            explicit = cfg.recompute == "full" or cfg.schedule == "scp"
            if explicit:
                sched_policy = "full" if cfg.recompute == "full" else "stage-aware"
                if cfg.schedule == "scp" and cfg.recompute == "none":
                    sched_policy = "none"
                schedule, encoded = self.schedule(cfg, sched_policy)
                costs = stage_costs(self.graph, self.cluster, cfg, bounds, recompute="none",
                                    explicit_recompute=sched_policy != "none", dtype=self.dtype,
                                    tp_regions=regions)
            else:
                schedule, encoded = self.schedule(cfg, "none")
                costs = stage_costs(self.graph, self.cluster, cfg, bounds, recompute=fractions,
                                    dtype=self.dtype, tp_regions=regions)
            result = simulate(schedule, costs, record_timeline=False, encoded=encoded)
            self.work += encoded.n
            over = [used - self.limit for used in result.peak_memory_bytes]
            if max(over) <= 0:
                break
            margin = [m + max(0, o) for m, o in zip(margin, over)]
        else:
            worst = max(range(cfg.pp), key=lambda r: over[r])
            first = sol.stages[worst]
            raise InfeasibleError(
                f"pipeline rank {worst} (from {self.graph.blocks[first.first].name}) needs "
                f"{result.peak_memory_bytes[worst]} bytes "
                f"({result.peak_memory_bytes[worst] / 1e9:.1f} GB) in the simulation, "
                f"{over[worst]} bytes more than the {self.limit / 1e9:.1f} GB device")
        busy = max(result.busy_s)
        if explicit:
            recomputed = {a.stage for acts in schedule.actions for a in acts
                          if a.kind.value == "R"}
            rec = tuple(tuple(range(sol.stages[s].first, sol.stages[s].stop))
                        if s in recomputed else () for s in range(len(sol.stages)))
        label = cfg.recompute
        if cfg.recompute == "stage-aware" and not any(rec):
            label = "none"
        lines = tuple(" ".join(a.short() if schedule.vpp == 1 else str(a) for a in acts)
                      for acts in schedule.actions)
        return Evaluated(
            config=replace(cfg, recompute=label), step_time_s=result.step_time_s,
            bubble_fraction=result.bubble_fraction, peak_memory_bytes=int(result.peak_memory),
            rank_memory_bytes=tuple(int(b) for b in result.peak_memory_bytes), busy_s=busy,
            idle_s=result.pipeline_time_s - busy,
            tail_s=result.step_time_s - result.pipeline_time_s, boundaries=bounds,
            recompute=rec, costs=tuple(costs),
            stage_time_s=tuple(c.forward_s + c.backward_input_s + c.backward_weight_s
                               + c.recompute_s for c in costs),
            stage_memory_bytes=tuple(int(b) for b in result.stage_peak_memory_bytes),
            in_flight=tuple(result.stage_peak_inflight), schedule_lines=lines,
            partition_time_s=sol.solve_time_s, partition_objective=sol.objective_s,
            tp_regions=tuple(sorted(shard)), tp_note=note)


def _loss_reason(alt: Evaluated, best: Evaluated) -> tuple[str, Binding]:
    """Why ``alt`` is slower than ``best``: the component that grew most."""
    grew = {
        Binding.BUBBLE: (alt.idle_s - best.idle_s,
                         f"larger bubble: {alt.bubble_fraction:.1%} vs {best.bubble_fraction:.1%}"),
        Binding.COMPUTE: (alt.busy_s - best.busy_s,
                          f"more compute per device (recomputation, less efficient products): "
                          f"{fmt_time(alt.busy_s)} vs {fmt_time(best.busy_s)}"),
        Binding.COMMUNICATION: (alt.tail_s - best.tail_s,
                                f"more communication after the pipeline (gradient reduction, "
                                f"ZeRO gathers): {fmt_time(alt.tail_s)} vs "
                                f"{fmt_time(best.tail_s)}"),
    }
    binding = max(grew, key=lambda b: (grew[b][0], b.value))
    return grew[binding][1], binding


def search(graph: ProxyGraph, cluster: Cluster, global_batch: int, *, seq_len: int | None = None,
           pins: Pins = Pins(), model_spec: str = "", dtype: str | None = None,
           max_micro_batch: int = 16, alternatives: int = 4, min_evaluations: int = 6,
           max_evaluations: int = 24, screen_slack: float = 0.05) -> Plan:
    """The best plan for ``graph`` on ``cluster`` at ``global_batch`` samples per step
    (see :func:`search_with_stats`, which also returns the search's statistics).

    >>> from tripar.partitioner.cost_model import example_graph
    >>> plan = search(example_graph(layers=4), Cluster.builtin("a100-80g", gpus_per_node=4), 16)
    >>> plan.parallel.devices, plan.parallel.global_batch_size, plan.validate() is plan
    (4, 16, True)
    """
    return search_with_stats(
        graph, cluster, global_batch, seq_len=seq_len, pins=pins, model_spec=model_spec,
        dtype=dtype, max_micro_batch=max_micro_batch, alternatives=alternatives,
        min_evaluations=min_evaluations, max_evaluations=max_evaluations,
        screen_slack=screen_slack)[0]


def search_with_stats(graph: ProxyGraph, cluster: Cluster, global_batch: int, *,
                      seq_len: int | None = None, pins: Pins = Pins(), model_spec: str = "",
                      dtype: str | None = None, max_micro_batch: int = 16,
                      alternatives: int = 4, min_evaluations: int = 6,
                      max_evaluations: int = 24, screen_slack: float = 0.05
                      ) -> tuple[Plan, SearchStats]:
    """The best plan for ``graph`` on ``cluster`` at ``global_batch`` samples per step.

    Candidates that fit by static memory are ordered by a quick screening estimate
    (``_Search.screen``) and costed exactly (partition DP + simulation) in that
    order; a candidate is skipped when its lower bound cannot beat the best, and the
    loop ends after ``max_evaluations`` costed candidates, or once at least
    ``min_evaluations`` are costed and the screening estimate exceeds the best's by
    more than ``screen_slack``. For an exhaustive run pass ``max_evaluations`` and
    ``min_evaluations`` at least the number of candidates (or ``screen_slack=math.inf``):
    the plan's search status is ``optimal`` only when no candidate was left after
    screening (bound pruning is exact), ``screened`` otherwise.

    >>> from tripar.partitioner.cost_model import example_graph
    >>> cluster = Cluster.builtin("a100-80g", gpus_per_node=4)
    >>> plan, stats = search_with_stats(example_graph(layers=4), cluster, 16,
    ...                                 screen_slack=math.inf, max_evaluations=10**6)
    >>> plan.solvers[0].status, stats.pruned_by_screen, stats.work > 0
    ('optimal', 0, True)
    """
    start = time.perf_counter()
    if global_batch < 1:
        raise ConfigError(f"the global batch must be >= 1 samples, got {global_batch}")
    state = _Search(graph, cluster, global_batch, pins, dtype, max_micro_batch)
    _check_pins(graph, cluster, global_batch, pins, state)
    configs = state.configs()
    if not configs:
        raise InfeasibleError(_no_config_message(graph, cluster, global_batch, pins))
    failures: list[tuple[int, ParallelConfig, str]] = []
    bounds, screens = {}, {}
    for cfg in configs:
        over = state.static_overflow(cfg)
        if over > 0:
            failures.append((over, cfg, state.static_message(cfg, over)))
            continue
        bounds[cfg], screens[cfg] = state.lower_bound(cfg), state.screen(cfg)
        state.work += 1
    pruned_memory = len(failures)
    order = sorted(bounds, key=lambda c: (screens[c], bounds[c], _key(c)))
    evaluated: list[Evaluated] = []
    pruned_bound = pruned_screen = 0
    best: Evaluated | None = None
    best_screen = math.inf
    for i, cfg in enumerate(order):
        if best is not None and bounds[cfg] >= best.step_time_s:
            pruned_bound += 1
            continue
        if len(evaluated) >= max_evaluations or (
                len(evaluated) >= min_evaluations
                and screens[cfg] > (1 + screen_slack) * best_screen):
            pruned_screen = sum(1 for c in order[i:] if best is None
                                or bounds[c] < best.step_time_s)
            pruned_bound += len(order) - i - pruned_screen
            break
        try:
            result = state.evaluate(cfg)
        except InfeasibleError as error:
            failures.append((0, cfg, str(error)))
            continue
        evaluated.append(result)
        if best is None or (result.step_time_s, _key(result.config)) < (best.step_time_s,
                                                                       _key(best.config)):
            best, best_screen = result, screens[cfg]
    if best is None:
        over, cfg, why = min(failures, key=lambda f: (f[0], _key(f[1])))
        raise InfeasibleError(
            f"no configuration of {cluster.devices} devices fits the model at global batch "
            f"{global_batch}; the closest, dp={cfg.dp} tp={cfg.tp} pp={cfg.pp} micro-batch "
            f"{cfg.micro_batch_size}, fails: {why}" + ("" if "; fix:" in why else
                                                       ". Try more devices, a larger tensor- "
                                                       "or pipeline-parallel degree, ZeRO-1, "
                                                       "recomputation or a smaller micro "
                                                       "batch"))
    elapsed = time.perf_counter() - start
    stats = SearchStats(len(configs), len(evaluated), pruned_bound, pruned_memory,
                        pruned_screen, elapsed, state.work, state.partition_work)
    plan = _make_plan(state, best, evaluated, failures, stats, seq_len or graph.seq_len,
                      model_spec, alternatives)
    return plan, stats


def _check_pins(graph: ProxyGraph, cluster: Cluster, batch: int, pins: Pins,
                state: _Search) -> None:
    """One clear ConfigError for pins that contradict each other, the cluster, the batch
    or the model."""
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
                              f"{', '.join(map(str, _divisors(devices)))}")
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
        dps = [pins.dp] if pins.dp else [d for d in _divisors(devices)]
        if not any(batch % (d * pins.micro_batch_size) == 0 for d in dps):
            shown = (f"dp x micro-batch = {pins.dp} x {pins.micro_batch_size} = "
                     f"{pins.dp * pins.micro_batch_size}" if pins.dp else
                     f"micro-batch {pins.micro_batch_size} times any data-parallel degree")
            raise ConfigError(f"the global batch {batch} is not divisible by {shown}; use a "
                              f"global batch that is a multiple of it, or another "
                              f"--micro-batch" + ("/--dp" if pins.dp else ""))


def _no_config_message(graph: ProxyGraph, cluster: Cluster, batch: int, pins: Pins) -> str:
    pinned = ", ".join(f"{k}={getattr(pins, k)}" for k in Pins.__slots__
                       if getattr(pins, k) is not None)
    return (f"no configuration matches {cluster.devices} devices, global batch {batch} and "
            f"{len(graph.blocks)} blocks" + (f" with the pins {pinned}" if pinned else "")
            + ": dp*tp*pp must equal the device count, dp must divide the global batch, "
              "tp must be a degree the model's tensor-parallel regions support, and "
              "pp*vpp must not exceed the blocks; relax a pin or change the batch")


def _make_plan(state: _Search, best: Evaluated, evaluated: list[Evaluated],
               failures: list, stats: SearchStats, seq_len: int, spec: str,
               alternatives: int) -> Plan:
    graph, cfg = state.graph, best.config
    names = [b.name for b in graph.blocks]
    n, k = len(names), cfg.pp * cfg.vpp
    bounds = (*best.boundaries, n)
    stages = tuple(
        StagePlan(index=s, rank=s % cfg.pp, virtual_index=s // cfg.pp,
                  blocks=tuple(names[bounds[s]:bounds[s + 1]]),
                  recompute=tuple(names[b] for b in best.recompute[s]),
                  time_s=best.stage_time_s[s], memory_bytes=best.stage_memory_bytes[s],
                  in_flight=max(1, best.in_flight[s]))
        for s in range(k))
    chosen = set(best.tp_regions)
    regions = tuple(TPShard(r.block, r.kind, r.nodes, r.shards) for r in graph.tp_regions
                    if cfg.tp > 1 and f"{r.block}:{r.kind}" in chosen)
    proven = _shardable(graph, cfg.tp)
    tokens = cfg.global_batch_size * seq_len
    runners = sorted((e for e in evaluated if e is not best),
                     key=lambda e: (e.step_time_s, _key(e.config)))
    alts = []
    seen = {best.config}
    for e in runners:
        if e.config in seen:
            continue
        seen.add(e.config)
        reason, binding = _loss_reason(e, best)
        alts.append(Alternative(e.config, e.estimate(tokens), reason, binding))
        if len(alts) >= max(0, alternatives - 1):
            break
    for _over, fcfg, why in sorted(failures, key=lambda f: (f[0], _key(f[1]))):
        if fcfg not in seen and len(alts) < alternatives:
            alts.append(Alternative(fcfg, None, why, Binding.MEMORY))
            break
    part_time = sum(t for t, _ in state.partition_runs)
    notes = [f"searched {stats.candidates} configurations: {stats.evaluated} simulated, "
             f"{stats.pruned_by_bound} ruled out by the step-time bound, "
             f"{stats.pruned_by_memory} by static memory, {stats.pruned_by_screen} left "
             f"after screening"]
    if cfg.tp > 1:
        left = [name for name in proven if name not in chosen]
        notes.append(f"{len(regions)} of the {len(proven)} regions proven at tp={cfg.tp} "
                     f"are sharded ({best.tp_note})" + (
                         f"; replicated: {', '.join(left[:6])}"
                         + (f" and {len(left) - 6} more" if len(left) > 6 else "")
                         if left else ""))
    plan = Plan(
        model=ModelInfo(spec or "model", model_fingerprint(graph.blocks), tuple(names),
                        sum(b.params for b in graph.blocks)),
        cluster=ClusterInfo.from_cluster(state.cluster, state.dtype),
        inputs=Inputs(cfg.global_batch_size, seq_len, state.dtype),
        parallel=cfg, stages=stages, estimate=best.estimate(tokens), tp_regions=regions,
        schedule=best.schedule_lines,
        solvers=(SolverRun("search", "enumeration with bounds",
                           "optimal" if not stats.pruned_by_screen else "screened",
                           best.step_time_s, stats.seconds),
                 SolverRun("partition", "dp", "optimal", best.partition_objective,
                           part_time)),
        solve_time_s=stats.seconds, alternatives=tuple(alts), notes=tuple(notes))
    return plan.validate()


def partition_problem(graph: ProxyGraph, cluster: Cluster, config: ParallelConfig, *,
                      dtype: str | None = None,
                      tp_regions: Sequence[str] | None = None) -> PartitionProblem:
    """The stage-partition problem the search solves for ``config`` (for ``--dump-lp``).

    >>> from tripar.partitioner.cost_model import example_graph
    >>> cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=4)
    >>> partition_problem(example_graph(layers=4), Cluster.builtin("a100-80g"), cfg).in_flight
    (2, 1)
    """
    state = _Search(graph, cluster, config.global_batch_size, Pins(), dtype, 16)
    shard = (frozenset(tp_regions) if tp_regions is not None else
             state.all_regions(config.tp))
    return state.partition_problem(config, [0] * config.pp, shard)


def _merge_sharing(grouped: dict, weights: dict) -> list[list[str]]:
    """Merge region groups that shard one weight (a tied embedding and LM head): they
    must be sharded together or not at all, so they share one decision.

    >>> _merge_sharing({"a": ["emb"], "b": ["head"], "c": ["mlp"]},
    ...                {"a": {"wte.weight"}, "b": {"wte.weight"}, "c": {"fc.weight"}})
    [['emb', 'head'], ['mlp']]
    """
    merged: list[tuple[set[str], list[str]]] = []
    for key, names in grouped.items():
        own = set(weights.get(key, ()))
        names = list(names)
        for other in [m for m in merged if m[0] & own]:
            merged.remove(other)
            own |= other[0]
            names = other[1] + names
        merged.append((own, names))
    return [names for _, names in merged]
