"""One simulated step of a given configuration: recompute policies, schedules."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from example_graphs import example_graph

from tripar.partitioner.cost.step import step_estimate
from tripar.partitioner.hardware import Cluster
from tripar.plan.config import ParallelConfig


def cfg(**kw) -> ParallelConfig:
    base = dict(dp=1, tp=1, pp=1, micro_batch_size=1, num_microbatches=4)
    base.update(kw)
    return ParallelConfig(**base)


def _small_memory(cluster: Cluster, gib: float) -> Cluster:
    device = dataclasses.replace(cluster.device, memory_bytes=int(gib * 2**30))
    return dataclasses.replace(cluster, device=device)


def test_step_estimate_recompute_policies():
    graph = example_graph(layers=8, hidden=1024, seq=1024, heads=16)
    config = cfg(pp=4, num_microbatches=8)
    cluster = Cluster.builtin("a100-80g", nodes=1, gpus_per_node=4)
    none = step_estimate(graph, cluster, config, recompute="none")
    full = step_estimate(graph, cluster, config, recompute="full")
    assert full.step_time_s > none.step_time_s
    assert full.peak_memory_bytes < none.peak_memory_bytes
    assert full.recompute == (1.0,) * 4 and none.recompute == (0.0,) * 4
    # 1F1B holds min(p - i, m) microbatches on stage i.
    assert none.sim.stage_peak_inflight == (4, 3, 2, 1)
    assert none.tokens_per_s == pytest.approx(8 * 1024 / none.step_time_s)
    # Memory between the two: stage-aware recomputes more on early stages, none on the last.
    budget = (none.peak_memory_bytes + full.peak_memory_bytes) / 2
    tight = step_estimate(graph, _small_memory(cluster, budget / 2**30), config,
                          recompute="stage-aware")
    assert tight.fits
    r = tight.recompute
    assert r[0] > 0 and r[-1] == 0.0 and list(r) == sorted(r, reverse=True)
    assert none.step_time_s < tight.step_time_s < full.step_time_s


def test_step_estimate_interleaved_and_zero_bubble():
    graph = example_graph(layers=8, hidden=512, seq=512)
    cluster = Cluster.builtin("a100-80g", nodes=1, gpus_per_node=4)
    plain = step_estimate(graph, cluster, cfg(pp=4, num_microbatches=8))
    inter = step_estimate(graph, cluster, cfg(pp=4, num_microbatches=8, vpp=2,
                                              schedule="interleaved-1f1b"))
    zb = step_estimate(graph, cluster, cfg(pp=4, num_microbatches=8, schedule="zb-h1"))
    assert len(inter.stage_costs) == 8 and len(inter.rank_memory_bytes) == 4
    assert inter.bubble_fraction < plain.bubble_fraction
    assert zb.step_time_s < plain.step_time_s


H200_RUN = (Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "gpu_h200"
            / "run2_memory_breakdown.json")
"""``torch.cuda.max_memory_allocated`` of tripar's runtime on one H200 (bf16 autocast, AdamW,
no recomputation), steps 2-3, by ``benchmarks/gpu_memory.py``."""


@pytest.mark.parametrize("row", range(5))
def test_bf16_peak_memory_is_the_measured_one_on_an_h200(row):
    """The predicted peak of each recorded run against the measured one: under bf16
    autocast the fp32 model keeps norms, softmax, the loss and the residual stream in fp32
    (``Block.autocast_saved_bytes``); halving every fp32 byte predicted 1/1.25 to 1/1.65
    of the measured peaks. The prediction may not fall short by more than 10% (a plan must
    fit) nor exceed it by more than 25% (it counts the gradients at the peak, which the
    run frees between steps)."""
    from tripar.commands._model_args import proxy_graph_for

    key, runs = list(json.loads(H200_RUN.read_text()).items())[row]
    spec, batch, parts = key.split()
    batch, parts = int(batch.removeprefix("b=")), int(parts.removeprefix("nmb="))
    measured = runs["tripar"]["peak_steps_2_3"] * 2**30
    graph = proxy_graph_for(spec, batch_size=1)
    config = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=batch // parts,
                            num_microbatches=parts, recompute="none")
    est = step_estimate(graph, Cluster.builtin("h200"), config, dtype="bf16",
                        record_timeline=False)
    assert 0.90 <= est.peak_memory_bytes / measured <= 1.25, (spec, batch, parts)
