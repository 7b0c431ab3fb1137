"""Each Megatron-LM table row (shared/REFERENCE.md): the plan's simulated step is no longer
than the published configuration's, simulated with the same cost model on the same graph.
Rows 8 to 10 are in benchmarks/megatron_plans.py: with their graphs (5-10 s each) and row
10's search (17 s) they would take the planner's tests past their time budget."""

from __future__ import annotations

import pytest

from tripar.commands._model_args import proxy_graph_for
from tripar.partitioner.cost_model import step_estimate
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.search import search
from tripar.plan.config import ParallelConfig

# row, heads, hidden, layers, t, p, GPUs, batch
ROWS = (
    (1, 24, 2304, 24, 1, 1, 32, 512),
    (2, 32, 3072, 30, 2, 1, 64, 512),
    (3, 32, 4096, 36, 4, 1, 128, 512),
    (4, 48, 6144, 40, 8, 1, 256, 1024),
    (5, 64, 8192, 48, 8, 2, 512, 1536),
    (6, 80, 10240, 60, 8, 4, 1024, 1792),
    (7, 96, 12288, 80, 8, 8, 1536, 2304),
)


@pytest.mark.parametrize("row", ROWS, ids=[f"row{r[0]}" for r in ROWS])
def test_plan_is_no_slower_than_the_published_configuration(row):
    _, heads, hidden, layers, t, p, gpus, batch = row
    graph = proxy_graph_for(f"gpt:layers={layers},hidden={hidden},heads={heads},"
                            f"vocab=51200,seq=2048", batch_size=1, seq_len=2048)
    cluster = Cluster.builtin("a100-80g", nodes=gpus // 8, gpus_per_node=8)
    d = gpus // (t * p)
    published = step_estimate(graph, cluster, ParallelConfig(
        dp=d, tp=t, pp=p, micro_batch_size=1, num_microbatches=batch // d, schedule="1f1b",
        recompute="full"), record_timeline=False)
    plan = search(graph, cluster, batch)
    assert plan.parallel.devices == gpus and plan.parallel.global_batch_size == batch
    assert plan.estimate.step_time_s <= published.step_time_s
    assert plan.estimate.peak_memory_bytes <= cluster.device.memory_bytes
