"""The shipped efficiency calibration against the Megatron-LM weak-scaling table.

Every row (arXiv 2104.04473, Table 1; shared/REFERENCE.md) is rebuilt as a real
proxy graph of the zoo gpt on the meta device, costed with its t, p, d, batch,
microbatch 1, full recomputation and 1F1B on a100-80g nodes of 8, and
simulated. The predicted TFLOP/s per GPU (96-factor formula FLOPs / simulated
step time / GPUs) must be within 15% of the published figure.
"""

from __future__ import annotations

import functools

import pytest

from tripar.graph import analyze
from tripar.models import load_model
from tripar.partitioner.cost.step import step_estimate
from tripar.partitioner.hardware import Cluster, builtin_device, load_calibration
from tripar.partitioner.megatron import MEGATRON_TABLE, SEQ, VOCAB, megatron_flops
from tripar.plan.config import ParallelConfig


@functools.cache
def gpt_graph(heads: int, hidden: int, layers: int):
    spec = f"gpt:layers={layers},hidden={hidden},heads={heads},vocab={VOCAB},seq={SEQ}"
    loaded = load_model(spec, batch_size=1, device="meta")
    return analyze(loaded.model, loaded.example_inputs, loaded.example_kwargs,
                   model_config=loaded.config)


@pytest.mark.parametrize("row", MEGATRON_TABLE, ids=[f"{r[0]}B" for r in MEGATRON_TABLE])
def test_megatron_row_within_15_percent(row):
    params_b, heads, hidden, layers, t, p, gpus, batch, published = row
    graph = gpt_graph(heads, hidden, layers)
    assert sum(b.params for b in graph.blocks) == pytest.approx(params_b * 1e9, rel=0.05)
    d = gpus // (t * p)
    config = ParallelConfig(dp=d, tp=t, pp=p, micro_batch_size=1, num_microbatches=batch // d,
                            schedule="1f1b", recompute="full")
    cluster = Cluster.builtin("a100-80g", nodes=gpus // 8, gpus_per_node=8)
    estimate = step_estimate(graph, cluster, config, record_timeline=False)
    predicted = megatron_flops(batch, layers, hidden) / estimate.step_time_s / gpus / 1e12
    assert predicted == pytest.approx(published, rel=0.15), (
        f"{params_b}B: predicted {predicted:.1f} TFLOP/s per GPU, published {published}")
    assert estimate.recompute == (1.0,) * p
    assert estimate.fits  # Megatron ran it on 80 GB devices


def test_shipped_efficiency_is_the_fitted_curve():
    data = load_calibration()
    gpu = data["efficiency"]["gpu"]
    assert "fit_calibration.py" in gpu["source"]
    eff = builtin_device("a100-80g").efficiency
    assert eff.matmul_max == gpu["matmul_max"] and eff.matmul_half > 0
    # Not a constant: a 512-wide product is clearly less efficient than a 8192-wide one.
    assert eff.matmul(512, 512, 512) < 0.9 * eff.matmul(8192, 8192, 8192)
    # The fit report in the file agrees with the table it was fitted to.
    fitted = {r["params_b"]: r for r in data["megatron_fit"]}
    for row in MEGATRON_TABLE:
        assert fitted[row[0]]["published"] == row[-1]
        assert abs(fitted[row[0]]["error"]) < 0.15
