"""Each Megatron-LM table row (shared/REFERENCE.md): the plan's simulated step is no longer
than the published configuration's, simulated with the same cost model on the same graph.
Rows 8 to 10 are in benchmarks/megatron_plans.py: with their graphs (5-10 s each) and row
10's search (17 s) they would take the planner's tests past their time budget."""

from __future__ import annotations

import pytest

from tripar.commands._model_args import proxy_graph_for
from tripar.partitioner.cost.step import step_estimate
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.megatron import MEGATRON_TABLE, MEGATRON_WEIGHTS
from tripar.partitioner.plan_search import search
from tripar.plan.config import ParallelConfig


@pytest.mark.parametrize("row", MEGATRON_TABLE[:7], ids=[f"row{i}" for i in range(1, 8)])
def test_plan_is_no_slower_than_the_published_configuration(row):
    _, heads, hidden, layers, t, p, gpus, batch, _ = row
    graph = proxy_graph_for(f"gpt:layers={layers},hidden={hidden},heads={heads},"
                            f"vocab=51200,seq=2048", batch_size=1, seq_len=2048,
                            weights_dtype=MEGATRON_WEIGHTS)
    cluster = Cluster.builtin("a100-80g", nodes=gpus // 8, gpus_per_node=8)
    d = gpus // (t * p)
    published = step_estimate(graph, cluster, ParallelConfig(
        dp=d, tp=t, pp=p, micro_batch_size=1, num_microbatches=batch // d, schedule="1f1b",
        recompute="full"), record_timeline=False)
    plan = search(graph, cluster, batch)
    assert plan.parallel.devices == gpus and plan.parallel.global_batch_size == batch
    assert plan.estimate.step_time_s <= published.step_time_s
    assert plan.estimate.peak_memory_bytes <= cluster.device.memory_bytes
