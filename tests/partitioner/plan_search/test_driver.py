"""The search loop: against full enumeration, pins kept, screening, determinism, work."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from example_graphs import example_graph
from search_clusters import small_cluster

from tripar.commands._model_args import proxy_graph_for
from tripar.errors import InfeasibleError
from tripar.partitioner.cost import step_estimate
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.plan_search import (
    Evaluator,
    Pins,
    search,
    search_parts,
    search_with_stats,
)

GB = 10**9


def test_tight_memory_recomputes_or_splits():
    graph = example_graph(layers=12, hidden=1024, seq=512, vocab=8000, heads=8)
    roomy = search(graph, small_cluster(80), 16)
    tight = search(graph, small_cluster(0.8), 16)
    assert tight.estimate.step_time_s >= roomy.estimate.step_time_s
    assert tight.estimate.peak_memory_bytes <= 0.8 * GB
    # the tight device forces pipeline stages, and the first stage (most microbatches in
    # flight) recomputes part of its blocks while the last recomputes nothing
    pp1 = search(graph, small_cluster(80), 16, pins=Pins(pp=1))
    assert roomy.estimate.step_time_s <= pp1.estimate.step_time_s and tight.parallel.pp > 1
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


def test_status_is_optimal_only_without_screening():
    graph = example_graph(layers=6, hidden=1024, seq=512, vocab=8000, heads=8)
    screened, stats = search_with_stats(graph, small_cluster(80), 16)
    exhaustive, full = search_with_stats(graph, small_cluster(80), 16, screen_slack=math.inf,
                                         max_evaluations=10**6)
    assert stats.pruned_by_screen > 0 and screened.solvers[0].status == "screened"
    assert full.pruned_by_screen == 0 and exhaustive.solvers[0].status == "optimal"
    assert exhaustive.estimate.step_time_s <= screened.estimate.step_time_s


ZOO = ("gpt:layers=4,hidden=256,heads=4,vocab=1000,seq=128",
       "llama:layers=4,hidden=256,heads=4,kv_heads=2,vocab=1000,seq=128,ffn=512",
       "gpt:layers=12,hidden=256,heads=8,vocab=1000,seq=128")



@pytest.mark.parametrize("spec,nodes,gpus,memory_gb", [
    (ZOO[0], 2, 4, 80), (ZOO[1], 1, 8, 0.05), (ZOO[2], 2, 8, 0.08)])
def test_plan_is_within_one_percent_of_every_configuration(spec, nodes, gpus, memory_gb):
    """Every dp*tp*pp, vpp, micro-batch size and count, schedule, ZeRO and recompute
    policy (none, full, stage-aware) the search considers, each costed exactly."""
    graph = proxy_graph_for(spec, batch_size=1)
    cluster = small_cluster(memory_gb, nodes=nodes, gpus=gpus)
    plan = search(graph, cluster, 16)
    best = math.inf
    for recompute in ("none", "full", "stage-aware"):
        parts = search_parts(graph, cluster, 16, Pins(recompute=recompute), None, 16)
        for cfg in parts.space.configs():
            try:
                best = min(best, parts.evaluator.evaluate(cfg).step_time_s)
            except InfeasibleError:
                pass
    assert math.isfinite(best)
    assert plan.estimate.step_time_s <= best * 1.01
    assert plan.estimate.peak_memory_bytes <= cluster.device.memory_bytes
    assert all(st.memory_bytes <= cluster.device.memory_bytes for st in plan.stages)


def test_search_work_grows_linearly_with_identical_layers():
    """Counted work (partition cells and evaluations, simulated actions, screened
    candidates) for L and 2L identical layers, the other choices pinned."""
    cluster = Cluster.builtin("a100-80g", nodes=8, gpus_per_node=8)
    pins = Pins(tp=2, pp=4, vpp=2, micro_batch_size=1)
    work = {}
    for layers in (48, 96):
        graph = example_graph(layers=layers, hidden=2048, seq=1024, vocab=32000, heads=16)
        _plan, stats = search_with_stats(graph, cluster, 256, pins=pins)
        work[layers] = (stats.work, stats.partition_work)
    assert work[96][0] / work[48][0] < 2.5, work
    assert work[96][1] / work[48][1] < 2.5, work


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


def test_the_search_chooses_chimera_where_it_wins():
    """At pp=4 with few microbatches the bubble dominates: Chimera's two pipelines halve it
    (at the cost of two stages' weights per rank and a gradient sum between the two
    holders of each stage), and the search takes it over every one-pipeline schedule."""
    graph = example_graph(layers=8, hidden=512, seq=1024)
    cluster = Cluster.builtin("a100-80g", gpus_per_node=4)
    plan = search(graph, cluster, 8, pins=Pins(pp=4, dp=1, tp=1))
    par = plan.parallel
    assert par.schedule == "chimera", plan.render()
    assert plan.to_schedule().pipelines == 2 and "pipelines=2" in plan.schedule_text()
    one = step_estimate(graph, cluster, replace(par, schedule="1f1b"))
    assert plan.estimate.step_time_s < one.step_time_s
    assert plan.estimate.bubble_fraction < one.bubble_fraction / 1.5
    # two stages' weights per rank: more memory than 1F1B on every rank
    assert min(plan.device_memory()) > max(one.rank_memory_bytes) / 2
    assert all(a.parallel.schedule != "chimera" or "bubble" in a.reason
               for a in plan.alternatives)


def test_each_schedule_gets_its_best_screened_candidate_costed(monkeypatch):
    """Past the screen's cut, a schedule none of whose candidates was costed still gets
    its best-screened one costed (unless its bound prunes it): one schedule's optimistic
    screen cannot crowd the others out of the simulated ones."""
    costed = []
    evaluate = Evaluator.evaluate

    def recording(self, cfg):
        costed.append(cfg.schedule)
        return evaluate(self, cfg)

    monkeypatch.setattr(Evaluator, "evaluate", recording)
    graph = example_graph(layers=8, hidden=512, seq=1024)
    cluster = Cluster.builtin("a100-80g", gpus_per_node=4)
    plan, stats = search_with_stats(graph, cluster, 8, pins=Pins(pp=4, dp=1, tp=1),
                                    min_evaluations=1, max_evaluations=1)
    assert len(costed) == len(set(costed)) == stats.evaluated > 1, costed
    assert plan.parallel.schedule == "chimera"   # what the full search chooses (above)
