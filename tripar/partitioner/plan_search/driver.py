"""The search loop: enumerate, screen, bound, cost, assemble (see
:mod:`tripar.partitioner.plan_search` for the design), and the baselines a plan is
checked against (:func:`evaluate_split`, :func:`uniform_split_of`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tripar.errors import InfeasibleError
from tripar.graph.proxy import ProxyGraph
from tripar.partitioner.cost.stages import uniform_boundaries
from tripar.partitioner.hardware import Cluster, canonical_dtype
from tripar.partitioner.partition.problem import PartitionProblem
from tripar.partitioner.plan_search.cache import BlockCostCache, UniformSplits
from tripar.partitioner.plan_search.evaluate import Evaluated, Evaluator
from tripar.partitioner.plan_search.pins import Pins, Spelling, check_pins, no_config_message
from tripar.partitioner.plan_search.regions import RegionChooser
from tripar.partitioner.plan_search.result import SearchStats, assemble_plan
from tripar.partitioner.plan_search.space import SearchSpace, config_key
from tripar.plan import ParallelConfig, Plan

_NO_PINS = Pins()
"""The default of ``search``: nothing pinned (Pins is frozen, so one instance serves)."""


@dataclass(frozen=True, slots=True)
class SearchParts:
    """The objects of one search, each handed the ones it reads: one block-cost cache
    and one uniform-split cache shared by the region chooser, the candidate space and the
    evaluator."""

    costs: BlockCostCache
    regions: RegionChooser
    space: SearchSpace
    evaluator: Evaluator


def search_parts(graph: ProxyGraph, cluster: Cluster, global_batch: int, pins: Pins,
                 dtype: str | None, max_micro_batch: int, *,
                 choose_overlap: bool | None = None) -> SearchParts:
    """The parts of a search of ``graph`` on ``cluster`` at ``global_batch`` samples per
    step under ``pins``, training in ``dtype`` (default: the device's); with
    ``choose_overlap`` whether an unpinned tp_overlap is searched too (``SearchSpace``;
    default: for torch.fx graphs).

    >>> from tripar.partitioner.hardware import Cluster
    >>> parts = search_parts(example_graph(layers=2), Cluster.builtin("a100-80g",
    ...                      gpus_per_node=2), 4, Pins(), None, 16)
    >>> len(parts.space.configs()) > 0, [name for name, _ in parts.regions.groups(2)]
    (True, ['blocks.0:attention:0 (+1 alike)', 'blocks.0:mlp:0 (+1 alike)'])
    """
    dtype = canonical_dtype(dtype or cluster.device.default_dtype)
    costs = BlockCostCache(graph, cluster, dtype)
    uniform = UniformSplits(graph)
    regions = RegionChooser(graph, cluster, dtype, costs)
    space = SearchSpace(graph, cluster, global_batch, pins, dtype, max_micro_batch, costs,
                        regions, uniform, choose_overlap=choose_overlap)
    evaluator = Evaluator(graph, cluster, pins, dtype, costs, regions, uniform)
    return SearchParts(costs, regions, space, evaluator)


def search(graph: ProxyGraph, cluster: Cluster, global_batch: int, *, seq_len: int | None = None,
           pins: Pins = _NO_PINS, model_spec: str = "", dtype: str | None = None,
           max_micro_batch: int = 16, alternatives: int = 4, min_evaluations: int = 6,
           max_evaluations: int = 24, screen_slack: float = 0.05,
           spelling: Spelling = Spelling.API) -> Plan:
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
        screen_slack=screen_slack, spelling=spelling)[0]


def search_with_stats(graph: ProxyGraph, cluster: Cluster, global_batch: int, *,
                      seq_len: int | None = None, pins: Pins = _NO_PINS, model_spec: str = "",
                      dtype: str | None = None, max_micro_batch: int = 16,
                      alternatives: int = 4, min_evaluations: int = 6,
                      max_evaluations: int = 24, screen_slack: float = 0.05,
                      spelling: Spelling = Spelling.API,
                      choose_overlap: bool | None = None) -> tuple[Plan, SearchStats]:
    """The best plan for ``graph`` on ``cluster`` at ``global_batch`` samples per step.

    Candidates that fit by static memory are ordered by a quick screening estimate
    (``SearchSpace.screen``) and costed exactly (partition DP + simulation) in that
    order; a candidate is skipped when its lower bound cannot beat the best, and the
    loop ends after ``max_evaluations`` costed candidates, or once at least
    ``min_evaluations`` are costed and the screening estimate exceeds the best's by
    more than ``screen_slack``; after that, each schedule none of whose candidates was
    costed still gets its best-screened one costed (unless its bound prunes it). For an
    exhaustive run pass ``max_evaluations`` and
    ``min_evaluations`` at least the number of candidates (or ``screen_slack=math.inf``):
    the plan's search status is ``optimal`` only when no candidate was left after
    screening (bound pruning is exact), ``screened`` otherwise. ``choose_overlap``: whether an
    unpinned tp_overlap is searched too (default: for graphs torch.fx traced, whose
    stages codegen can split by sample).

    >>> cluster = Cluster.builtin("a100-80g", gpus_per_node=4)
    >>> plan, stats = search_with_stats(example_graph(layers=4), cluster, 16,
    ...                                 screen_slack=math.inf, max_evaluations=10**6)
    >>> plan.solvers[0].status, stats.pruned_by_screen, stats.work > 0
    ('optimal', 0, True)
    """
    start = time.perf_counter()
    check_pins(pins, cluster.devices, global_batch, graph=graph, spelling=spelling)
    pins = pins.implied()
    parts = search_parts(graph, cluster, global_batch, pins, dtype, max_micro_batch,
                         choose_overlap=choose_overlap)
    space, evaluator = parts.space, parts.evaluator
    configs = space.configs()
    if not configs:
        raise InfeasibleError(no_config_message(graph, cluster, global_batch, pins))
    failures: list[tuple[int, ParallelConfig, str]] = []
    bounds, screens = {}, {}
    screened = 0
    for cfg in configs:
        over, why = space.static_overflow(cfg)
        if over > 0:
            failures.append((over, cfg, why))
            continue
        bounds[cfg], screens[cfg] = space.lower_bound(cfg), space.screen(cfg)
        screened += 1
    pruned_memory = len(failures)
    order = sorted(bounds, key=lambda c: (screens[c], bounds[c], config_key(c)))
    evaluated: list[Evaluated] = []
    pruned_bound = pruned_screen = 0
    best: Evaluated | None = None
    best_screen = math.inf
    screened_out = False
    tried: set[str] = set()   # schedules with a candidate costed (or found not to fit)
    for cfg in order:
        if best is not None and bounds[cfg] >= best.step_time_s:
            pruned_bound += 1
            continue
        screened_out = screened_out or len(evaluated) >= max_evaluations or (
            len(evaluated) >= min_evaluations
            and screens[cfg] > (1 + screen_slack) * best_screen)
        if screened_out and cfg.schedule in tried:
            pruned_screen += 1
            continue
        # past the screen, each schedule's best-screened candidate is still costed: the
        # screen's error differs by schedule (memory in flight, bubble shape), so one
        # schedule's optimism must not crowd another out of the simulated ones
        tried.add(cfg.schedule)
        try:
            result = evaluator.evaluate(cfg)
        except InfeasibleError as error:
            failures.append((0, cfg, str(error)))
            continue
        evaluated.append(result)
        if best is None or (result.step_time_s, config_key(result.config)) < (
                best.step_time_s, config_key(best.config)):
            best, best_screen = result, screens[cfg]
    if best is None:
        over, cfg, why = min(failures, key=lambda f: (f[0], config_key(f[1])))
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
                        pruned_screen, elapsed, screened + evaluator.work,
                        evaluator.partition_work)
    plan = assemble_plan(graph, cluster, evaluator.dtype, best, evaluated, failures, stats,
                         seq_len=seq_len or graph.seq_len, spec=model_spec,
                         alternatives=alternatives,
                         partition_seconds=evaluator.partition_seconds)
    return plan, stats


def partition_problem(graph: ProxyGraph, cluster: Cluster, config: ParallelConfig, *,
                      dtype: str | None = None,
                      tp_regions: Sequence[str] | None = None) -> PartitionProblem:
    """The stage-partition problem the search solves for ``config`` (for ``--dump-lp``).

    >>> cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=4)
    >>> partition_problem(example_graph(layers=4), Cluster.builtin("a100-80g"), cfg).in_flight
    (2, 1)
    """
    parts = search_parts(graph, cluster, config.global_batch_size, Pins(), dtype, 16)
    shard = (frozenset(tp_regions) if tp_regions is not None else
             parts.regions.all_regions(config.tp))
    return parts.evaluator.partition_problem(config, [0] * config.pp, shard)


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
    parts = search_parts(graph, cluster, config.global_batch_size, Pins(), dtype, 16)
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
                 else parts.regions.all_regions(config.tp))
    got = parts.evaluator.simulate_split(config, shard, "given regions", split)
    assert got is not None, "no cutoff: always simulated"
    return got


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
