"""Token-wise nodes, found from the graph: a node's sequence dim maps through and none of
its operators mixes tokens; the zone sequence parallelism runs on the shard."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tripar.graph import capture_model
from tripar.graph.sequence import sequence_zone, token_wise_nodes
from tripar.graph.values import node_values
from tripar.models import load_model


class _Mixed(nn.Module):
    """Token-wise parts and parts that mix tokens, each one node."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.1)
        self.table = nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        a = self.norm(x) + x                        # token-wise (broadcast weights)
        b = self.drop(self.proj(a))                 # a linear on the features; dropout
        c = a * a.pow(2).mean(-1, keepdim=True).rsqrt()   # RMSNorm's ops
        d = a.softmax(dim=1)                        # over the sequence: mixes
        e = a.cumsum(1)                             # a scan along the sequence
        f = a @ a.transpose(1, 2)                   # (b, s, s): two sequence dims
        g = a.view(2, 8 * 16)                       # a size baked in
        h = a[:, 1:]                                # a shift along the sequence
        i = a + self.table                          # a weight with a row per position
        j = F.rrelu(a, training=True)               # random, not a dropout
        return b, c, d, e, f, g, h, i, j


def _token_wise(module: nn.Module, x: torch.Tensor):
    gm = torch.fx.symbolic_trace(module)
    return gm, token_wise_nodes(gm, node_values(gm, [x]), seq_len=x.shape[1])


def test_token_wise_ops_are_found_and_mixing_ones_refused():
    gm, found = _token_wise(_Mixed(), torch.randn(2, 8, 16))
    assert {"norm", "add", "proj", "drop", "pow_1", "mean", "rsqrt", "mul"} <= set(found)
    for name in ("softmax", "cumsum", "matmul", "view", "getitem", "add_1", "rrelu"):
        assert name in {n.name for n in gm.graph.nodes}, name
        assert name not in found, name
    assert found["norm"] == 1 and found.dropout == {"drop"}


def test_sequence_dim_ambiguous_or_absent_is_not_token_wise():
    # the batch has the sequence's size: which dim is the sequence cannot be told
    gm, found = _token_wise(nn.LayerNorm(16), torch.randn(8, 8, 16))
    assert not found
    gm, found = _token_wise(nn.Sequential(nn.LayerNorm(16)), torch.randn(2, 8, 16))
    assert dict(found) == {"_0": 1}


@functools.cache
def _captured(spec: str):
    loaded = load_model(spec, batch_size=2)
    return capture_model(loaded.model, loaded.example_inputs)


def _found(spec: str):
    captured = _captured(spec)
    gm, graph = captured.gm, captured.graph
    values = {n.name: n.meta.get("val") for n in gm.graph.nodes}
    inside = {n for r in graph.tp_regions for n in r.nodes}
    found = token_wise_nodes(gm, values, seq_len=graph.seq_len, skip=inside)
    seeds = [n for r in graph.tp_regions for n in r.row]
    return found, set(sequence_zone(gm, found, seeds, inside)), graph


def _zone(spec: str) -> tuple[set[str], dict]:
    _, zone, graph = _found(spec)
    return zone, {b.name: b for b in graph.blocks}


def test_gpt_zone_holds_norms_dropouts_and_residuals():
    zone, blocks = _zone("gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8,dropout=0.1")
    for i in range(2):
        for part in ("ln_1", "ln_2", "attn_resid_dropout", "mlp_dropout"):
            assert f"blocks_{i}_{part}" in zone
    assert {"drop", "ln_f", "add"} <= zone          # embeddings' sum and dropout, final norm
    assert not any("attn_c_attn" in n or "scaled_dot" in n for n in zone)
    assert blocks["blocks.0"].sequence_saved_bytes > 0
    assert blocks["blocks.0"].sequence_saved_bytes < blocks["blocks.0"].saved_bytes


def test_llama_rmsnorm_ops_run_on_the_shard_but_not_rotary():
    zone, blocks = _zone("llama:layers=2,hidden=32,heads=4,kv_heads=2,vocab=64,seq=8")
    captured = _captured("llama:layers=2,hidden=32,heads=4,kv_heads=2,vocab=64,seq=8")
    ops = {n.name: n for n in captured.gm.graph.nodes}
    for i, suffix in enumerate(("", "_1", "_2", "_3", "_4")):   # 4 layer norms and the final
        assert {f"pow_{i + 1}", f"mean{suffix}", f"rsqrt{suffix}"} <= zone
    rotary = {n for n in ops if n.startswith(("neg", "cat", "rotary"))}
    assert rotary and not rotary & zone
    assert all(blocks[f"layers.{i}"].sequence_saved_bytes > 0 for i in range(2))


def test_bert_post_norm_zone():
    zone, _ = _zone("bert:layers=2,hidden=32,heads=4,vocab=64,seq=8")
    for i in range(2):
        assert {f"layers_{i}_attention_norm", f"layers_{i}_output_norm"} <= zone
    assert "embeddings_layer_norm" in zone


@pytest.mark.parametrize("spec", [
    "gpt:layers=2,hidden=32,heads=4,vocab=64,seq={}",
    "llama:layers=2,hidden=32,heads=4,kv_heads=2,vocab=64,seq={}",
    "bert:layers=2,hidden=32,heads=4,vocab=64,seq={}",
])
def test_a_sequence_as_long_as_the_hidden_size_is_told_apart(spec):
    # seq == hidden: every (b, s, h) activation has two dims of the sequence's size; the
    # sequence is the dim the token ids bring (bert's token-type row, of the hidden size,
    # carries none), so the same nodes are token-wise, on the same dims, as at seq 16
    short, short_zone, _ = _found(spec.format(16))
    square, square_zone, graph = _found(spec.format(32))
    assert graph.seq_len == 32 and square_zone
    assert dict(square) == dict(short) and square.dropout == short.dropout
    assert square_zone == short_zone
    assert {square.dims[n] for n in square_zone} == {1}   # (b, s, h): the sequence at 1
