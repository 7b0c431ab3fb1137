"""Megatron-LM's weak-scaling runs (arXiv 2104.04473, Table 1): the published data the
cost model is calibrated on and the planner is compared with (shared/REFERENCE.md).

GPT models on A100-80GB nodes of 8, sequence 2048, vocabulary 51200, full activation
recomputation.

>>> MEGATRON_TABLE[0][:8], MEGATRON_TABLE[0][8]
((1.7, 24, 2304, 24, 1, 1, 32, 512), 137)
>>> round(megatron_flops(512, 24, 2304) / 1e15, 1)  # PFLOP in one step of the 1.7B run
15.5
"""

from __future__ import annotations

SEQ, VOCAB = 2048, 51200

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


def megatron_flops(batch: int, layers: int, hidden: int) -> float:
    """Training FLOPs of one step with full recomputation (Megatron eq. 3, the 96 factor)."""
    return 96 * batch * SEQ * layers * hidden**2 * (
        1 + SEQ / (6 * hidden) + VOCAB / (16 * layers * hidden))
