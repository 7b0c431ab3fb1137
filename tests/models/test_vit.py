"""ViT: token count, shapes, config checks."""

from __future__ import annotations

import pytest
import torch

from tripar.errors import ModelSpecError
from tripar.models.vit import ViT, ViTConfig


def test_tokens_and_logits():
    config = ViTConfig(image=16, patch=4, channels=1, classes=7, layers=1, hidden=32, heads=4)
    assert config.seq == 17
    model = ViT(config)
    assert model.pos_embed.shape == (1, 17, 32)
    assert model.patch_embed.weight.shape == (32, 1, 4, 4)
    logits = model(torch.randn(3, 1, 16, 16))
    assert logits.shape == (3, 7)
    pixels, labels = model.example_inputs(batch_size=3)
    assert pixels.shape == (3, 1, 16, 16) and labels.shape == (3,) and int(labels.max()) < 7


def test_image_must_be_a_multiple_of_patch():
    with pytest.raises(ModelSpecError, match="image=20 is not divisible by patch=8"):
        ViTConfig(image=20, patch=8)
