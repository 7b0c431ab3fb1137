"""Vision Transformer: Conv2d patch embedding, class token, pre-LN encoder, linear head.

``forward(pixels, labels=None)`` with pixels (B, channels, image, image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tripar.models._common import (
    default_generator,
    init_linear,
    init_norm,
    model_device,
    random_floats,
    random_ids,
    require_divisible,
    require_positive,
    require_probability,
)


@dataclass(frozen=True, slots=True)
class ViTConfig:
    """Sizes of a ViT; every field is a key of the ``vit:`` MODEL spec."""

    image: int = 32
    """Image side in pixels; a multiple of ``patch``."""
    patch: int = 8
    """Patch side in pixels."""
    channels: int = 3
    """Input channels."""
    classes: int = 10
    """Output classes."""
    layers: int = 2
    """Encoder layers."""
    hidden: int = 64
    """Hidden size; a multiple of ``heads``."""
    heads: int = 4
    """Attention heads."""
    ffn: int | None = None
    """MLP width; ``None`` means ``4 * hidden``."""
    dropout: float = 0.0
    """Dropout after embeddings and sub-layers."""

    def __post_init__(self) -> None:
        if self.ffn is None:
            object.__setattr__(self, "ffn", 4 * self.hidden)
        require_positive("vit", image=self.image, patch=self.patch, channels=self.channels,
                         classes=self.classes, layers=self.layers, hidden=self.hidden,
                         heads=self.heads, ffn=self.ffn)
        require_divisible("vit", "image", self.image, "patch", self.patch)
        require_divisible("vit", "hidden", self.hidden, "heads", self.heads)
        require_probability("vit", "dropout", self.dropout)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def seq(self) -> int:
        """Tokens per image: patches plus the class token."""
        return (self.image // self.patch) ** 2 + 1

    def sizes(self) -> dict[str, int]:
        """The sizes the planner reads (``LoadedModel.config``)."""
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.heads, "head_dim": self.head_dim, "seq": self.seq,
                "ffn": self.ffn, "image": self.image, "patch": self.patch,
                "channels": self.channels, "classes": self.classes}


class ViTAttention(nn.Module):
    """Bidirectional multi-head attention with a fused QKV projection."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.hidden = config.hidden
        self.n_head = config.heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden)
        self.proj = nn.Linear(config.hidden, config.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(self.hidden, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class ViTLayer(nn.Module):
    """Pre-LayerNorm encoder layer."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden)
        self.attn = ViTAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden)
        self.fc1 = nn.Linear(config.hidden, config.ffn)
        self.fc2 = nn.Linear(config.ffn, config.hidden)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x)))
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.ln_2(x)))))


class ViT(nn.Module):
    """Image classifier; ``forward(pixels, labels=None)`` -> loss or logits (B, classes)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv2d(config.channels, config.hidden, kernel_size=config.patch,
                                     stride=config.patch)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden))
        self.pos_embed = nn.Parameter(torch.empty(1, config.seq, config.hidden))
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(ViTLayer(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.hidden)
        self.head = nn.Linear(config.hidden, config.classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, 0.02) tokens and linears (head included), LeCun-normal patch embedding."""
        fan_in = self.config.channels * self.config.patch ** 2
        nn.init.normal_(self.patch_embed.weight, std=1.0 / math.sqrt(fan_in))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        for layer in self.layers:
            init_norm(layer.ln_1)
            init_norm(layer.ln_2)
            for linear in (layer.attn.qkv, layer.attn.proj, layer.fc1, layer.fc2):
                init_linear(linear)
        init_norm(self.norm)
        init_linear(self.head)

    def example_inputs(
        self, batch_size: int = 1, seq_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixels, labels)``; ``seq_len`` is ignored (the image size fixes the tokens)."""
        require_positive("vit", batch_size=batch_size)
        generator = default_generator(generator)
        device = model_device(self)
        c, s = self.config.channels, self.config.image
        pixels = random_floats((batch_size, c, s, s), device, generator)
        return pixels, random_ids((batch_size,), self.config.classes, device, generator)

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, patches, h)
        cls = self.cls_token.expand(x.size(0), -1, -1)  # (B, 1, h)
        x = self.drop(torch.cat((cls, x), dim=1) + self.pos_embed)  # (B, T, h)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.norm(x)[:, 0])  # (B, classes)
        if labels is None:
            return logits
        return F.cross_entropy(logits, labels)
