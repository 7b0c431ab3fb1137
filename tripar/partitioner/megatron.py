"""Published Megatron-LM runs: the data the cost model is calibrated on and checked
against (shared/REFERENCE.md), and the tripar configuration of each.

- ``MEGATRON_TABLE``: the weak-scaling runs of Narayanan et al. (arXiv 2104.04473,
  Table 1). GPT models on A100-80GB nodes of 8, sequence 2048, vocabulary 51200, full
  activation recomputation, TFLOP/s per GPU counted with the 96-factor formula
  (:func:`megatron_flops`). :mod:`.calibrate_fit` fits the GPU efficiency to them.
- ``KORTHIKANTI_RUNS``: the runs of Korthikanti et al. (arXiv 2205.05198), with sequence
  parallelism and selective recomputation, data-parallel size 1. Model and hardware FLOPs
  utilization from the Megatron-LM README (commit 841f789f48, May 2022: "measured using a
  data parallel size of one"); heads, hidden size, layers, t, p, GPUs and global batch
  from the paper's model table as shared/REFERENCE.md gives them (the 530B one is also
  Megatron-Turing NLG's replica: 8-way tensor, 35-way pipeline, 280 GPUs). No fit has
  seen them.

>>> MEGATRON_TABLE[0][:8], MEGATRON_TABLE[0][8]
((1.7, 24, 2304, 24, 1, 1, 32, 512), 137)
>>> round(megatron_flops(512, 24, 2304) / 1e15, 1)  # PFLOP in one step of the 1.7B run
15.5
>>> # no recomputation counted: 3/4 of it, and a little more (the LM head is not recomputed)
>>> round(model_flops(512, 24, 2304) / megatron_flops(512, 24, 2304), 3)
0.762
"""

from __future__ import annotations

import torch

from tripar.graph.proxy import ProxyGraph
from tripar.partitioner.calibrate_fit import CalibrationRun
from tripar.partitioner.hardware import Cluster
from tripar.plan.config import ParallelConfig

SEQ, VOCAB = 2048, 51200
MEGATRON_WEIGHTS = torch.bfloat16
"""The dtype Megatron-LM's runs hold the model in: half precision, with fp32 master weights
in the optimizer, so every activation is bf16 (tripar's own runs keep an fp32 model under
autocast, whose norms, softmax, loss and residual stream stay fp32): the graphs checked
against its tables are built in it."""
A100_PEAK_TFLOPS = 312.0
"""A100 bf16 dense peak, what the utilizations of ``KORTHIKANTI_RUNS`` are shares of."""

MEGATRON_TABLE = (
    # params (B), heads, hidden, layers, t, p, GPUs, batch, published TFLOP/s per GPU
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
)

KORTHIKANTI_RUNS = (
    # model, heads, hidden, layers, t, p, GPUs, global batch, MFU %, HFU %
    ("22B", 64, 6144, 48, 8, 1, 8, 4, 41.5, 43.7),
    ("175B", 96, 12288, 96, 8, 8, 64, 64, 51.4, 52.8),
    ("530B", 128, 20480, 105, 8, 35, 280, 280, 56.0, 57.0),
    ("1T", 160, 25600, 128, 8, 64, 512, 512, 56.3, 57.0),
)


def megatron_flops(batch: int, layers: int, hidden: int) -> float:
    """Training FLOPs of one step with full recomputation (Megatron eq. 3, the 96 factor)."""
    return 96 * batch * SEQ * layers * hidden**2 * (
        1 + SEQ / (6 * hidden) + VOCAB / (16 * layers * hidden))


def model_flops(batch: int, layers: int, hidden: int) -> float:
    """Model FLOPs of one step, no recomputation counted (the 72 factor of MFU)."""
    return 72 * batch * SEQ * layers * hidden**2 * (
        1 + SEQ / (6 * hidden) + VOCAB / (12 * layers * hidden))


def gpt_spec(heads: int, hidden: int, layers: int) -> str:
    """The zoo ``gpt`` spec of a run's model (``tripar.models.load_model`` builds it)."""
    return f"gpt:layers={layers},hidden={hidden},heads={heads},vocab={VOCAB},seq={SEQ}"


def table_run(row: tuple, graph: ProxyGraph) -> CalibrationRun:
    """A ``MEGATRON_TABLE`` row as tripar costs it: a100-80g nodes of 8, d = GPUs / (t p),
    microbatch 1, 1F1B, full recomputation; ``graph`` is the proxy graph of its
    :func:`gpt_spec` at batch 1."""
    params_b, _, hidden, layers, t, p, gpus, batch, published = row
    d = gpus // (t * p)
    config = ParallelConfig(dp=d, tp=t, pp=p, micro_batch_size=1, num_microbatches=batch // d,
                            schedule="1f1b", recompute="full")
    return CalibrationRun(f"{params_b}B", graph,
                          Cluster.builtin("a100-80g", nodes=gpus // 8, gpus_per_node=8), config,
                          flops=megatron_flops(batch, layers, hidden), published=published)


def korthikanti_run(row: tuple, graph: ProxyGraph) -> CalibrationRun:
    """A ``KORTHIKANTI_RUNS`` row as tripar can cost it today: the same t, p, microbatch 1,
    global batch and 1F1B, with sequence parallelism but not selective recomputation (not
    modelled here), so no recomputation at all. It is compared with the run's
    hardware FLOPs utilization: the published step without the time of its recomputed
    attention cores, taken at the run's mean rate (``published`` = HFU x peak; predicted =
    model FLOPs over the simulated step)."""
    _, _, hidden, layers, t, p, gpus, batch, _, hfu = row
    config = ParallelConfig(dp=1, tp=t, pp=p, micro_batch_size=1, num_microbatches=batch,
                            schedule="1f1b", recompute="none", sp=True)
    return CalibrationRun(row[0], graph,
                          Cluster.builtin("a100-80g", nodes=max(1, gpus // 8), gpus_per_node=8),
                          config, flops=model_flops(batch, layers, hidden),
                          published=hfu / 100 * A100_PEAK_TFLOPS)
