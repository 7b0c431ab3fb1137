"""ResNet with bottleneck blocks (ResNet-50 style), depth and width parametric.

``blocks=3-4-6-3, width=64`` is ResNet-50; stage ``i`` has ``width * 2**i``
bottleneck channels and 4x as many output channels. Stages live under
``layers.{i}``, their blocks under ``layers.{i}.{j}``.
``forward(images, labels=None)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tripar.errors import ModelSpecError
from tripar.models._common import (
    default_generator,
    model_device,
    random_floats,
    random_ids,
    require_positive,
)

EXPANSION = 4


@dataclass(frozen=True, slots=True)
class ResNetConfig:
    """Sizes of a ResNet; every field is a key of the ``resnet:`` MODEL spec."""

    blocks: tuple[int, ...] = (1, 1, 1, 1)
    """Bottleneck blocks per stage, written ``blocks=3-4-6-3`` in a spec."""
    width: int = 16
    """Bottleneck channels of the first stage (64 in ResNet-50)."""
    image: int = 32
    """Image side in pixels."""
    channels: int = 3
    """Input channels."""
    classes: int = 10
    """Output classes."""

    def __post_init__(self) -> None:
        require_positive("resnet", width=self.width, image=self.image, channels=self.channels,
                         classes=self.classes)
        if not self.blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                  for b in self.blocks):
            raise ModelSpecError(
                f"resnet: blocks={self.blocks!r} must be one or more positive block counts, "
                "e.g. blocks=3-4-6-3"
            )
        object.__setattr__(self, "blocks", tuple(self.blocks))

    def sizes(self) -> dict[str, int | tuple[int, ...]]:
        """The sizes the planner reads; ``layers`` is the total number of bottlenecks."""
        return {"layers": sum(self.blocks), "blocks": self.blocks, "width": self.width,
                "hidden": self.width * 2 ** (len(self.blocks) - 1) * EXPANSION,
                "image": self.image, "channels": self.channels, "classes": self.classes}


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, with a projection shortcut when shapes change."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet classifier."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(config.channels, config.width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(config.width)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        in_channels = config.width
        for i, count in enumerate(config.blocks):
            width = config.width * 2 ** i
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(count):
                blocks.append(Bottleneck(in_channels, width, stride if j == 0 else 1))
                in_channels = width * EXPANSION
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.ModuleList(stages)
        self.fc = nn.Linear(in_channels, config.classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """He-normal convolutions, unit BatchNorms with fresh statistics (torchvision's init)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()  # weight 1, bias 0, running stats reset
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def example_inputs(
        self, batch_size: int = 2, seq_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)``; ``seq_len`` is ignored."""
        require_positive("resnet", batch_size=batch_size)
        generator = default_generator(generator)
        device = model_device(self)
        c, s = self.config.channels, self.config.image
        images = random_floats((batch_size, c, s, s), device, generator)
        return images, random_ids((batch_size,), self.config.classes, device, generator)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(images))))
        for stage in self.layers:
            x = stage(x)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))  # (B, classes)
        if labels is None:
            return logits
        return F.cross_entropy(logits, labels)
