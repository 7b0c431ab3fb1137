"""Sequence parallelism in the cost model, against Korthikanti et al.'s per-layer activation
formula (arXiv 2205.05198): with tensor parallelism alone a layer keeps
s b h (10 + 24/t) + 5 a s^2 b / t bytes (bf16), with sequence parallelism 34 s b h / t +
5 a s^2 b / t. The layer below is the paper's (layer norms, QKV, explicit attention with
softmax and dropout, projection, dropout, residuals, a 4h GELU MLP, dropout); its bytes are
measured by ``annotate`` on a captured graph, not written down."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tripar.graph import capture_model
from tripar.partitioner.cost.blocks import block_costs
from tripar.partitioner.cost.collectives import all_gather_time
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.megatron import MEGATRON_WEIGHTS
from tripar.plan.config import ParallelConfig

S, B, H, A, V = 32, 1, 64, 4, 96
A100 = Cluster.builtin("a100-80g", nodes=1, gpus_per_node=8)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(H, 3 * H), nn.Linear(H, H)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(x).split(h, dim=2)
        q, k, v = (t.view(b, s, A, h // A).transpose(1, 2) for t in (q, k, v))
        probs = self.drop((q @ k.transpose(-2, -1) * (h // A) ** -0.5).softmax(-1))
        return self.proj((probs @ v).transpose(1, 2).reshape(b, s, h))


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(H), nn.LayerNorm(H)
        self.attn = _Attention()
        self.fc, self.out = nn.Linear(H, 4 * H), nn.Linear(4 * H, H)
        self.drop_1, self.drop_2 = nn.Dropout(0.1), nn.Dropout(0.1)

    def forward(self, x):
        x = x + self.drop_1(self.attn(self.ln_1(x)))
        return x + self.drop_2(self.out(F.gelu(self.fc(self.ln_2(x)))))


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, H)
        self.layers = nn.ModuleList([_Layer(), _Layer()])
        self.ln_f, self.head = nn.LayerNorm(H), nn.Linear(H, V, bias=False)

    def forward(self, ids, labels):
        x = self.wte(ids)
        for layer in self.layers:
            x = layer(x)
        return F.cross_entropy(self.head(self.ln_f(x)).flatten(0, 1), labels.flatten())


@functools.cache
def _graph():
    ids = torch.randint(0, V, (B, S))
    # half precision, as Megatron-LM holds its model: Korthikanti's bytes are bf16 ones
    return capture_model(_Model().to(MEGATRON_WEIGHTS), (ids, ids)).graph


def korthikanti(t: int, sp: bool, mask_bytes: int) -> float:
    """The paper's bytes per layer, its dropout masks at ``mask_bytes`` per element (1 in
    Megatron; PyTorch's CPU dropout keeps the scaled mask in the activations' dtype, 2)."""
    sbh, as2b = S * B * H, A * S * S * B
    extra = mask_bytes - 1
    replicated = (10 + 2 * extra) * sbh              # 2 norm inputs, 2 region inputs, 2 masks
    sharded = 24 * sbh + (5 + extra) * as2b
    return (replicated + sharded) / t if sp else replicated + sharded / t


def _layer_bytes(t: int, sp: bool) -> int:
    graph = _graph()
    layer = next(i for i, b in enumerate(graph.blocks) if b.name == "layers.0")
    config = ParallelConfig(dp=1, tp=t, pp=1, micro_batch_size=B, num_microbatches=1, sp=sp)
    return block_costs(graph, A100, config, dtype="bf16")[layer].saved_bytes


def test_unsharded_layer_measures_korthikanti():
    assert _layer_bytes(1, False) == pytest.approx(korthikanti(1, False, 2), rel=0.05)


@pytest.mark.parametrize("t", [2, 4])
def test_sequence_parallel_layer_is_korthikanti(t):
    with_sp, without = _layer_bytes(t, True), _layer_bytes(t, False)
    assert with_sp == pytest.approx(korthikanti(t, True, 2), rel=0.05)
    assert without == pytest.approx(korthikanti(t, False, 2), rel=0.10)
    assert with_sp < without


def test_sequence_parallel_collectives_cost_one_all_reduce_each():
    graph = _graph()
    layer = next(i for i, b in enumerate(graph.blocks) if b.name == "layers.0")
    base = ParallelConfig(dp=1, tp=4, pp=1, micro_batch_size=B, num_microbatches=1)
    off = block_costs(graph, A100, base, dtype="bf16")[layer]
    on = block_costs(graph, A100, dataclasses.replace(base, sp=True), dtype="bf16")[layer]
    # all-gather + reduce-scatter move what the all-reduce moved, forward and backward; the
    # backward gathers each region's entry once more (for the weight gradient), exposed
    # where the weight gradient is too short to hide it
    payload = 2 * S * B * H   # bf16
    regather = all_gather_time(A100, payload, 4)
    assert off.tp_comm_s < on.tp_comm_s <= off.tp_comm_s + 2 * regather + 1e-12
    assert on.saved_bytes < off.saved_bytes and not math.isclose(on.forward_s, 0.0)
