"""One simulated step of a given configuration: recompute policies, schedules."""

from __future__ import annotations

import dataclasses

import pytest
from example_graphs import example_graph

from tripar.partitioner.cost.step import step_estimate
from tripar.partitioner.hardware import Cluster
from tripar.plan.config import ParallelConfig


def cfg(**kw) -> ParallelConfig:
    base = dict(dp=1, tp=1, pp=1, micro_batch_size=1, num_microbatches=4)
    base.update(kw)
    return ParallelConfig(**base)


def _small_memory(cluster: Cluster, gib: float) -> Cluster:
    device = dataclasses.replace(cluster.device, memory_bytes=int(gib * 2**30))
    return dataclasses.replace(cluster, device=device)


def test_step_estimate_recompute_policies():
    graph = example_graph(layers=8, hidden=1024, seq=1024, heads=16)
    config = cfg(pp=4, num_microbatches=8)
    cluster = Cluster.builtin("a100-80g", nodes=1, gpus_per_node=4)
    none = step_estimate(graph, cluster, config, recompute="none")
    full = step_estimate(graph, cluster, config, recompute="full")
    assert full.step_time_s > none.step_time_s
    assert full.peak_memory_bytes < none.peak_memory_bytes
    assert full.recompute == (1.0,) * 4 and none.recompute == (0.0,) * 4
    # 1F1B holds min(p - i, m) microbatches on stage i.
    assert none.sim.stage_peak_inflight == (4, 3, 2, 1)
    assert none.tokens_per_s == pytest.approx(8 * 1024 / none.step_time_s)
    # Memory between the two: stage-aware recomputes more on early stages, none on the last.
    budget = (none.peak_memory_bytes + full.peak_memory_bytes) / 2
    tight = step_estimate(graph, _small_memory(cluster, budget / 2**30), config,
                          recompute="stage-aware")
    assert tight.fits
    r = tight.recompute
    assert r[0] > 0 and r[-1] == 0.0 and list(r) == sorted(r, reverse=True)
    assert none.step_time_s < tight.step_time_s < full.step_time_s


def test_step_estimate_interleaved_and_zero_bubble():
    graph = example_graph(layers=8, hidden=512, seq=512)
    cluster = Cluster.builtin("a100-80g", nodes=1, gpus_per_node=4)
    plain = step_estimate(graph, cluster, cfg(pp=4, num_microbatches=8))
    inter = step_estimate(graph, cluster, cfg(pp=4, num_microbatches=8, vpp=2,
                                              schedule="interleaved-1f1b"))
    zb = step_estimate(graph, cluster, cfg(pp=4, num_microbatches=8, schedule="zb-h1"))
    assert len(inter.stage_costs) == 8 and len(inter.rank_memory_bytes) == 4
    assert inter.bubble_fraction < plain.bubble_fraction
    assert zb.step_time_s < plain.step_time_s
