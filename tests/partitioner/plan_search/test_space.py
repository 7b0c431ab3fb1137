"""The candidates' estimates: the tail bound, the screen, and the lower bound that never
exceeds a simulated step."""

from __future__ import annotations

import dataclasses

import pytest
from example_graphs import example_graph
from search_clusters import small_cluster

from tripar.errors import InfeasibleError
from tripar.partitioner.plan_search import Pins, search_parts
from tripar.plan.config import ParallelConfig


def test_optimizer_step_costs_the_clusters_optimizer_bytes():
    """The search's tail bound, screen and region choice charge the optimizer step at the
    cluster's Efficiency.optimizer_bytes, as the cost model does; the bound stays a bound."""
    graph = example_graph(layers=4, hidden=1024, seq=512, vocab=8000, heads=8)
    base = small_cluster(80, nodes=1)
    eff = dataclasses.replace(base.device.efficiency,
                              optimizer_bytes=10 * base.device.efficiency.optimizer_bytes)
    slow = dataclasses.replace(base, device=dataclasses.replace(base.device, efficiency=eff))
    cfg = ParallelConfig(dp=1, tp=1, pp=4, micro_batch_size=1, num_microbatches=16)
    states = [search_parts(graph, c, 16, Pins(), None, 16) for c in (base, slow)]
    tails = [s.space.tail_bound(cfg) for s in states]
    assert tails[1] == pytest.approx(10 * tails[0])
    assert states[1].space.screen(cfg) > states[0].space.screen(cfg)
    state = states[1]
    for c in state.space.configs():
        try:
            got = state.evaluator.evaluate(c)
        except InfeasibleError:
            continue
        assert state.space.lower_bound(c) <= got.step_time_s * (1 + 1e-9), c
