"""One training step of a fully given configuration: stage costs, the schedule, and
the simulator's step time, bubble and peak memory (:func:`step_estimate`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from tripar.graph.proxy import ProxyGraph
from tripar.partitioner.cost.stages import recompute_fractions, stage_costs, uniform_boundaries
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.schedules import build_schedule
from tripar.partitioner.simulator import simulate
from tripar.partitioner.stage_cost import StageCost
from tripar.plan.config import ParallelConfig


@dataclass(frozen=True, slots=True)
class StepEstimate:
    """One simulated training step of a fully given configuration."""

    step_time_s: float
    tokens_per_s: float
    samples_per_s: float
    peak_memory_bytes: int
    """The largest per-rank peak (static + activations of every in-flight microbatch)."""
    memory_limit_bytes: int
    bubble_fraction: float
    stage_time_s: tuple[float, ...]
    """Per (virtual) stage: F + B + W (+ R) of one microbatch."""
    stage_memory_bytes: tuple[int, ...]
    """Per (virtual) stage: simulated peak bytes."""
    rank_busy_s: tuple[float, ...]
    rank_memory_bytes: tuple[int, ...]
    recompute: tuple[float, ...]
    """Recomputed share of each stage (1.0 for the stages an ``f``/``R`` schedule recomputes)."""
    boundaries: tuple[int, ...]
    stage_costs: tuple[StageCost, ...]
    sim: object
    """The simulator's ``SimResult`` (timeline, per-rank detail)."""
    selective: tuple[bool, ...] = ()
    """Per stage: whether it recomputes its blocks' selective segments (empty: none)."""

    @property
    def fits(self) -> bool:
        return self.peak_memory_bytes <= self.memory_limit_bytes


def step_estimate(graph: ProxyGraph, cluster: Cluster, config: ParallelConfig,
                  boundaries: Sequence[int] | None = None, *,
                  recompute: str | float | Sequence[float] | None = None,
                  dtype: str | None = None, record_timeline: bool = True,
                  tp_regions: Collection[str] | None = None) -> StepEstimate:
    """Cost the stages, build ``config.schedule`` and simulate one step.

    ``recompute`` (default ``config.recompute``): ``"none"``; ``"selective"`` (every
    stage recomputes its blocks' selective segments); ``"full"``
    (the schedule gets ``f``/``R`` actions); ``"stage-aware"`` (scp: Merak's
    rule in the schedule; other schedules: each stage recomputes the smallest
    share of its layers that fits the device memory with the microbatches the
    schedule keeps in flight there); or fractions per stage.
    ``tp_regions``: the regions sharded at ``config.tp`` (default: every proven one).

    >>> from tripar.partitioner.hardware import Cluster
    >>> from tripar.plan.config import ParallelConfig
    >>> cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=4)
    >>> est = step_estimate(example_graph(layers=4), Cluster.builtin("a100-80g"), cfg)
    >>> est.bubble_fraction > 0, est.tokens_per_s > 0, len(est.stage_time_s)
    (True, True, 2)
    """
    stages = config.pp * config.vpp
    policy = recompute if recompute is not None else config.recompute
    bounds = tuple(boundaries) if boundaries is not None else uniform_boundaries(graph, stages)
    limit = cluster.device.memory_bytes

    def schedule_for(flags):
        return build_schedule(config.schedule, config.pp, config.num_microbatches,
                              vpp=config.vpp, recompute=flags)

    if isinstance(policy, str) and (policy == "full"
                                    or (policy == "stage-aware" and config.schedule == "scp")):
        schedule = schedule_for(policy)
        costs = stage_costs(graph, cluster, config, bounds, recompute="none",
                            explicit_recompute=True, dtype=dtype,
                            tp_regions=tp_regions)
        recomputed = {a.stage for acts in schedule.actions for a in acts
                      if a.kind.value == "R"}
        fractions = [1.0 if s in recomputed else 0.0 for s in range(stages)]
    else:
        schedule = schedule_for("none")
        if policy == "stage-aware":
            keep = stage_costs(graph, cluster, config, bounds, recompute="none", dtype=dtype,
                                tp_regions=tp_regions)
            drop = stage_costs(graph, cluster, config, bounds, recompute="full", dtype=dtype,
                                tp_regions=tp_regions)
            probe = simulate(schedule, keep, record_timeline=False)
            fractions = _fitting_fractions(keep, drop, probe.stage_peak_inflight, config,
                                           limit)
        else:
            fractions = recompute_fractions("none" if policy == "selective" else policy,
                                            stages)
        costs = stage_costs(graph, cluster, config, bounds, recompute=fractions, dtype=dtype,
                            tp_regions=tp_regions, selective=policy == "selective")
    result = simulate(schedule, costs, record_timeline=record_timeline)
    samples = config.global_batch_size
    return StepEstimate(
        step_time_s=result.step_time_s,
        tokens_per_s=samples * graph.seq_len / result.step_time_s,
        samples_per_s=samples / result.step_time_s,
        peak_memory_bytes=int(result.peak_memory),
        memory_limit_bytes=int(limit),
        bubble_fraction=result.bubble_fraction,
        stage_time_s=tuple(c.forward_s + c.backward_input_s + c.backward_weight_s + c.recompute_s
                           for c in costs),
        stage_memory_bytes=tuple(result.stage_peak_memory_bytes),
        rank_busy_s=tuple(result.busy_s),
        rank_memory_bytes=tuple(result.peak_memory_bytes),
        recompute=tuple(fractions),
        boundaries=bounds,
        stage_costs=tuple(costs),
        sim=result,
        selective=(True,) * stages if policy == "selective" else (),
    )


def _fitting_fractions(keep: Sequence[StageCost], drop: Sequence[StageCost],
                       inflight: Sequence[int], config: ParallelConfig,
                       limit: int) -> list[float]:
    """Per stage, the smallest recomputed share r (one per rank, shared by its virtual
    stages) with ``static + sum_stages n (r in + (1 - r) saved) <= limit``; ``keep`` and
    ``drop`` are the stage costs with r = 0 and r = 1. 1.0 when even full recomputation
    does not fit (the estimate then reports the overflow)."""
    shares = []
    for rank in range(config.pp):
        mine = config.stages_on(rank)
        need = sum(keep[s].static_bytes + inflight[s] * keep[s].activation_bytes for s in mine)
        saving = sum(inflight[s] * (keep[s].activation_bytes - drop[s].activation_bytes)
                     for s in mine)
        if need <= limit:
            shares.append(0.0)
        else:
            shares.append(1.0 if saving <= 0 else min(1.0, (need - limit) / saving))
    return [max(shares[r] for r in config.ranks_of(s)) for s in range(len(keep))]
