"""One configuration costed: the plan's split against the uniform split and the partition
DP's own, each simulated."""

from __future__ import annotations

import dataclasses

import pytest
from example_graphs import example_graph
from search_clusters import small_cluster

from tripar.commands._model_args import proxy_graph_for
from tripar.partitioner.cost.stages import uniform_boundaries
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.megatron import MEGATRON_TABLE
from tripar.partitioner.partition.dp import solve_partition_dp
from tripar.partitioner.plan_search import (
    Pins,
    evaluate_split,
    partition_problem,
    search,
    uniform_split_of,
)


def _dp_split(graph, cluster, cfg, regions=None):
    """The partition DP's split of ``cfg`` as the search poses it (first try, no margin)."""
    return solve_partition_dp(partition_problem(graph, cluster, cfg,
                                                tp_regions=regions)).boundaries


@pytest.mark.parametrize("layers,hidden,vocab,memory_gb,batch", [
    (6, 1024, 8000, 80, 16), (8, 512, 32000, 80, 32), (12, 1024, 8000, 0.8, 16),
    (5, 768, 50000, 2.0, 8)])
def test_plan_is_no_slower_than_the_uniform_split_of_its_configuration(
        layers, hidden, vocab, memory_gb, batch):
    """The plan's simulated step against its configuration (and regions) on the uniform
    split by layers, costed the same way; and against the partition DP's split."""
    graph = example_graph(layers=layers, hidden=hidden, seq=512, vocab=vocab, heads=8)
    cluster = small_cluster(memory_gb)
    plans = [search(graph, cluster, batch), search(graph, cluster, batch, pins=Pins(pp=2)),
             search(graph, cluster, batch, pins=Pins(pp=4, schedule="zb-h1"))]
    for plan in plans:
        uniform = uniform_split_of(plan, graph, cluster)
        assert plan.estimate.step_time_s <= uniform.step_time_s
        assert uniform.peak_memory_bytes <= cluster.device.memory_bytes
        note = next(n for n in plan.notes if n.startswith("stage split: "))
        bounds = tuple(plan.model.blocks.index(st.blocks[0]) for st in plan.stages)
        if bounds == uniform.boundaries:
            assert "uniform split" in note
            assert plan.estimate.step_time_s == uniform.step_time_s
        else:
            assert note.startswith("stage split: the partition DP's split")
            assert plan.solvers[1].solver == "dp"
        cfg = plan.parallel
        if cfg.recompute == "none":
            cfg = dataclasses.replace(cfg, recompute="stage-aware")
        regions = [r.name for r in plan.tp_regions]
        dp = evaluate_split(graph, cluster, cfg,
                            _dp_split(graph, cluster, cfg, regions if cfg.tp > 1 else None),
                            tp_regions=regions)
        assert plan.estimate.step_time_s <= dp.step_time_s


def test_uniform_split_is_kept_when_it_simulates_faster():
    """Six layers on four stages with one microbatch per step... the DP's proxy (sum t/v
    + (m v - 1) max t) sees only sums and cuts there; the simulator plays the schedule.
    The search keeps the uniform split, says so, and beats the DP's own split."""
    graph = example_graph(layers=6, hidden=1024, seq=512, vocab=8000, heads=8)
    cluster = small_cluster(80)
    pins = Pins(dp=2, tp=1, pp=4, micro_batch_size=2, schedule="1f1b", zero=0)
    plan = search(graph, cluster, 16, pins=pins)
    bounds = tuple(plan.model.blocks.index(st.blocks[0]) for st in plan.stages)
    assert bounds == uniform_boundaries(graph, 4) == (0, 3, 5, 6)
    assert plan.solvers[1].solver == "uniform split"
    assert any(n.startswith("stage split: the uniform split by layers") for n in plan.notes)
    cfg = dataclasses.replace(plan.parallel, recompute="stage-aware")
    dp_bounds = _dp_split(graph, cluster, cfg)
    assert dp_bounds != bounds
    dp = evaluate_split(graph, cluster, cfg, dp_bounds)
    assert dp.split == "given" and plan.estimate.step_time_s < dp.step_time_s


def test_megatron_row_plan_is_no_slower_than_its_uniform_split():
    """Row 5 of Megatron-LM's table (39.1B on 512 A100s; row 10, 1T, whose search takes
    longer than these tests may, runs the same check in benchmarks/megatron_plans.py)."""
    _, heads, hidden, layers, _t, _p, gpus, batch, _ = MEGATRON_TABLE[4]
    graph = proxy_graph_for(f"gpt:layers={layers},hidden={hidden},heads={heads},"
                            f"vocab=51200,seq=2048", batch_size=1, seq_len=2048)
    cluster = Cluster.builtin("a100-80g", nodes=gpus // 8, gpus_per_node=8)
    # without sequence parallelism or ZeRO-2 (either lets this model fit one pipeline stage)
    plan = search(graph, cluster, batch, pins=Pins(sp=False, zero=1))
    assert plan.parallel.pp > 1
    uniform = uniform_split_of(plan, graph, cluster)
    assert plan.estimate.step_time_s <= uniform.step_time_s
