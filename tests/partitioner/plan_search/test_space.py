"""The candidates' estimates: the tail bound, the screen, and the lower bound that never
exceeds a simulated step."""

from __future__ import annotations

import dataclasses

import pytest
from example_graphs import example_graph
from search_clusters import small_cluster

from tripar.commands._model_args import proxy_graph_for
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


def test_screen_errs_alike_across_schedules_and_sequence_parallelism():
    """The screen only orders candidates, so its error must not depend on what it orders
    by. It once took every configuration's costs at the least over sequence parallelism
    on and off (both screened alike, though sp off does more work and keeps more bytes)
    and charged ZB-H1 the bubble (p - 1)(F + B) instead of (p - 1)(F + B - W): at GPT-3
    175B on 64 A100s that ordered twelve interleaved candidates ahead of the best plan
    (zb-h1, 53.9% MFU) and the search kept one at 51.8%. Here (6 blocks on 4 stages) it
    was 0.929-0.991 of the simulated step; now each is within 1% of the others, in the
    simulator's order."""
    graph = proxy_graph_for("gpt:layers=4,hidden=512,heads=8,seq=256,vocab=4096",
                            batch_size=1, tp_degrees=(2,))
    parts = search_parts(graph, small_cluster(80, nodes=2, gpus=4), 64, Pins(), None, 16)
    cfgs = [ParallelConfig(dp=1, tp=2, pp=4, micro_batch_size=8, num_microbatches=8,
                           schedule=schedule, sp=sp)
            for schedule in ("1f1b", "zb-h1") for sp in (False, True)]
    screens = [parts.space.screen(c) for c in cfgs]
    steps = [parts.evaluator.evaluate(c).step_time_s for c in cfgs]
    ratios = [s / t for s, t in zip(screens, steps)]
    assert max(ratios) < 1.01 * min(ratios), ratios
    assert sorted(range(4), key=screens.__getitem__) == sorted(range(4), key=steps.__getitem__)
