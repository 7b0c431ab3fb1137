"""Pins that contradict each other, the cluster, the batch or the model; a model that
fits no configuration."""

from __future__ import annotations

import dataclasses

import pytest
from example_graphs import example_graph
from search_clusters import small_cluster

from tripar.errors import ConfigError, InfeasibleError
from tripar.partitioner.plan_search import Pins, Spelling, check_pins, search, search_with_stats


def test_contradicting_pins_and_infeasible_models():
    graph = example_graph(layers=4, hidden=512, seq=256, vocab=4000, heads=4)
    with pytest.raises(ConfigError, match="dp=3 does not divide the 8 devices"):
        search(graph, small_cluster(80), 16, pins=Pins(dp=3))
    with pytest.raises(ConfigError, match=r"tp=3 does not divide the model's attention heads "
                                          r"\(4\).*proven degrees: 2, 4"):
        search(graph, small_cluster(80), 16, pins=Pins(tp=3))
    with pytest.raises(ConfigError, match=r"global_batch_size=12 is not divisible by dp x "
                                          r"micro_batch_size = 2 x 4 = 8"):
        search(graph, small_cluster(80), 12, pins=Pins(dp=2, micro_batch_size=4))
    with pytest.raises(ConfigError, match="vpp=2 needs schedule interleaved-1f1b"):
        search(graph, small_cluster(80), 16, pins=Pins(vpp=2, schedule="1f1b"))
    with pytest.raises(InfeasibleError, match="no configuration of 8 devices fits") as info:
        search(graph, small_cluster(0.001), 16)
    message = str(info.value)
    assert "pipeline stage" in message and "bytes more than" in message and "fix:" in message


@pytest.mark.parametrize("pins, api, cli", [
    (Pins(dp=0), "dp must be a positive integer, got 0", "--dp must be a positive integer"),
    (Pins(micro_batch_size=3), "global_batch_size=16 is not divisible by micro_batch_size=3",
     "--global-batch 16 is not divisible by --micro-batch 3"),
    (Pins(schedule="scp", recompute="none"), "with recompute='none' use schedule='1f1b'",
     "with --recompute none use --schedule 1f1b"),
    (Pins(schedule="fastest"), "unknown schedule 'fastest' (schedule)",
     "unknown schedule 'fastest' (--schedule)"),
    (Pins(dp=2, tp=2, pp=1), "dp*tp*pp = 2*2*1 = 4, but there are 8 devices; choose degrees "
     "whose product is 8 (e.g. dp=4)", "(e.g. --dp 4)"),
    (Pins(pp=4, vpp=2), "pp*vpp = 8 stages (pp=4, vpp=2) for 6 blocks",
     "pp*vpp = 8 stages (--pp 4, --vpp 2) for 6 blocks"),
    (Pins(schedule="chimera", pp=1), "schedule='chimera' needs an even pp, but pp=1: rank r "
     "holds stage r of the down pipeline and stage pp-1-r of the up pipeline; pin an even pp "
     "(2, 4, 8 divide the 8 devices)", "--schedule chimera needs an even pp, but --pp 1"),
    (Pins(schedule="chimera", pp=2, num_microbatches=3),
     "schedule='chimera' needs an even number of microbatches, but num_microbatches=3: each "
     "of its two pipelines takes half; use num_microbatches=2 or num_microbatches=4",
     "--schedule chimera needs an even number of microbatches, but --microbatches 3"),
    (Pins(zero=3), "zero must be one of 0, 1, 2 (the ZeRO stage), got 3",
     "--zero must be one of 0, 1, 2 (the ZeRO stage), got 3"),
    (Pins(micro_batch_size=2, num_microbatches=2, dp=2),
     "micro_batch_size x num_microbatches = 2 x 2 = 4 samples",
     "--micro-batch x --microbatches = 2 x 2 = 4 samples"),
])
def test_one_check_names_pins_in_the_callers_language(pins, api, cli):
    graph = example_graph(layers=4, hidden=512, seq=256, vocab=4000, heads=4)
    for spelling, want in ((Spelling.API, api), (Spelling.CLI, cli)):
        with pytest.raises(ConfigError) as info:
            check_pins(pins, 8, 16, graph=graph, spelling=spelling)
        assert want in str(info.value), (spelling, str(info.value))
    assert Pins(vpp=2).implied().schedule == "interleaved-1f1b"
    with pytest.raises(ConfigError, match=r"--schedule chimera needs an even pp, but --pp 3: "
                                          r"rank r holds stage r of the down pipeline.*pin an "
                                          r"even --pp \(2, 4, 6, 12 divide the 12 devices\)"):
        check_pins(Pins(schedule="chimera", pp=3), 12, 24, spelling=Spelling.CLI)
    assert Pins(zero=True).implied().zero == 1


def _with_sequence(graph, share: float = 0.3):
    """``graph`` whose layers' token-wise parts save ``share`` of their bytes (what
    ``tripar.graph.sequence`` finds in a traced transformer)."""
    graph.blocks = [dataclasses.replace(b, sequence_saved_bytes=int(b.saved_bytes * share))
                    if b.kind == "layer" else b for b in graph.blocks]
    return graph


def test_sequence_parallel_pin_is_checked_and_planned():
    graph = _with_sequence(example_graph(layers=4, hidden=512, seq=256, vocab=4000, heads=4))
    with pytest.raises(ConfigError, match=r"sp=True \(sequence parallelism\).*tp=1; pin tp > 1"):
        check_pins(Pins(tp=1, sp=True), 8, 16)
    with pytest.raises(ConfigError, match=r"--sp \(sequence parallelism\).*--tp 1.*--no-sp"):
        check_pins(Pins(tp=1, sp=True), 8, 16, spelling=Spelling.CLI)
    odd = _with_sequence(example_graph(layers=4, hidden=512, seq=255, vocab=4000, heads=4))
    with pytest.raises(ConfigError, match=r"sequence of 255 tokens.*pinned: 2.*sp=False"):
        check_pins(Pins(tp=2, sp=True), 8, 16, graph=odd)
    with pytest.raises(ConfigError, match="no token-wise part"):
        check_pins(Pins(tp=2, sp=True), 8, 16,
                   graph=example_graph(layers=4, hidden=512, seq=256, vocab=4000, heads=4))
    plan = search(graph, small_cluster(80), 16, pins=Pins(tp=2, sp=True))
    assert plan.parallel.sp and plan.parallel.tp == 2
    assert type(plan).from_json(plan.to_json()) == plan and '"sp": true' in plan.to_json()
    assert "| sp" in plan.render()
    assert any(n.startswith("sequence parallelism on: ") and "saves" in n for n in plan.notes)
    # unpinned, the search weighs both (and never at tp=1, or where the sequence is odd)
    auto = search(graph, small_cluster(80), 16, pins=Pins(tp=2))
    sides = {a.parallel.sp for a in auto.alternatives} | {auto.parallel.sp}
    assert sides == {True, False}
    assert not search(odd, small_cluster(80), 16, pins=Pins(tp=2)).parallel.sp


def test_zero2_pin_is_planned_and_noted():
    graph = example_graph(layers=4, hidden=512, seq=256, vocab=4000, heads=4)
    plan = search(graph, small_cluster(80), 16, pins=Pins(dp=8, tp=1, pp=1, zero=2))
    assert plan.parallel.zero == 2 and "| ZeRO-2" in plan.render()
    assert type(plan).from_json(plan.to_json()) == plan
    note = next(n for n in plan.notes if n.startswith("ZeRO-2 "))
    assert "optimizer state and gradients sharded over 8 ranks" in note and "saves" in note
    # unpinned, the search weighs every stage where dp > 1
    auto = search(graph, small_cluster(80), 16, pins=Pins(dp=8, tp=1, pp=1), alternatives=8)
    assert {a.parallel.zero for a in auto.alternatives} | {auto.parallel.zero} == {0, 1, 2}


@pytest.mark.parametrize(("pins", "api", "cli"), [
    (Pins(tp=1, tp_overlap=2), "tp_overlap=2 overlaps tensor-parallel collectives with "
     "compute, but tp=1; pin tp > 1 or use tp_overlap=1", "--tp-overlap 2 overlaps "
     "tensor-parallel collectives with compute, but --tp 1; pin --tp > 1 or use "
     "--tp-overlap 1"),
    (Pins(tp=2, micro_batch_size=6, tp_overlap=4), "micro_batch_size=6 is not divisible by 4",
     "--micro-batch 6 is not divisible by 4; use a --tp-overlap that divides it"),
    (Pins(tp=2, micro_batch_size=1, tp_overlap=2, sp=True),
     "tp_overlap=2 with micro_batch_size=1 splits the sequence, which sp=True already shards",
     "--tp-overlap 2 with --micro-batch 1 splits the sequence, which --sp already shards"),
    (Pins(tp=2, tp_overlap=0), "tp_overlap must be a positive integer",
     "--tp-overlap must be a positive integer"),
])
def test_tp_overlap_pin_errors_name_it_in_the_callers_language(pins, api, cli):
    for spelling, want in ((Spelling.API, api), (Spelling.CLI, cli)):
        with pytest.raises(ConfigError) as info:
            check_pins(pins, 8, 48, spelling=spelling)
        assert want in str(info.value), (spelling, str(info.value))


def test_tp_overlap_pin_is_planned_and_weighed_where_collectives_are_slow():
    graph = example_graph(layers=4, hidden=1024, seq=512, vocab=4000, heads=8)
    cluster = small_cluster(80, nodes=1)
    plan = search(graph, cluster, 16, pins=Pins(tp=2, micro_batch_size=4, tp_overlap=2))
    assert (plan.parallel.tp, plan.parallel.tp_overlap) == (2, 2)
    assert "tp-overlap 2" in plan.render()
    slow = dataclasses.replace(cluster, intra_bandwidth=cluster.intra_bandwidth / 5)
    two = search(graph, slow, 16, pins=Pins(tp=4, micro_batch_size=4, tp_overlap=2))
    ones = search(graph, slow, 16, pins=Pins(tp=4, micro_batch_size=4, tp_overlap=1))
    assert two.estimate.step_time_s < ones.estimate.step_time_s
    # explain says what the parts hide
    (note,) = [n for n in two.notes if n.startswith("sub-pipelined tensor parallelism:")]
    assert "as 2 parts" in note and "exposed per microbatch" in note and "with one part" in note
    # unpinned, the search takes the parts where they pay
    chosen = search(graph, slow, 16, pins=Pins(tp=4, micro_batch_size=4))
    assert chosen.parallel.tp_overlap > 1
    assert chosen.estimate.step_time_s <= two.estimate.step_time_s
    # but not for a graph torch.export captured: its views hold the microbatch's size
    exported = dataclasses.replace(graph, tracer="export")
    assert search(exported, slow, 16,
                  pins=Pins(tp=4, micro_batch_size=4)).parallel.tp_overlap == 1
    # or when the caller says so
    kept, _ = search_with_stats(graph, slow, 16, pins=Pins(tp=4, micro_batch_size=4),
                                choose_overlap=False)
    assert kept.parallel.tp_overlap == 1
    # never at tp=1: the search lists no part count there
    assert search(graph, cluster, 16, pins=Pins(tp=1)).parallel.tp_overlap == 1


def test_tp_overlap_at_one_sample_splits_the_sequence_without_sp():
    graph = example_graph(layers=4, hidden=1024, seq=512, vocab=4000, heads=8)
    slow = dataclasses.replace(small_cluster(80, nodes=1),
                               intra_bandwidth=small_cluster(80, nodes=1).intra_bandwidth / 5)
    plan = search(graph, slow, 16, pins=Pins(tp=4, micro_batch_size=1, tp_overlap=2))
    par = plan.parallel
    assert (par.tp, par.micro_batch_size, par.tp_overlap, par.sp) == (4, 1, 2, False)
    assert plan.validate() is plan
    # a length the parts do not divide: no configuration at that pin
    odd = dataclasses.replace(graph, seq_len=511)
    with pytest.raises(InfeasibleError, match=r"tp_overlap must divide .* the sequence of 511"):
        search(odd, slow, 16, pins=Pins(tp=4, micro_batch_size=1, tp_overlap=2))
