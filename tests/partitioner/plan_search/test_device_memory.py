"""Interleaved stages share their device: the search's budget is the device's at the rank's
peak, not ``1 / vpp`` of it per virtual stage."""

from __future__ import annotations

import dataclasses

import pytest
from example_graphs import example_graph
from search_clusters import small_cluster

from tripar.errors import InfeasibleError
from tripar.partitioner.partition import solve_partition_dp
from tripar.partitioner.plan_search import Pins, partition_problem, search, search_parts
from tripar.plan import ParallelConfig


def _head_heavy():
    """12 layers of hidden 1024 and a 64000-word vocabulary: the embedding and the head
    each hold more weights and activations than two layers."""
    return example_graph(layers=12, hidden=1024, seq=1024, vocab=64000)


def test_heavy_head_no_longer_rules_out_deep_interleaving():
    """On two 3 GB devices the search interleaves three virtual stages per rank. With each
    virtual stage held to a third of the device, no split fits: the stage holding the
    vocabulary head needs more, while the device's total fits."""
    graph, cluster = _head_heavy(), small_cluster(3.0, nodes=1, gpus=2)
    plan = search(graph, cluster, 2, pins=Pins(pp=2, dp=1, tp=1))
    par = plan.parallel
    assert par.schedule == "interleaved-1f1b" and par.vpp >= 3, par
    limit = cluster.device.memory_bytes
    problem = partition_problem(graph, cluster, dataclasses.replace(par, recompute="stage-aware"),
                                tp_regions=())
    even = dataclasses.replace(problem, memory_limit_bytes=[limit // par.vpp] * (2 * par.vpp))
    with pytest.raises(InfeasibleError, match="needs at least"):
        solve_partition_dp(even)
    assert max(plan.device_memory()) <= limit


@pytest.mark.parametrize("vpp", [2, 3, 4, 5, 6])
def test_partition_within_device_budget_fits_the_simulated_device(vpp):
    """A device tight enough that every rank recomputes: the partition under the shared
    device budget fits the simulated peak of each device at the first try (no margin
    learnt from a simulation), for vpp values in and outside the old (2, 3, 4, 6, 8)."""
    graph, cluster = _head_heavy(), small_cluster(2.7, nodes=1, gpus=2)
    cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=8, vpp=vpp,
                         schedule="interleaved-1f1b", recompute="stage-aware")
    evaluator = search_parts(graph, cluster, 8, Pins(), None, 16).evaluator
    got = evaluator.simulate_split(cfg, frozenset(), "", attempts=1)
    assert got is not None
    assert max(got.rank_memory_bytes) <= cluster.device.memory_bytes
    assert any(got.recompute), "the budget binds: some stage recomputes"
    # the virtual stages' own peaks add up to more than the device's: they peak apart
    assert sum(got.stage_memory_bytes[::2]) > got.rank_memory_bytes[0]
