"""Costing one configuration: the stage partition, the schedule, the simulation.

:class:`Evaluator` costs a configuration as the search does: the regions to shard (the
tensor-parallel ILP's choice and the time-optimal one, from
:class:`~tripar.partitioner.plan_search.regions.RegionChooser`), for each the partition
DP's stage split and the uniform split by layers with the DP's per-stage recomputation,
each simulated; the faster that fits is the configuration's :class:`Evaluated`. Its
caches are typed: schedules by :class:`~tripar.partitioner.plan_search.cache.ScheduleKey`,
solved partitions by :class:`~tripar.partitioner.plan_search.cache.PartitionKey`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tripar.errors import InfeasibleError
from tripar.graph.proxy import ProxyGraph
from tripar.partitioner.cost.collectives import p2p_time
from tripar.partitioner.cost.stages import BUCKET_BYTES, bytes_per_param, stage_costs
from tripar.partitioner.hardware import Cluster, dtype_bytes
from tripar.partitioner.partition.device import device_shares
from tripar.partitioner.partition.dp import solve_partition_dp
from tripar.partitioner.partition.fixed import solve_fixed_partition
from tripar.partitioner.partition.problem import PartitionProblem, PartitionSolution
from tripar.partitioner.partition.stage_table import StageTable
from tripar.partitioner.plan_search.cache import (
    BlockCostCache,
    PartitionKey,
    ScheduleKey,
    UniformSplits,
)
from tripar.partitioner.plan_search.pins import Pins
from tripar.partitioner.plan_search.regions import RegionChooser
from tripar.partitioner.schedules import build_schedule, warmup_in_flight
from tripar.partitioner.simulator import EncodedSchedule, encode_schedule, simulate
from tripar.partitioner.stage_cost import StageCost
from tripar.plan import Estimate, ParallelConfig
from tripar.plan.schedule import Schedule
from tripar.plan.units import fmt_time


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
    selective: tuple[bool, ...] = ()
    """Per stage: whether its blocks recompute their selective segments (empty: none)."""
    stage_bytes_at_rank_peak: tuple[int, ...] = ()
    """Per stage: its bytes when its pipeline rank's memory peaks (they sum to the rank's)."""

    def estimate(self, tokens: int) -> Estimate:
        return Estimate(self.step_time_s, tokens / self.step_time_s, self.peak_memory_bytes,
                        max(0.0, self.bubble_fraction), self.rank_memory_bytes, self.busy_s,
                        max(0.0, self.tail_s))


class Evaluator:
    """Costs configurations of one search (see the module docstring), counting its work:
    ``work`` (partition work units and simulated actions), ``partition_work`` (the
    partition's part) and ``partition_seconds`` (each partition solved, in order)."""

    def __init__(self, graph: ProxyGraph, cluster: Cluster, pins: Pins, dtype: str,
                 costs: BlockCostCache, regions: RegionChooser,
                 uniform: UniformSplits) -> None:
        self.graph, self.cluster, self.pins, self.dtype = graph, cluster, pins, dtype
        self.limit = cluster.device.memory_bytes
        self.costs, self.regions, self.uniform = costs, regions, uniform
        self.work = 0
        self.partition_work = 0
        self.partition_seconds: list[float] = []
        self._schedules: dict[ScheduleKey, tuple[Schedule, EncodedSchedule]] = {}
        self._partitions: dict[PartitionKey, PartitionSolution] = {}

    def schedule(self, cfg: ParallelConfig, recompute: str
                 ) -> tuple[Schedule, EncodedSchedule]:
        """``cfg``'s schedule with ``recompute``, built and encoded once per search."""
        key = ScheduleKey.of(cfg, recompute)
        if key not in self._schedules:
            sched = build_schedule(cfg.schedule, cfg.pp, cfg.num_microbatches, vpp=cfg.vpp,
                                   recompute=recompute)
            self._schedules[key] = (sched, encode_schedule(sched))
        return self._schedules[key]

    def partition_problem(self, cfg: ParallelConfig, margin: Sequence[int],
                          shard: frozenset[str], selective: bool = False,
                          reference: tuple[int, ...] | None = None) -> PartitionProblem:
        """The stage-partition problem of ``cfg`` with ``shard`` sharded, each pipeline
        rank's budget less its ``margin``, shared among its virtual stages after what
        each needs on ``reference`` (default: the uniform split by layers;
        :func:`~tripar.partitioner.partition.device.device_shares`), or, with
        ``reference=()``, evenly (``1 / vpp`` each). With ``selective`` every block keeps
        its saved bytes less its selective segments' and its backward re-runs them; a
        block recomputed whole re-runs the rest of its forward instead."""
        costs = self.costs.get(cfg.tp, cfg.micro_batch_size, shard, cfg.sp, cfg.tp_overlap)
        k = cfg.pp * cfg.vpp
        crosses = cfg.dp * cfg.tp >= self.cluster.devices_per_node
        cut = [p2p_time(self.cluster, c.output_bytes / cfg.tp, crosses) for c in costs[:-1]]
        width = dtype_bytes(self.dtype)
        params = sum(c.params for c in costs)
        buffers = min(params * width, BUCKET_BYTES) * (cfg.dp * cfg.pipelines > 1)   # one bucket a device
        p2p = max(c.output_bytes for c in costs)   # send and receive buffers of each stage
        device = [max(0, self.limit - margin[r] - buffers - 4 * len(cfg.stages_on(0)) * p2p)
                  for r in range(cfg.pp)]
        policy = "none" if cfg.recompute == "selective" else cfg.recompute
        chosen = [c.selective_s if selective else 0.0 for c in costs]
        problem = PartitionProblem(
            blocks=tuple(b.name for b in self.graph.blocks),
            forward_s=[c.forward_s for c in costs],
            backward_s=[c.backward_input_s + c.backward_weight_s + x
                        for c, x in zip(costs, chosen)],
            recompute_s=[max(0.0, c.forward_s - x) for c, x in zip(costs, chosen)],
            activation_bytes=[c.saved_bytes - (c.selective_bytes if selective else 0)
                              for c in costs],
            input_bytes=[c.input_bytes for c in costs],
            static_bytes=self.static_bytes(cfg, shard),
            in_flight=warmup_in_flight(cfg.schedule, cfg.pp, cfg.num_microbatches, cfg.vpp),
            memory_limit_bytes=device[0], num_microbatches=cfg.num_microbatches,
            virtual_stages=cfg.vpp, cut_s=cut, recompute=policy)
        if cfg.pipelines == 2:  # chimera: a rank's two stages share its device
            return replace(problem, memory_limit_bytes=[
                min(device[r] for r in cfg.ranks_of(s)) // 2 for s in range(k)])
        if k == cfg.pp:
            return replace(problem, memory_limit_bytes=device)
        if reference == ():
            return replace(problem, memory_limit_bytes=[device[s % cfg.pp] // cfg.vpp
                                                        for s in range(k)])
        return replace(problem, memory_limit_bytes=device_shares(
            problem, pp=cfg.pp, device_budget=device,
            boundaries=reference if reference is not None else self.uniform(k)))

    def solve(self, cfg: ParallelConfig, margin: Sequence[int], shard: frozenset[str],
              split: tuple[int, ...] | None, selective: bool = False
              ) -> tuple[PartitionProblem, PartitionSolution]:
        """The partition DP's split (or ``split`` with the DP's recomputation) under
        ``cfg``'s device budgets, each rank's shared among its virtual stages after their
        needs on the uniform split. The DP may move layers the shares did not plan for
        (off a stage holding a heavy embedding or head), so when nothing fits them it
        solves with even shares (``1 / vpp`` of the device each) and shares the device
        again after the split found there; the first that fits, else the first error."""
        problem = self.partition_problem(cfg, margin, shard, selective)
        try:
            return problem, self._solved(problem, split)
        except InfeasibleError:
            if cfg.vpp == 1:
                raise
            first = sys.exc_info()[1]
        even = self.partition_problem(cfg, margin, shard, selective, reference=())
        try:
            found = self._solved(even, split)
        except InfeasibleError:
            raise first from None
        shared = self.partition_problem(cfg, margin, shard, selective,
                                        reference=found.boundaries)
        try:
            return shared, self._solved(shared, split)
        except InfeasibleError:
            return even, found

    def _solved(self, problem: PartitionProblem,
                split: tuple[int, ...] | None) -> PartitionSolution:
        key = PartitionKey(problem, split)
        if key not in self._partitions:  # 1f1b, zb-h1 and scp share problems
            self._partitions[key] = (solve_partition_dp(problem) if split is None
                                     else solve_fixed_partition(problem, split))
            self.partition_seconds.append(self._partitions[key].solve_time_s)
            self.work += self._partitions[key].work
            self.partition_work += self._partitions[key].work
        return self._partitions[key]

    def static_bytes(self, cfg: ParallelConfig, shard: frozenset[str]) -> list[int]:
        """Weights, gradients and optimizer state of each block under ``cfg``."""
        model, optimizer = bytes_per_param(self.dtype, cfg.zero, cfg.dp * cfg.pipelines)
        return [int(c.params * (model + optimizer))
                for c in self.costs.get(cfg.tp, cfg.micro_batch_size, shard)]

    def evaluate(self, cfg: ParallelConfig) -> Evaluated:
        """Partition, cost and simulate ``cfg``; InfeasibleError when it does not fit.

        The regions sharded are the tensor-parallel ILP's choice (``tp_choice``) and the
        time-optimal one (``free_choice``); when they differ both are costed and the
        faster that fits is kept. For each, the partition DP's stage split and the
        uniform one are simulated (``best_split``)."""
        if cfg.tp == 1:
            return self.best_split(cfg, frozenset(), "")
        ilp, note = self.regions.tp_choice(cfg)
        free = self.regions.free_choice(cfg.tp, cfg.micro_batch_size)
        options = [(ilp, note)] + ([(free, "regions whose sharding saves more compute than "
                                           "its collectives cost")] if free != ilp else [])
        if not ilp and not free and self.pins.tp == cfg.tp:
            every = frozenset(n for _group, names in self.regions.groups(cfg.tp) for n in names)
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
        """:meth:`split_for` without and with selective recomputation, as ``cfg.recompute``
        allows (``selective``: with; ``stage-aware``: both, when the graph has selective
        segments and the schedule does not recompute stages whole), the faster that fits."""
        modes = [False]
        if cfg.recompute == "selective":
            modes = [True]
        elif (cfg.recompute == "stage-aware" and cfg.schedule != "scp"
              and any(b.selective_nodes for b in self.graph.blocks)):
            modes = [False, True]
        results, error = [], None
        for selective in modes:
            try:
                results.append(self.split_for(cfg, shard, note, selective))
            except InfeasibleError as failed:
                error = error or failed
        if not results:
            assert error is not None
            raise error
        return min(results, key=lambda e: e.step_time_s)

    def split_for(self, cfg: ParallelConfig, shard: frozenset[str], note: str,
                  selective: bool = False) -> Evaluated:
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
            dp: Evaluated | None = self.simulate_split(cfg, shard, note, selective=selective)
        except InfeasibleError as error:
            if uniform is None:
                raise
            dp, dp_error = None, error
        if dp is not None and (uniform is None or dp.boundaries == uniform):
            return replace(dp, split_note="the partition DP's split" + (
                ", which is the uniform split by layers" if uniform is not None
                else " (too few layers for a uniform split)"))
        try:  # one try without margins where the DP's split does not fit (rarely does this)
            even = self.simulate_split(cfg, shard, note, uniform,
                                       cutoff=math.inf if dp is None else dp.step_time_s,
                                       attempts=1 if dp is None else 3, selective=selective)
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

    def simulate_split(self, cfg: ParallelConfig, shard: frozenset[str], note: str,
                       split: tuple[int, ...] | None = None, *, cutoff: float = math.inf,
                       attempts: int = 3, selective: bool = False) -> Evaluated | None:
        """Cost and simulate ``cfg`` on the partition DP's split, or on ``split`` (the first
        block of each stage) with the DP's per-stage recomputation for it; a stage over
        the device in the simulation shrinks its budget by the overshoot and the split is
        solved again (``attempts`` tries in all). With ``selective`` the blocks recompute
        their selective segments (:meth:`partition_problem`); under ``stage-aware`` a stage
        that fits as cheaply without them does not (:func:`_plain_stages`). None, without simulating, when a rank's forward and
        backward passes and tail alone take ``cutoff`` or more (the step cannot be
        shorter: every rank runs them all, one action at a time, then its tail)."""
        margin = [0] * cfg.pp
        regions = None if cfg.tp == 1 else shard
        for _attempt in range(attempts):
            problem, sol = self.solve(cfg, margin, shard, split, selective)
            bounds = sol.boundaries
            explicit = cfg.recompute == "full" or cfg.schedule == "scp"
            flags = [selective and not explicit] * len(sol.stages)
            stage_problems = [problem] * len(sol.stages)
            rec = [st.recompute for st in sol.stages]
            if selective and cfg.recompute == "stage-aware":
                plain = self.partition_problem(cfg, margin, shard)
                for s, blocks in _plain_stages(plain, sol).items():
                    flags[s], stage_problems[s], rec[s] = False, plain, blocks
            rec = tuple(rec)
            fractions = []
            for st, prob, mine in zip(sol.stages, stage_problems, rec):
                total = sum(prob.saving_bytes(b) for b in range(st.first, st.stop)
                            if prob.recomputable(b))
                saved = sum(prob.saving_bytes(b) for b in mine)
                fractions.append(saved / total if total else 0.0)
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
                                    dtype=self.dtype, tp_regions=regions, selective=flags)
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
        if cfg.recompute == "stage-aware" and not any(rec) and not any(flags):
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
            stage_bytes_at_rank_peak=result.stage_bytes_at_rank_peak,
            in_flight=tuple(result.stage_peak_inflight), schedule_lines=lines,
            partition_time_s=sol.solve_time_s, partition_objective=sol.objective_s,
            tp_regions=tuple(sorted(shard)), tp_note=note,
            split="dp" if split is None else (
                "uniform" if split == self.uniform(cfg.pp * cfg.vpp) else "given"),
            selective=tuple(flags) if any(flags) else ())


def _plain_stages(plain: PartitionProblem, sol: PartitionSolution
                  ) -> dict[int, tuple[int, ...]]:
    """The stages of ``sol`` (solved with selective recomputation) that fit under the
    ``plain`` problem (without it) in no more time: stage -> the blocks it then recomputes
    whole."""
    table = StageTable(plain, tables=False)
    out = {}
    for st in sol.stages:
        got = table.choice(st.index, st.first, st.stop)
        if got is None:
            continue
        time_s = math.fsum([*plain.forward_s[st.first:st.stop],
                            *plain.backward_s[st.first:st.stop], got[0],
                            plain.cut_s[st.stop - 1] if st.index + 1 < plain.num_stages
                            else 0.0])
        if time_s <= st.time_s:
            out[st.index] = table.recompute_blocks(st.index, st.first, st.stop)
    return out


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
    runs = cfg.num_microbatches // cfg.pipelines  # microbatches each copy of a stage runs
    for s, c in enumerate(costs):
        for r in cfg.ranks_of(s):
            ranks[r] += runs * (c.forward_s + c.backward_input_s + c.backward_weight_s) + c.tail_s
    return max(ranks)
