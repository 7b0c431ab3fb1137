"""GPT: parameter count, tied head, names, causality, meta scale."""

from __future__ import annotations

import pytest
import torch

from tripar.models.gpt import GPT, GPTConfig
from tripar.models.spec import load_model


def megatron_params(layers: int, h: int, V: int, s: int) -> float:
    """REFERENCE.md: 12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h))."""
    return 12 * layers * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * layers * h))


@pytest.mark.parametrize("layers, h, a, V, s", [(2, 64, 4, 128, 16), (3, 96, 6, 1000, 40)])
def test_parameter_count_matches_megatron_formula(layers, h, a, V, s):
    with torch.device("meta"):
        model = GPT(GPTConfig(layers=layers, hidden=h, heads=a, vocab=V, seq=s))
    counted = sum(p.numel() for p in model.parameters())  # the tied head counts once
    # Megatron's formula leaves out the final LayerNorm (2h): everything else is exact.
    assert counted == round(megatron_params(layers, h, V, s)) + 2 * h


def test_gpt3_175b_on_meta():
    loaded = load_model("gpt:layers=96,hidden=12288,heads=96,vocab=51200,seq=2048",
                        device="meta")
    params = list(loaded.model.parameters())
    assert all(p.device.type == "meta" for p in params)
    counted = sum(p.numel() for p in params)
    assert counted == round(megatron_params(96, 12288, 51200, 2048)) + 2 * 12288
    assert 174e9 < counted < 176e9


def test_lm_head_is_tied_and_stays_tied_after_to_empty():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    assert model.lm_head.weight is model.wte.weight
    model.to_empty(device="cpu")  # to_empty unties shared parameters ...
    model.init_weights()  # ... and init_weights ties them again
    assert model.lm_head.weight is model.wte.weight
    names = [name for name, _ in model.named_parameters()]
    assert "wte.weight" in names and "lm_head.weight" not in names


def test_module_names_and_shapes():
    model = GPT(GPTConfig(layers=2, hidden=32, heads=4, vocab=50, seq=8, ffn=80))
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["blocks.1.attn.c_attn.weight"] == (96, 32)
    assert shapes["blocks.1.attn.c_proj.weight"] == (32, 32)
    assert shapes["blocks.0.mlp.c_fc.weight"] == (80, 32)
    assert shapes["blocks.0.mlp.c_proj.weight"] == (32, 80)
    assert shapes["wpe.weight"] == (8, 32)
    assert {"blocks.0.ln_1.weight", "blocks.0.ln_2.bias", "ln_f.weight"} <= set(shapes)


def test_logits_without_targets_and_causality():
    torch.manual_seed(0)
    model = GPT(GPTConfig(layers=2, hidden=32, heads=4, vocab=50, seq=8)).eval()
    ids = torch.randint(0, 50, (2, 8))
    logits = model(ids)
    assert logits.shape == (2, 8, 50)
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 50
    other = model(changed)
    torch.testing.assert_close(other[:, :5], logits[:, :5])  # the past ignores the future
    assert not torch.allclose(other[:, 5:], logits[:, 5:])


def test_initial_loss_is_near_uniform():
    loaded = load_model("gpt:layers=2,hidden=64,heads=4,vocab=128,seq=16", batch_size=4)
    loss = float(loaded.model(*loaded.example_inputs).detach())
    assert abs(loss - torch.log(torch.tensor(128.0)).item()) < 0.3


def test_example_inputs_are_shifted_targets():
    loaded = load_model("gpt:layers=1,hidden=16,heads=2,vocab=30,seq=10", batch_size=2)
    ids, targets = loaded.example_inputs
    assert ids.shape == targets.shape == (2, 10)
    assert torch.equal(ids[:, 1:], targets[:, :-1])
    assert int(ids.max()) < 30 and int(ids.min()) >= 0
