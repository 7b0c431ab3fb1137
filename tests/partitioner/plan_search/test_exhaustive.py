"""The search against a reference written here, independent of the search's own code.

The reference enumerates every (dp, tp, pp, vpp, micro-batch size, schedule, ZeRO,
recompute) with dp*tp*pp equal to the devices and dp*micro-batch dividing the batch,
costs each with ``step_estimate`` on the uniform split by blocks (every proven
tensor-parallel region sharded), and keeps the fastest that fits. The search may also
move stage boundaries and leave regions whole, so its plan can only be as fast or faster:
anything slower than the reference is a configuration the search missed or costed
differently.
"""

from __future__ import annotations

import itertools
import math

import pytest
from search_clusters import small_cluster

from tripar.commands._model_args import proxy_graph_for
from tripar.errors import TriparError
from tripar.partitioner import search, step_estimate
from tripar.plan import ParallelConfig

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "scp")
RECOMPUTE = ("none", "full", "stage-aware")
ZERO_STAGES = (0, 1, 2)
BATCH = 16


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def reference(graph, cluster, batch: int) -> tuple[float, ParallelConfig]:
    """The fastest configuration that fits, each costed on the uniform split."""
    devices, blocks = cluster.devices, len(graph.blocks)
    proven = {d for r in graph.tp_regions for d in r.degrees}
    best: tuple[float, ParallelConfig | None] = (math.inf, None)
    for tp, pp in itertools.product(_divisors(devices), _divisors(devices)):
        dp = devices // (tp * pp) if devices % (tp * pp) == 0 else 0
        if not dp or (tp > 1 and tp not in proven) or batch % dp or pp > blocks:
            continue
        for mbs in _divisors(batch // dp):
            m = batch // (dp * mbs)
            for schedule, vpp, zero, recompute in itertools.product(
                    SCHEDULES, (1, 2, 4), ZERO_STAGES, RECOMPUTE):
                interleaved = schedule == "interleaved-1f1b"
                if (interleaved != (vpp > 1) or pp * vpp > blocks or (zero and dp == 1)
                        or (interleaved and (pp == 1 or m % pp))
                        or (schedule == "scp" and recompute == "none")):
                    continue
                try:
                    cfg = ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=mbs,
                                         num_microbatches=m, vpp=vpp, schedule=schedule,
                                         recompute=recompute, zero=zero)
                    est = step_estimate(graph, cluster, cfg, record_timeline=False)
                except TriparError:
                    continue  # a combination the schedules or the cost model refuse
                if est.fits and est.step_time_s < best[0]:
                    best = (est.step_time_s, cfg)
    return best


@pytest.mark.parametrize("spec,nodes,gpus,memory_gb", [
    ("gpt:layers=4,hidden=256,heads=4,vocab=1000,seq=128", 2, 4, 80),
    ("llama:layers=4,hidden=256,heads=4,kv_heads=2,vocab=1000,seq=128,ffn=512", 1, 8, 0.05),
    ("gpt:layers=12,hidden=256,heads=8,vocab=1000,seq=128", 2, 8, 0.08),
])
def test_plan_is_no_slower_than_every_configuration_enumerated_here(spec, nodes, gpus,
                                                                     memory_gb):
    graph = proxy_graph_for(spec, batch_size=1)
    cluster = small_cluster(memory_gb, nodes=nodes, gpus=gpus)
    best, cfg = reference(graph, cluster, BATCH)
    assert cfg is not None, "the reference found no configuration that fits"
    plan = search(graph, cluster, BATCH)
    assert plan.estimate.step_time_s <= best * 1.01, (plan.parallel, cfg, best)
    assert plan.estimate.peak_memory_bytes <= cluster.device.memory_bytes
