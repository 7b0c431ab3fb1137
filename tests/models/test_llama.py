"""Llama: grouped-query shapes, SwiGLU width, rotary tables, causality."""

from __future__ import annotations

import torch

from tripar.models._common import llama_ffn
from tripar.models.llama import Llama, LlamaConfig, RotaryEmbedding, apply_rotary


def test_gqa_projection_shapes():
    model = Llama(LlamaConfig(layers=1, hidden=64, heads=8, kv_heads=2, vocab=40, seq=8))
    attn = model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (64, 64)
    assert attn.k_proj.weight.shape == (16, 64)  # 2 kv heads x head_dim 8
    assert attn.v_proj.weight.shape == (16, 64)
    assert attn.o_proj.weight.shape == (64, 64)
    assert attn.n_rep == 4
    assert model.lm_head.weight is not model.embed_tokens.weight  # untied


def test_kv_heads_default_to_heads_and_ffn_follows_llama_rule():
    config = LlamaConfig(hidden=4096, heads=32)
    assert config.kv_heads == 32
    assert config.ffn == 11008 == llama_ffn(4096)  # Llama-7B's width
    assert LlamaConfig(hidden=64, ffn=100).ffn == 100


def test_gqa_equals_mha_with_repeated_kv_weights():
    torch.manual_seed(0)
    gqa = Llama(LlamaConfig(layers=1, hidden=32, heads=4, kv_heads=2, vocab=20, seq=6))
    mha = Llama(LlamaConfig(layers=1, hidden=32, heads=4, kv_heads=4, vocab=20, seq=6))
    state = gqa.state_dict()
    for name in ("k_proj", "v_proj"):
        w = state[f"layers.0.self_attn.{name}.weight"].view(2, 8, 32)
        state[f"layers.0.self_attn.{name}.weight"] = w.repeat_interleave(2, 0).reshape(32, 32)
    mha.load_state_dict(state)
    ids = torch.randint(0, 20, (2, 6))
    torch.testing.assert_close(gqa(ids), mha(ids))


def test_rotary_buffers_are_not_persistent_and_match_complex_rotation():
    rotary = RotaryEmbedding(head_dim=8, seq=5, theta=10000.0)
    assert not rotary.state_dict()
    model = Llama(LlamaConfig(layers=1, hidden=32, heads=4, vocab=20, seq=6))
    assert not any("rotary" in key for key in model.state_dict())
    cos, sin = rotary(5)
    x = torch.randn(1, 1, 5, 8)
    rotated = apply_rotary(x, cos, sin)
    # Reference: rotate each (x_i, x_{i+4}) pair by angle pos * theta^(-2i/8).
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    angle = torch.arange(5).float()[:, None] * inv  # (5, 4)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(rotated, torch.cat((z.real, z.imag), dim=-1))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


def test_rotary_tables_refilled_after_to_empty():
    config = LlamaConfig(layers=1, hidden=32, heads=4, vocab=20, seq=6)
    reference = Llama(config)
    with torch.device("meta"):
        model = Llama(config)
    assert model.rotary.cos.device.type == "meta"
    model.to_empty(device="cpu")
    model.init_weights()
    torch.testing.assert_close(model.rotary.cos, reference.rotary.cos)
    torch.testing.assert_close(model.rotary.sin, reference.rotary.sin)


def test_causal():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(layers=2, hidden=32, heads=4, kv_heads=1, vocab=20, seq=8))
    ids = torch.randint(0, 20, (1, 8))
    changed = ids.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 20
    torch.testing.assert_close(model(ids)[:, :6], model(changed)[:, :6])
