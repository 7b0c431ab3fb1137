"""The outer search: against full enumeration, pins, infeasibility, determinism."""

from __future__ import annotations

import dataclasses

import pytest

from tripar.errors import ConfigError, InfeasibleError
from tripar.partitioner.cost_model import example_graph
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.search import Pins, _Search, search

GB = 10**9


def small_cluster(memory_gb: float, nodes: int = 2, gpus: int = 4) -> Cluster:
    cluster = Cluster.builtin("a100-80g", nodes=nodes, gpus_per_node=gpus)
    device = dataclasses.replace(cluster.device, memory_bytes=int(memory_gb * GB))
    return dataclasses.replace(cluster, device=device)


def enumerate_all(graph, cluster, batch) -> float:
    """Best simulated step time over every configuration (no bounds, no screening)."""
    state = _Search(graph, cluster, batch, Pins(), None, 16)
    best = float("inf")
    for cfg in state.configs():
        try:
            best = min(best, state.evaluate(cfg).step_time_s)
        except InfeasibleError:
            pass
    return best


@pytest.mark.parametrize("memory_gb,layers", [(80, 6), (0.8, 12)])
def test_plan_is_within_one_percent_of_full_enumeration(memory_gb, layers):
    graph = example_graph(layers=layers, hidden=1024, seq=512, vocab=8000, heads=8)
    cluster = small_cluster(memory_gb)
    plan = search(graph, cluster, 16)
    want = enumerate_all(graph, cluster, 16)
    assert plan.estimate.step_time_s <= want * 1.01
    plan.validate()
    assert plan.estimate.peak_memory_bytes <= cluster.device.memory_bytes
    assert all(st.memory_bytes <= cluster.device.memory_bytes for st in plan.stages)


def test_tight_memory_recomputes_or_splits():
    graph = example_graph(layers=12, hidden=1024, seq=512, vocab=8000, heads=8)
    roomy = search(graph, small_cluster(80), 16)
    tight = search(graph, small_cluster(0.8), 16)
    assert tight.estimate.step_time_s >= roomy.estimate.step_time_s
    assert tight.estimate.peak_memory_bytes <= 0.8 * GB
    # the tight device forces pipeline stages, and the first stage (most microbatches in
    # flight) recomputes part of its blocks while the last recomputes nothing
    assert roomy.parallel.pp == 1 and tight.parallel.pp > 1
    assert 0 < len(tight.stages[0].recompute) < len(tight.stages[0].blocks)
    assert tight.stages[-1].recompute == ()
    assert tight.parallel.recompute == "stage-aware"


def test_pins_are_kept():
    graph = example_graph(layers=8, hidden=1024, seq=512, vocab=8000, heads=8)
    plan = search(graph, small_cluster(80), 16,
                  pins=Pins(tp=2, pp=2, schedule="1f1b", zero=0, micro_batch_size=2))
    par = plan.parallel
    assert (par.tp, par.pp, par.dp, par.schedule, par.zero, par.micro_batch_size) == \
        (2, 2, 2, "1f1b", 0, 2)
    assert par.num_microbatches == 4 and len(plan.tp_regions) > 0
    inter = search(graph, small_cluster(80), 16, pins=Pins(pp=2, vpp=2))
    assert inter.parallel.schedule == "interleaved-1f1b" and len(inter.stages) == 4


def test_contradicting_pins_and_infeasible_models():
    graph = example_graph(layers=4, hidden=512, seq=256, vocab=4000, heads=8)
    with pytest.raises(InfeasibleError, match="no configuration matches 8 devices.*dp=3"):
        search(graph, small_cluster(80), 16, pins=Pins(dp=3))
    with pytest.raises(ConfigError, match="vpp=2 needs schedule interleaved-1f1b"):
        Pins(vpp=2, schedule="1f1b")
    with pytest.raises(InfeasibleError, match="no configuration of 8 devices fits") as info:
        search(graph, small_cluster(0.001), 16)
    assert "GB" in str(info.value) and "ZeRO-1" in str(info.value)


def test_search_is_deterministic_and_reports_runners_up():
    graph = example_graph(layers=8, hidden=1024, seq=512, vocab=8000, heads=8)
    a = search(graph, small_cluster(80), 32)
    b = search(graph, small_cluster(80), 32)
    assert a.parallel == b.parallel and a.stages == b.stages and a.estimate == b.estimate
    assert a.alternatives and all(alt.parallel != a.parallel for alt in a.alternatives)
    costed = [alt for alt in a.alternatives if alt.estimate is not None]
    assert all(alt.estimate.step_time_s >= a.estimate.step_time_s for alt in costed)
    assert all(alt.reason for alt in a.alternatives)
    assert [r.problem for r in a.solvers] == ["search", "partition"]
    assert a.schedule and len(a.schedule) == a.parallel.pp
