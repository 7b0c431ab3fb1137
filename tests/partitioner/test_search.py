"""The outer search: against full enumeration, pins, infeasibility, determinism."""

from __future__ import annotations

import dataclasses
import math

import pytest
from example_graphs import example_graph

from tripar.commands._model_args import proxy_graph_for
from tripar.errors import ConfigError, InfeasibleError
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.search import Pins, _Search, search, search_with_stats

GB = 10**9


def small_cluster(memory_gb: float, nodes: int = 2, gpus: int = 4) -> Cluster:
    cluster = Cluster.builtin("a100-80g", nodes=nodes, gpus_per_node=gpus)
    device = dataclasses.replace(cluster.device, memory_bytes=int(memory_gb * GB))
    return dataclasses.replace(cluster, device=device)


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


def test_contradicting_pins_and_infeasible_models():
    graph = example_graph(layers=4, hidden=512, seq=256, vocab=4000, heads=4)
    with pytest.raises(ConfigError, match="--dp 3 does not divide the 8 devices"):
        search(graph, small_cluster(80), 16, pins=Pins(dp=3))
    with pytest.raises(ConfigError, match="--tp 3.*4 attention heads.*proven degrees: 2, 4"):
        search(graph, small_cluster(80), 16, pins=Pins(tp=3))
    with pytest.raises(ConfigError, match=r"global batch 12 is not divisible by dp x "
                                          r"micro-batch = 2 x 4 = 8"):
        search(graph, small_cluster(80), 12, pins=Pins(dp=2, micro_batch_size=4))
    with pytest.raises(ConfigError, match="vpp=2 needs schedule interleaved-1f1b"):
        Pins(vpp=2, schedule="1f1b")
    with pytest.raises(InfeasibleError, match="no configuration of 8 devices fits") as info:
        search(graph, small_cluster(0.001), 16)
    message = str(info.value)
    assert "pipeline stage" in message and "bytes more than" in message and "fix:" in message


def test_tp_choice_trades_collectives_against_memory():
    """Slow links make attention's collectives cost more than its sharding saves, MLP's
    less: with memory to spare only the MLPs are sharded; on a tight device (no
    recomputation allowed) the ILP shards the attention regions too."""
    graph = example_graph(layers=8, hidden=1024, seq=512, vocab=8000, heads=8)

    def cluster(memory_gb):
        return dataclasses.replace(small_cluster(memory_gb, nodes=1), intra_bandwidth=5e10)

    pins = Pins(tp=2, recompute="none")
    roomy = search(graph, cluster(80), 16, pins=pins)
    tight = search(graph, cluster(1.0), 16, pins=pins)
    proven = len(graph.tp_regions)
    assert {r.kind for r in roomy.tp_regions} == {"mlp"} and len(roomy.tp_regions) == proven // 2
    assert len(tight.tp_regions) == proven
    assert tight.estimate.peak_memory_bytes <= 1.0 * GB
    assert "replicated: blocks.0:attention:0" in roomy.notes[-1]
    assert "HiGHS" in tight.notes[-1] or "CBC" in tight.notes[-1]


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
        state = _Search(graph, cluster, 16, Pins(recompute=recompute), None, 16)
        for cfg in state.configs():
            try:
                best = min(best, state.evaluate(cfg).step_time_s)
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


def test_tied_embedding_and_head_are_sharded_together():
    # A tied weight sharded for the LM head but not for the embedding cannot be built:
    # the two regions share one decision.
    from tripar.commands._model_args import proxy_graph_for
    from tripar.partitioner.hardware import Cluster
    from tripar.partitioner.search import Pins, _Search

    graph = proxy_graph_for("gpt:layers=2,hidden=256,heads=4,vocab=512,seq=64",
                            batch_size=1, seq_len=64, tp_degrees=(2,))
    cluster = Cluster.builtin("cpu", nodes=1, gpus_per_node=4)
    groups = [names for _, names in _Search(graph, cluster, 8, Pins(tp=2, pp=2), None,
                                            16).groups(2)]
    tied = [names for names in groups if any(n.endswith(":lm_head:0") for n in names)]
    assert len(tied) == 1 and any(n.endswith(":embedding:0") for n in tied[0]), groups


def test_t5_plan_at_tp2_names_self_and_cross_attention_apart(tmp_path, capsys):
    # `tripar plan t5 --tp 2`: a decoder layer's two attention regions are two regions
    import json

    from tripar.cli import main
    from tripar.plan.plan import Plan

    spec = "t5:layers=2,hidden=32,heads=4,vocab=64,seq=8"
    out = tmp_path / "t5.json"
    assert main(["plan", spec, "--tp", "2", "--gpus-per-node", "4", "--global-batch", "8",
                 "--format", "json", "--out", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    plan = Plan.load(out, validate=True)
    assert plan.to_dict() == data and Plan.from_json(plan.to_json()) == plan
    assert plan.parallel.tp == 2
    names = [r.name for r in plan.tp_regions]
    assert len(set(names)) == len(names)
    for layer in range(2):
        block = f"decoder.layers.{layer}"
        assert f"{block}:attention:0" in names and f"{block}:attention:1" in names
        shards = {r.index: {fqn for fqn, _ in r.shards} for r in plan.tp_regions
                  if r.block == block and r.kind == "attention"}
        assert shards == {i: {f"{block}.{part}.{w}.weight" for w in "qkvo"}
                          for i, part in enumerate(("self_attn", "cross_attn"))}
    assert [r["index"] for r in data["tp_regions"]] == [r.index for r in plan.tp_regions]
    # the search decides self- and cross-attention apart, identical layers together
    graph = proxy_graph_for(spec, batch_size=1, seq_len=8, tp_degrees=(2,))
    groups = dict(_Search(graph, Cluster.builtin("cpu", gpus_per_node=2), 8, Pins(tp=2),
                          None, 16).groups(2))
    assert groups["decoder.layers.0:attention:0 (+1 alike)"] == (
        "decoder.layers.0:attention:0", "decoder.layers.1:attention:0")
    assert groups["decoder.layers.0:attention:1 (+1 alike)"] == (
        "decoder.layers.0:attention:1", "decoder.layers.1:attention:1")


def _dp_split(graph, cluster, cfg, regions=None):
    """The partition DP's split of ``cfg`` as the search poses it (first try, no margin)."""
    from tripar.partitioner.partition import solve_partition_dp
    from tripar.partitioner.search import partition_problem

    return solve_partition_dp(partition_problem(graph, cluster, cfg,
                                                tp_regions=regions)).boundaries


@pytest.mark.parametrize("layers,hidden,vocab,memory_gb,batch", [
    (6, 1024, 8000, 80, 16), (8, 512, 32000, 80, 32), (12, 1024, 8000, 0.8, 16),
    (5, 768, 50000, 2.0, 8)])
def test_plan_is_no_slower_than_the_uniform_split_of_its_configuration(
        layers, hidden, vocab, memory_gb, batch):
    """The plan's simulated step against its configuration (and regions) on the uniform
    split by layers, costed the same way; and against the partition DP's split."""
    from tripar.partitioner.search import evaluate_split, uniform_split_of

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
    from tripar.partitioner.cost.stages import uniform_boundaries
    from tripar.partitioner.search import evaluate_split

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
    from tripar.partitioner.megatron import MEGATRON_TABLE
    from tripar.partitioner.search import uniform_split_of

    _, heads, hidden, layers, _t, _p, gpus, batch, _ = MEGATRON_TABLE[4]
    graph = proxy_graph_for(f"gpt:layers={layers},hidden={hidden},heads={heads},"
                            f"vocab=51200,seq=2048", batch_size=1, seq_len=2048)
    cluster = Cluster.builtin("a100-80g", nodes=gpus // 8, gpus_per_node=8)
    plan = search(graph, cluster, batch)
    assert plan.parallel.pp > 1
    uniform = uniform_split_of(plan, graph, cluster)
    assert plan.estimate.step_time_s <= uniform.step_time_s


def test_optimizer_step_costs_the_clusters_optimizer_bytes():
    """The search's tail bound, screen and region choice charge the optimizer step at the
    cluster's Efficiency.optimizer_bytes, as the cost model does; the bound stays a bound."""
    from tripar.plan.config import ParallelConfig

    graph = example_graph(layers=4, hidden=1024, seq=512, vocab=8000, heads=8)
    base = small_cluster(80, nodes=1)
    eff = dataclasses.replace(base.device.efficiency,
                              optimizer_bytes=10 * base.device.efficiency.optimizer_bytes)
    slow = dataclasses.replace(base, device=dataclasses.replace(base.device, efficiency=eff))
    cfg = ParallelConfig(dp=1, tp=1, pp=4, micro_batch_size=1, num_microbatches=16)
    states = [_Search(graph, c, 16, Pins(), None, 16) for c in (base, slow)]
    tails = [s.tail_bound(cfg) for s in states]
    assert tails[1] == pytest.approx(10 * tails[0])
    assert states[1].screen(cfg) > states[0].screen(cfg)
    state = states[1]
    for c in state.configs():
        try:
            got = state.evaluate(c)
        except InfeasibleError:
            continue
        assert state.lower_bound(c) <= got.step_time_s * (1 + 1e-9), c
