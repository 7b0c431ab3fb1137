"""The outer search: dp, tp, pp, virtual stages, microbatches, schedule, ZeRO, recompute.

``search(graph, cluster, global_batch)`` enumerates every configuration with
``dp * tp * pp`` equal to the cluster's devices (pins fixed, the rest free),
orders them by a lower bound on their step time and costs them in that order
until the bound of the next one cannot beat the best found. Costing one
configuration means: block costs from the cost model (cached per tensor-parallel
degree and microbatch size; identical blocks costed once), the exact stage
partition with per-stage recomputation (:func:`~tripar.partitioner.partition.
solve_partition_dp`) under the in-flight microbatch counts of its schedule,
then the schedule played by the simulator. The DP minimises a proxy of the step, so
the uniform split by layers, with the DP's per-stage recomputation for it under the same
budget, is simulated too and kept when faster (``_Search.best_split``; the plan's notes
say which split won and by how much). The result is a validated
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
from tripar.partitioner.cost.blocks import block_costs
from tripar.partitioner.cost.blocks import shardable_regions as _shardable
from tripar.partitioner.cost.collectives import p2p_time
from tripar.partitioner.cost.stages import BUCKET_BYTES, stage_costs, uniform_boundaries
from tripar.partitioner.hardware import Cluster, canonical_dtype, dtype_bytes
from tripar.partitioner.partition import (
    PartitionProblem,
    solve_fixed_partition,
    solve_partition_dp,
)
from tripar.partitioner.schedules import build_schedule
from tripar.partitioner.search_candidates import VIRTUAL_STAGES, Candidates, Pins
from tripar.partitioner.search_candidates import check_pins as _check_pins
from tripar.partitioner.search_candidates import config_key as _key
from tripar.partitioner.search_candidates import no_config_message as _no_config_message
from tripar.partitioner.search_regions import RegionChoice
from tripar.partitioner.simulator import encode_schedule, simulate
from tripar.partitioner.stage_cost import StageCost
from tripar.plan.config import ParallelConfig
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

_NO_PINS = Pins()
"""The default of ``search``: nothing pinned (Pins is frozen, so one instance serves)."""


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
    """Names (``block:kind:index``) of the regions sharded at ``config.tp``."""
    tp_note: str = ""
    """How the sharded regions were chosen."""
    split: str = "dp"
    """Whose stage split this is: ``dp`` (the partition DP's), ``uniform`` (layers spread
    evenly, :func:`~tripar.partitioner.cost.stages.uniform_boundaries`) or ``given``
    (:func:`evaluate_split`'s)."""
    split_note: str = ""
    """How the split was chosen: the simulated step of the DP's split against the uniform
    one's."""

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


class _Search(Candidates, RegionChoice):
    """State of one search: caches of block costs, schedules and in-flight counts. The
    enumeration, bounds and screening are :class:`~tripar.partitioner.search_candidates.
    Candidates`; the tensor-parallel region choice is :class:`~tripar.partitioner.
    search_regions.RegionChoice`."""

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

    # ---- block costs -----------------------------------------------------------------

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
        faster that fits is kept. For each, the partition DP's stage split and the
        uniform one are simulated (``best_split``)."""
        if cfg.tp == 1:
            return self.best_split(cfg, frozenset(), "")
        ilp, note = self.tp_choice(cfg)
        free = self.free_choice(cfg.tp, cfg.micro_batch_size)
        options = [(ilp, note)] + ([(free, "regions whose sharding saves more compute than "
                                           "its collectives cost")] if free != ilp else [])
        if not ilp and not free and self.pins.tp == cfg.tp:
            every = frozenset(n for _group, names in self.groups(cfg.tp) for n in names)
            options = [(every, f"every proven region: tp={cfg.tp} is pinned, though no region's "
                               "sharding pays for its collectives on this cluster")]
        results, errors = [], []
        for shard, why in options:
            if not shard:
                errors.append(f"at tp={cfg.tp} no proven region is worth sharding, so the "
                              f"{cfg.tp} tensor-parallel devices would only repeat work")
                continue
            try:
                results.append(self.best_split(cfg, shard, why))
            except InfeasibleError as error:
                errors.append(str(error))
        if not results:
            raise InfeasibleError(errors[0])
        return min(results, key=lambda e: (e.step_time_s, len(e.tp_regions)))

    def best_split(self, cfg: ParallelConfig, shard: frozenset[str], note: str) -> Evaluated:
        """The partition DP's stage split and the uniform split by layers, each with the
        recomputation the DP's per-stage choice gives it under the same memory budget, both
        simulated: the faster that fits (the DP's on a tie). The DP minimises a proxy of the
        step (``sum t / v + (m v - 1) max t``: no schedule dependencies, tails or uneven
        p2p), so the uniform split can simulate faster. It costs one more simulation: none
        when the DP's split is the uniform one, or when the uniform split's busiest rank
        alone (``m`` forward and backward passes of its stages, then its tail) takes at
        least the DP split's simulated step."""
        uniform = self.uniform(cfg.pp * cfg.vpp)
        dp_error: InfeasibleError | None = None
        try:
            dp: Evaluated | None = self._evaluate(cfg, shard, note)
        except InfeasibleError as error:
            if uniform is None:
                raise
            dp, dp_error = None, error
        if dp is not None and (uniform is None or dp.boundaries == uniform):
            return replace(dp, split_note="the partition DP's split" + (
                ", which is the uniform split by layers" if uniform is not None
                else " (too few layers for a uniform split)"))
        try:  # one try without margins where the DP's split does not fit (rarely does this)
            even = self._evaluate(cfg, shard, note, uniform,
                                  cutoff=math.inf if dp is None else dp.step_time_s,
                                  attempts=1 if dp is None else 3)
        except InfeasibleError:
            if dp is None:
                raise dp_error from None
            return replace(dp, split_note=f"the partition DP's split (simulated "
                                          f"{fmt_time(dp.step_time_s)}); the uniform split "
                                          f"by layers does not fit the device")
        if even is None:
            assert dp is not None
            return replace(dp, split_note=(
                f"the partition DP's split, simulated {fmt_time(dp.step_time_s)}; on the "
                f"uniform split by layers {list(uniform)} the busiest rank's compute alone "
                f"takes longer"))
        if dp is None:
            return replace(even, split="uniform", split_note=(
                f"the uniform split by layers (simulated {fmt_time(even.step_time_s)}); the "
                f"partition DP's split does not fit the device in the simulation"))
        if even.step_time_s < dp.step_time_s:
            return replace(even, split="uniform", split_note=(
                f"the uniform split by layers, simulated {fmt_time(even.step_time_s)}, "
                f"{1 - even.step_time_s / dp.step_time_s:.2%} faster than the partition "
                f"DP's split {list(dp.boundaries)} (the DP minimises a proxy of the step)"))
        return replace(dp, split_note=(
            f"the partition DP's split, simulated {fmt_time(dp.step_time_s)}, "
            f"{1 - dp.step_time_s / even.step_time_s:.2%} faster than the uniform split by "
            f"layers {list(even.boundaries)}"))

    def _evaluate(self, cfg: ParallelConfig, shard: frozenset[str], note: str,
                  split: tuple[int, ...] | None = None, *, cutoff: float = math.inf,
                  attempts: int = 3) -> Evaluated | None:
        """Cost and simulate ``cfg`` on the partition DP's split, or on ``split`` (the first
        block of each stage) with the DP's per-stage recomputation for it; a stage over
        the device in the simulation shrinks its budget by the overshoot and the split is
        solved again (``attempts`` tries in all). None, without simulating, when a rank's forward and
        backward passes and tail alone take ``cutoff`` or more (the step cannot be
        shorter: every rank runs them all, one action at a time, then its tail)."""
        margin = [0] * cfg.pp
        regions = None if cfg.tp == 1 else shard
        for _attempt in range(attempts):
            problem = self.partition_problem(cfg, margin, shard)
            key = problem if split is None else (problem, split)
            if key not in self._partitions:  # 1f1b, zb-h1 and scp share problems
                self._partitions[key] = (solve_partition_dp(problem) if split is None
                                         else solve_fixed_partition(problem, split))
                self.partition_runs.append((self._partitions[key].solve_time_s, 0.0))
                self.work += self._partitions[key].work
                self.partition_work += self._partitions[key].work
            sol = self._partitions[key]
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
            if math.isfinite(cutoff) and _busy_bound(costs, cfg) >= cutoff:
                return None
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
            tp_regions=tuple(sorted(shard)), tp_note=note,
            split="dp" if split is None else (
                "uniform" if split == self.uniform(cfg.pp * cfg.vpp) else "given"))


def _busy_bound(costs: Sequence[StageCost], cfg: ParallelConfig) -> float:
    """A lower bound on the simulated step: the busiest pipeline rank's forward and
    backward passes of every microbatch through its stages (recomputation left out),
    then its stages' tails.

    >>> c = StageCost(forward_s=1.0, backward_input_s=1.5, backward_weight_s=0.5, tail_s=2.0)
    >>> cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=4)
    >>> _busy_bound([c, c], cfg)
    14.0
    """
    ranks = [0.0] * cfg.pp
    for s, c in enumerate(costs):
        ranks[s % cfg.pp] += (cfg.num_microbatches
                              * (c.forward_s + c.backward_input_s + c.backward_weight_s)
                              + c.tail_s)
    return max(ranks)


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
           pins: Pins = _NO_PINS, model_spec: str = "", dtype: str | None = None,
           max_micro_batch: int = 16, alternatives: int = 4, min_evaluations: int = 6,
           max_evaluations: int = 24, screen_slack: float = 0.05) -> Plan:
    """The best plan for ``graph`` on ``cluster`` at ``global_batch`` samples per step
    (see :func:`search_with_stats`, which also returns the search's statistics).

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
                      seq_len: int | None = None, pins: Pins = _NO_PINS, model_spec: str = "",
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
    regions = tuple(TPShard(r.block, r.kind, r.nodes, r.shards, index=r.index)
                    for r in graph.tp_regions if cfg.tp > 1 and r.name in chosen)
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
    notes.append(f"stage split: {best.split_note}")
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
                 SolverRun("partition", "dp" if best.split == "dp" else "uniform split",
                           "optimal" if best.split == "dp" else "simulated faster than dp",
                           best.partition_objective, part_time)),
        solve_time_s=stats.seconds, alternatives=tuple(alts), notes=tuple(notes))
    return plan.validate()


def partition_problem(graph: ProxyGraph, cluster: Cluster, config: ParallelConfig, *,
                      dtype: str | None = None,
                      tp_regions: Sequence[str] | None = None) -> PartitionProblem:
    """The stage-partition problem the search solves for ``config`` (for ``--dump-lp``).

    >>> cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=4)
    >>> partition_problem(example_graph(layers=4), Cluster.builtin("a100-80g"), cfg).in_flight
    (2, 1)
    """
    state = _Search(graph, cluster, config.global_batch_size, Pins(), dtype, 16)
    shard = (frozenset(tp_regions) if tp_regions is not None else
             state.all_regions(config.tp))
    return state.partition_problem(config, [0] * config.pp, shard)


def evaluate_split(graph: ProxyGraph, cluster: Cluster, config: ParallelConfig,
                   boundaries: Sequence[int] | None = None, *, dtype: str | None = None,
                   tp_regions: Sequence[str] | None = None) -> Evaluated:
    """``config`` costed and simulated as the search costs it, on a given stage split
    (the first block of each of the ``pp * vpp`` stages; default: the uniform split by
    layers, :func:`~tripar.partitioner.cost.stages.uniform_boundaries`): whole blocks
    recomputed per stage as the partition DP would choose them under the same memory
    budget (``config.recompute``: ``stage-aware``, ``none`` or ``full``). The baseline a
    plan's own split must not lose to (:func:`uniform_split_of`). InfeasibleError when
    it does not fit the device.

    ``tp_regions``: names (``block:kind:index``) of the regions sharded at ``config.tp``
    (default: every proven one; a plan's are ``[r.name for r in plan.tp_regions]``).

    >>> cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=4)
    >>> got = evaluate_split(example_graph(layers=4), Cluster.builtin("a100-80g"), cfg)
    >>> got.boundaries, got.split, got.step_time_s > 0
    ((0, 3), 'uniform', True)
    """
    state = _Search(graph, cluster, config.global_batch_size, Pins(), dtype, 16)
    stages, n = config.pp * config.vpp, len(graph.blocks)
    if boundaries is None:
        split = uniform_boundaries(graph, stages)
    else:
        split = tuple(int(b) for b in boundaries)
        if len(split) == stages + 1 and split[-1] == n:
            split = split[:-1]
    if config.tp == 1:
        shard: frozenset[str] = frozenset()
    else:
        shard = (frozenset(tp_regions) if tp_regions is not None
                 else state.all_regions(config.tp))
    return state._evaluate(config, shard, "given regions", split)


def uniform_split_of(plan: Plan, graph: ProxyGraph, cluster: Cluster) -> Evaluated:
    """``plan``'s configuration and sharded regions on the uniform split by layers, costed
    as the search costs it (:func:`evaluate_split`); for a plan found with recomputation
    unpinned, its step is never above this one's. A plan that recomputes nothing is
    labelled ``none``: its uniform split is costed with ``stage-aware``, as the search
    costed it (pass a plan pinned to ``--recompute none`` to :func:`evaluate_split`).

    >>> graph, cluster = example_graph(layers=4), Cluster.builtin("a100-80g", gpus_per_node=4)
    >>> plan = search(graph, cluster, 16, pins=Pins(pp=2))
    >>> plan.estimate.step_time_s <= uniform_split_of(plan, graph, cluster).step_time_s
    True
    """
    par = plan.parallel
    cfg = replace(par, recompute="stage-aware") if par.recompute == "none" else par
    return evaluate_split(graph, cluster, cfg, dtype=plan.inputs.dtype,
                          tp_regions=[r.name for r in plan.tp_regions])


__all__ = ["VIRTUAL_STAGES", "Evaluated", "Pins", "SearchStats", "evaluate_split",
           "partition_problem", "search", "search_with_stats", "uniform_split_of"]
