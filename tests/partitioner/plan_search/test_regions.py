"""The tensor-parallel regions the search shards: the ILP's trade, tied weights, t5's two
attentions."""

from __future__ import annotations

import dataclasses

from example_graphs import example_graph
from search_clusters import small_cluster

from tripar.commands._model_args import proxy_graph_for
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.plan_search import Pins, search, search_parts

GB = 10**9


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
    roomy_note, tight_note = (next(n for n in plan.notes if "regions proven at tp" in n)
                              for plan in (roomy, tight))
    assert "replicated: blocks.0:attention:0" in roomy_note
    assert "HiGHS" in tight_note or "CBC" in tight_note


def test_tied_embedding_and_head_are_sharded_together():
    # A tied weight sharded for the LM head but not for the embedding cannot be built:
    # the two regions share one decision.
    graph = proxy_graph_for("gpt:layers=2,hidden=256,heads=4,vocab=512,seq=64",
                            batch_size=1, seq_len=64, tp_degrees=(2,))
    cluster = Cluster.builtin("cpu", nodes=1, gpus_per_node=4)
    groups = [names for _, names in search_parts(graph, cluster, 8, Pins(tp=2, pp=2), None,
                                                 16).regions.groups(2)]
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
    groups = dict(search_parts(graph, Cluster.builtin("cpu", gpus_per_node=2), 8, Pins(tp=2),
                               None, 16).regions.groups(2))
    assert groups["decoder.layers.0:attention:0 (+1 alike)"] == (
        "decoder.layers.0:attention:0", "decoder.layers.1:attention:0")
    assert groups["decoder.layers.0:attention:1 (+1 alike)"] == (
        "decoder.layers.0:attention:1", "decoder.layers.1:attention:1")
