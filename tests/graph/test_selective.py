"""Selective recomputation's segments, found from the annotated graph, and what the cost
model makes of them against Korthikanti et al.'s per-layer activation formulas."""

from __future__ import annotations

import functools

import pytest
import torch

from tripar.graph import capture_model
from tripar.models import load_model
from tripar.partitioner.cost import block_costs
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.megatron import MEGATRON_WEIGHTS
from tripar.plan.config import ParallelConfig

S, H, A = 64, 64, 16
"""Sequence, hidden size, heads of the layer checked against the formulas."""


@functools.cache
def _graph(spec: str, dtype: torch.dtype = torch.float32):
    loaded = load_model(spec, batch_size=1)
    return capture_model(loaded.model.to(dtype), loaded.example_inputs).graph


def _layer(spec: str):
    return next(b for b in _graph(spec).blocks if b.kind == "layer")


EAGER = f"gpt:layers=1,hidden={H},heads={A},vocab=64,seq={S},attention=eager,dropout=0.1"


def test_the_unfused_attention_core_is_selected_and_nothing_else():
    layer = _layer(EAGER)
    picked = set(layer.selective_nodes)
    assert {"matmul", "softmax", "matmul_1", "masked_fill", "dropout_1"} <= picked
    # the weighted products, norms, GELU, residual dropouts and adds stay kept
    assert not picked & {"linear", "linear_1", "linear_2", "linear_3", "layer_norm", "gelu",
                         "dropout_2", "dropout_3", "add_1", "add_2"}
    # fp32: the probabilities, the dropout's mask and output (a s^2 values each), and the
    # causal mask (s^2 bools)
    assert layer.selective_bytes == 3 * A * S * S * 4 + S * S
    assert layer.selective_flops == 2 * 2 * S * S * H  # q k^T and p v


def test_swiglu_and_rotary_parts_are_found_in_llama():
    layer = _layer("llama:layers=1,hidden=32,heads=8,kv_heads=4,vocab=64,seq=8,attention=eager")
    picked = set(layer.selective_nodes)
    assert {"silu", "softmax", "repeat_interleave"} <= picked
    assert layer.selective_bytes > 0


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_korthikanti_activation_memory(tp):
    """Per layer, bf16, before tensor-parallel division: 34 s b h + 5 a s^2 b without, and
    34 s b h with selective recomputation; at degree t the selective term is 5 a s^2 b / t
    (the heads split). The CPU graph keeps a dropout's mask in the activation's dtype
    (Megatron's GPU kernel keeps one byte), so each mask counts twice: 36 s b h (two
    dropouts outside the core) and 6 a s^2 b; layer norms add their per-token statistics
    and the causal mask its s^2 bools."""
    graph = _graph(EAGER, MEGATRON_WEIGHTS)   # half precision, as Megatron-LM holds it
    index = next(i for i, b in enumerate(graph.blocks) if b.kind == "layer")
    cost = block_costs(graph, Cluster.builtin("a100-80g"), ParallelConfig(1, tp, 1, 1, 1))[index]
    sbh = S * H
    core = (6 * A * S * S + S * S) / tp   # and the causal mask: s^2 bools of one byte
    assert cost.selective_bytes == pytest.approx(core, rel=0.01)
    if tp == 1:
        assert (cost.saved_bytes - cost.selective_bytes) / sbh == pytest.approx(36, rel=0.02)
        assert cost.saved_bytes / (36 * sbh + core) == pytest.approx(1, rel=0.02)
    assert 0 < cost.selective_s < cost.forward_s / 2  # cheap: no weighted product
