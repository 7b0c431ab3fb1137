"""ResNet: ResNet-50's size, stage shapes, BatchNorm state after materialisation."""

from __future__ import annotations

import torch

from tripar.models.resnet import ResNet, ResNetConfig
from tripar.models.spec import load_model


def test_resnet50_has_torchvisions_parameter_count():
    with torch.device("meta"):
        model = ResNet(ResNetConfig(blocks=(3, 4, 6, 3), width=64, image=224, classes=1000))
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision resnet50
    assert len(model.layers) == 4 and len(model.layers[2]) == 6


def test_stage_shapes():
    model = ResNet(ResNetConfig(blocks=(1, 2), width=8, image=32, classes=3)).eval()
    x = torch.randn(2, 3, 32, 32)
    x = model.maxpool(model.bn1(model.conv1(x)))
    assert model.layers[0](x).shape == (2, 32, 8, 8)
    assert model.layers[1](model.layers[0](x)).shape == (2, 64, 4, 4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_batchnorm_statistics_reset_when_materialised():
    loaded = load_model("resnet:blocks=1,width=4,image=16,classes=2", device="meta")
    model = loaded.model
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.equal(model.bn1.running_mean, torch.zeros(4))
    assert torch.equal(model.bn1.running_var, torch.ones(4))
    assert int(model.bn1.num_batches_tracked) == 0
