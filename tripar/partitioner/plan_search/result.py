"""The search's result: its statistics, and the plan assembled from the best
configuration with the runners-up and why each lost."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from tripar.graph.proxy import ProxyGraph
from tripar.partitioner.cost.blocks import BlockCost, block_costs
from tripar.partitioner.cost.blocks import shardable_regions as _shardable
from tripar.partitioner.cost.stages import bytes_per_param
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.plan_search.evaluate import Evaluated
from tripar.partitioner.plan_search.space import config_key
from tripar.plan import (
    Alternative,
    Binding,
    ClusterInfo,
    Inputs,
    ModelInfo,
    ParallelConfig,
    Plan,
    SolverRun,
    StagePlan,
    TPShard,
    model_fingerprint,
)
from tripar.plan.units import fmt_bytes, fmt_time


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


def _compute_causes(alt: Evaluated, best: Evaluated) -> list[str]:
    """What makes ``alt``'s busiest device compute more than ``best``'s, from what differs
    between them: recomputation only when ``alt`` recomputes more, never when its recompute
    is ``none``."""
    a, b = alt.config, best.config
    causes = []
    recomputed = sum(len(r) for r in alt.recompute)
    if a.recompute != "none" and recomputed and (
            sum(c.recompute_s for c in alt.costs) > sum(c.recompute_s for c in best.costs)):
        causes.append(f"recomputation of {recomputed} blocks")
    if a.micro_batch_size < b.micro_batch_size:
        causes.append(f"smaller micro-batches ({a.micro_batch_size} vs {b.micro_batch_size} "
                      f"samples), less efficient products")
    if a.tp > b.tp:
        causes.append(f"smaller products at tp={a.tp} than at tp={b.tp}")
    elif a.tp < b.tp:
        causes.append(f"each layer split over fewer devices (tp={a.tp} vs tp={b.tp})")
    if not causes:
        causes.append("a less even stage split" if a.pp > 1 else "less efficient products")
    return causes


def _loss_reason(alt: Evaluated, best: Evaluated) -> tuple[str, Binding]:
    """Why ``alt`` is slower than ``best``: the component that grew most, and for compute
    what grew it."""
    grew = {
        Binding.BUBBLE: (alt.idle_s - best.idle_s,
                         f"larger bubble: {alt.bubble_fraction:.1%} vs {best.bubble_fraction:.1%}"),
        Binding.COMPUTE: (alt.busy_s - best.busy_s, ""),
        Binding.COMMUNICATION: (alt.tail_s - best.tail_s,
                                f"more communication after the pipeline (gradient reduction, "
                                f"ZeRO gathers): {fmt_time(alt.tail_s)} vs "
                                f"{fmt_time(best.tail_s)}"),
    }
    binding = max(grew, key=lambda b: (grew[b][0], b.value))
    if binding is Binding.COMPUTE:
        return (f"more compute on the busiest device, {fmt_time(alt.busy_s)} vs "
                f"{fmt_time(best.busy_s)}: {'; '.join(_compute_causes(alt, best))}"), binding
    return grew[binding][1], binding


def _selective_nodes(graph: ProxyGraph, best: Evaluated, bounds: Sequence[int],
                     s: int) -> tuple[str, ...]:
    """The nodes stage ``s`` recomputes selectively: its blocks' selective segments when the
    stage is selective, less the blocks it recomputes whole."""
    if not best.selective or not best.selective[s]:
        return ()
    whole = set(best.recompute[s])
    return tuple(n for b in range(bounds[s], bounds[s + 1]) if b not in whole
                 for n in graph.blocks[b].selective_nodes)


def assemble_plan(graph: ProxyGraph, cluster: Cluster, dtype: str, best: Evaluated,
                  evaluated: list[Evaluated], failures: list[tuple[int, ParallelConfig, str]],
                  stats: SearchStats, *, seq_len: int, spec: str, alternatives: int,
                  partition_seconds: Sequence[float]) -> Plan:
    """The validated plan of ``best``: its stages, regions and estimate, the runners-up
    among ``evaluated`` (and the closest of ``failures``) with the reason each lost, the
    solvers' provenance and the search's notes."""
    cfg = best.config
    names = [b.name for b in graph.blocks]
    n, k = len(names), cfg.pp * cfg.vpp
    bounds = (*best.boundaries, n)
    stages = tuple(
        StagePlan(index=s, rank=s % cfg.pp, virtual_index=s // cfg.pp,
                  blocks=tuple(names[bounds[s]:bounds[s + 1]]),
                  recompute=tuple(names[b] for b in best.recompute[s]),
                  time_s=best.stage_time_s[s], memory_bytes=best.stage_memory_bytes[s],
                  in_flight=max(1, best.in_flight[s]),
                  selective=_selective_nodes(graph, best, bounds, s),
                  memory_at_device_peak_bytes=(best.stage_bytes_at_rank_peak[s]
                                               if best.stage_bytes_at_rank_peak else 0))
        for s in range(k))
    chosen = set(best.tp_regions)
    regions = tuple(TPShard(r.block, r.kind, r.nodes, r.shards, index=r.index)
                    for r in graph.tp_regions if cfg.tp > 1 and r.name in chosen)
    proven = _shardable(graph, cfg.tp)
    tokens = cfg.global_batch_size * seq_len
    runners = sorted((e for e in evaluated if e is not best),
                     key=lambda e: (e.step_time_s, config_key(e.config)))
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
    for _over, fcfg, why in sorted(failures, key=lambda f: (f[0], config_key(f[1]))):
        if fcfg not in seen and len(alts) < alternatives:
            alts.append(Alternative(fcfg, None, why, Binding.MEMORY))
            break
    part_time = sum(partition_seconds)
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
    costs = block_costs(graph, cluster, cfg, dtype=dtype, tp_regions=best.tp_regions)
    for note in (_sequence_note(graph, cluster, dtype, best, evaluated, bounds),
                 _selective_note(costs, best, evaluated, bounds, stages),
                 _zero_note(costs, dtype, best, bounds),
                 _overlap_note(graph, cluster, dtype, costs, best, evaluated, bounds)):
        if note:
            notes.append(note)
    plan = Plan(
        model=ModelInfo(spec or "model", model_fingerprint(graph.blocks), tuple(names),
                        sum(b.params for b in graph.blocks)),
        cluster=ClusterInfo.from_cluster(cluster, dtype),
        inputs=Inputs(cfg.global_batch_size, seq_len, dtype),
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


def _selective_note(costs: Sequence[BlockCost], best: Evaluated, evaluated: list[Evaluated],
                    bounds: Sequence[int], stages: Sequence[StagePlan]) -> str:
    """What selective recomputation drops on its first stage, per microbatch and at the
    stage's peak, what it re-runs, and the same configuration without it (``costs``: the
    plan's block costs)."""
    first = next((st for st in stages if st.selective), None)
    if first is None:
        return ""
    mine = costs[bounds[first.index]:bounds[first.index + 1]]
    dropped = sum(c.selective_bytes for c in mine)
    rerun = sum(c.selective_s for c in mine)
    other = next((e for e in evaluated
                  if e.config == dataclasses.replace(best.config, recompute="none")), None)
    versus = ""
    if other is not None and best.step_time_s > 0:
        versus = (f"; the step with recompute none takes "
                  f"{other.step_time_s / best.step_time_s - 1:+.1%}")
    return (f"selective recomputation: {sum(bool(st.selective) for st in stages)} of "
            f"{len(stages)} stages re-run the parts of their blocks cheap to recompute and "
            f"costly to keep; stage {first.index} drops {fmt_bytes(dropped)} per microbatch "
            f"({fmt_bytes(dropped * first.in_flight)} at its peak, {first.in_flight} in "
            f"flight) for {fmt_time(rerun)} of recomputation per microbatch{versus}")


def _sequence_note(graph: ProxyGraph, cluster: Cluster, dtype: str, best: Evaluated,
                   evaluated: list[Evaluated], bounds: Sequence[int]) -> str:
    """What sequence parallelism saves on stage 0 per microbatch, and whether it was
    chosen (and, beside it, the same configuration the other way)."""
    cfg = best.config
    if cfg.tp == 1 or not any(b.sequence_saved_bytes for b in graph.blocks):
        return ""
    on, off = (block_costs(graph, cluster, dataclasses.replace(cfg, sp=sp, tp_overlap=1),
                           dtype=dtype, tp_regions=best.tp_regions)[:bounds[1]]
               for sp in (True, False))  # the bytes kept are the same at every tp_overlap
    kept_on, kept_off = sum(c.saved_bytes for c in on), sum(c.saved_bytes for c in off)
    other = None if cfg.splits_sequence else next(  # sp cannot join a sequence split
        (e for e in evaluated if e.config == dataclasses.replace(cfg, sp=not cfg.sp)), None)
    versus = ""
    if other is not None and best.step_time_s > 0:
        versus = (f"; the step with sp={'off' if cfg.sp else 'on'} takes "
                  f"{other.step_time_s / best.step_time_s - 1:+.1%}")
    would = "run" if cfg.sp else "would run"
    saved = (f"the token-wise parts between the regions {would} on 1/{cfg.tp} of the "
             f"sequence; stage 0 keeps {fmt_bytes(kept_on)} of activations per microbatch with "
             f"it, {fmt_bytes(kept_off)} without")
    if graph.seq_len % cfg.tp:
        return (f"sequence parallelism off: the sequence of {graph.seq_len} tokens does not "
                f"divide by tp={cfg.tp}")
    return (f"sequence parallelism {'on' if cfg.sp else 'off'}: {saved} "
            f"(saves {fmt_bytes(kept_off - kept_on)}){versus}")


def _zero_note(costs: Sequence[BlockCost], dtype: str, best: Evaluated,
               bounds: Sequence[int]) -> str:
    """The ZeRO stage chosen and the bytes of weights, gradients and optimizer state it
    leaves on a stage-0 rank, beside ZeRO-0's (``costs``: the plan's block costs)."""
    cfg = best.config
    copies = cfg.dp * cfg.pipelines
    if copies == 1:
        return ""
    params = sum(c.params for c in costs[:bounds[1]])
    held, whole = (params * sum(bytes_per_param(dtype, zero, copies))
                   for zero in (cfg.zero, 0))
    what = {0: "optimizer state and gradients replicated",
            1: "optimizer state sharded", 2: "optimizer state and gradients sharded"}
    return (f"ZeRO-{cfg.zero} ({what[cfg.zero]} over {copies} ranks): a stage-0 rank holds "
            f"{fmt_bytes(held)} of weights, gradients and optimizer state, "
            f"{fmt_bytes(whole)} at ZeRO-0" + (f" (saves {fmt_bytes(whole - held)})"
                                                if whole > held else ""))


def _overlap_note(graph: ProxyGraph, cluster: Cluster, dtype: str,
                  costs: Sequence[BlockCost], best: Evaluated, evaluated: list[Evaluated],
                  bounds: Sequence[int]) -> str:
    """Sub-pipelined tensor parallelism, when chosen (or weighed): the tensor-parallel
    collective time stage 0 leaves exposed per microbatch, beside one part's, and the
    same configuration with the other part count (``costs``: the plan's block costs)."""
    cfg = best.config
    if cfg.tp == 1:
        return ""

    def but_parts(c: ParallelConfig) -> dict:
        return {k: v for k, v in dataclasses.asdict(c).items() if k != "tp_overlap"}

    others = [e for e in evaluated if e.config.tp_overlap != cfg.tp_overlap
              and but_parts(e.config) == but_parts(cfg)]
    if cfg.tp_overlap == 1 and not others:
        return ""
    if cfg.tp_overlap == 1:
        k = min(others, key=lambda e: e.step_time_s)
        return (f"sub-pipelined tensor parallelism off: {k.config.tp_overlap} parts per "
                f"microbatch would take {k.step_time_s / best.step_time_s - 1:+.1%} "
                "(their smaller GEMMs lose more than the overlap hides)")
    one = block_costs(graph, cluster, dataclasses.replace(cfg, tp_overlap=1), dtype=dtype,
                      tp_regions=best.tp_regions)[:bounds[1]]
    exposed, whole = (sum(c.tp_comm_s for c in cs) for cs in (costs[:bounds[1]], one))
    versus = next((f"; the step with one part takes "
                   f"{e.step_time_s / best.step_time_s - 1:+.1%}"
                   for e in others if e.config.tp_overlap == 1 and best.step_time_s > 0), "")
    along = ("of its sequence (one sample: attention runs whole between them)"
             if cfg.splits_sequence else "of its samples")
    return (f"sub-pipelined tensor parallelism: each microbatch runs as {cfg.tp_overlap} parts "
            f"{along} whose collectives overlap the other parts' compute; stage 0 leaves "
            f"{fmt_time(exposed)} of tensor-parallel collectives exposed per microbatch, "
            f"{fmt_time(whole)} with one part{versus}")
