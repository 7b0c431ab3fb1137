"""T5-style encoder-decoder: RMS norms, relative position bias, cross-attention.

Encoder layers live under ``encoder.layers.{i}``, decoder layers under
``decoder.layers.{i}``; the token embedding ``shared`` feeds both stacks, the
LM head is untied (T5 v1.1). Each stack computes its bucketed relative
position bias once (``relative_attention_bias``) and every self-attention
adds it; like T5, attention scores are not scaled by 1/sqrt(head_dim).
``forward(input_ids, decoder_input_ids, labels=None)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tripar.models._common import (
    check_seq_len,
    default_generator,
    model_device,
    random_ids,
    require_divisible,
    require_positive,
    require_probability,
)
from tripar.models.llama import RMSNorm

CAUSAL_BIAS = -1e9


@dataclass(frozen=True, slots=True)
class T5Config:
    """Sizes of a T5 model; every field is a key of the ``t5:`` MODEL spec."""

    layers: int = 2
    """Layers of each stack, unless ``enc_layers`` / ``dec_layers`` say otherwise."""
    enc_layers: int | None = None
    """Encoder layers; ``None`` means ``layers``."""
    dec_layers: int | None = None
    """Decoder layers; ``None`` means ``layers``."""
    hidden: int = 64
    """Hidden size (d_model); a multiple of ``heads``."""
    heads: int = 4
    """Attention heads."""
    ffn: int | None = None
    """Feed-forward width (d_ff); ``None`` means ``4 * hidden``."""
    vocab: int = 128
    """Vocabulary size."""
    seq: int = 32
    """Sequence length of the example encoder and decoder inputs."""
    buckets: int = 32
    """Relative position buckets."""
    max_distance: int = 128
    """Distance beyond which relative positions share the last bucket."""
    dropout: float = 0.0
    """Dropout after sub-layers."""

    def __post_init__(self) -> None:
        for key in ("enc_layers", "dec_layers"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, self.layers)
        if self.ffn is None:
            object.__setattr__(self, "ffn", 4 * self.hidden)
        require_positive("t5", layers=self.layers, enc_layers=self.enc_layers,
                         dec_layers=self.dec_layers, hidden=self.hidden, heads=self.heads,
                         ffn=self.ffn, vocab=self.vocab, seq=self.seq, buckets=self.buckets,
                         max_distance=self.max_distance)
        require_divisible("t5", "hidden", self.hidden, "heads", self.heads)
        require_probability("t5", "dropout", self.dropout)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def sizes(self) -> dict[str, int]:
        """The sizes the planner reads; ``layers`` counts both stacks."""
        return {"layers": self.enc_layers + self.dec_layers, "enc_layers": self.enc_layers,
                "dec_layers": self.dec_layers, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.heads, "head_dim": self.head_dim, "vocab": self.vocab,
                "seq": self.seq, "ffn": self.ffn}


def relative_position_bucket(
    relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucketing of ``key - query`` offsets: exact for small ones, log-spaced beyond."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        bucket = bucket + (relative > 0).long() * buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    exact = buckets // 2
    is_small = relative < exact
    scaled = torch.log(relative.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = exact + (scaled * (buckets - exact)).long()
    large = torch.clamp(large, max=buckets - 1)
    return bucket + torch.where(is_small, relative, large)


class T5Attention(nn.Module):
    """Multi-head attention (self or cross) with separate q/k/v/o projections, no biases."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.n_head = config.heads
        self.head_dim = config.head_dim
        self.q = nn.Linear(config.hidden, config.hidden, bias=False)
        self.k = nn.Linear(config.hidden, config.hidden, bias=False)
        self.v = nn.Linear(config.hidden, config.hidden, bias=False)
        self.o = nn.Linear(config.hidden, config.hidden, bias=False)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        S = memory.size(1)
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(memory).view(B, S, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v(memory).view(B, S, self.n_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(y.transpose(1, 2).contiguous().view(B, T, C))


class T5FeedForward(nn.Module):
    """``wo(relu(wi(x)))``."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.wi = nn.Linear(config.hidden, config.ffn, bias=False)
        self.wo = nn.Linear(config.ffn, config.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)))


class T5Layer(nn.Module):
    """Pre-norm layer: self-attention, (decoder only) cross-attention, feed-forward."""

    def __init__(self, config: T5Config, cross: bool) -> None:
        super().__init__()
        self.self_norm = RMSNorm(config.hidden, 1e-6)
        self.self_attn = T5Attention(config)
        self.cross_norm = RMSNorm(config.hidden, 1e-6) if cross else None
        self.cross_attn = T5Attention(config) if cross else None
        self.ff_norm = RMSNorm(config.hidden, 1e-6)
        self.ff = T5FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, memory: torch.Tensor | None = None,
        memory_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.self_norm(x)
        x = x + self.dropout(self.self_attn(h, h, bias))
        if self.cross_attn is not None:
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), memory, memory_bias))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class T5Stack(nn.Module):
    """A stack of layers with one shared relative position bias and a final norm."""

    def __init__(self, config: T5Config, num_layers: int, decoder: bool) -> None:
        super().__init__()
        self.decoder = decoder
        self.buckets = config.buckets
        self.max_distance = config.max_distance
        self.relative_attention_bias = nn.Embedding(config.buckets, config.heads)
        self.layers = nn.ModuleList(T5Layer(config, decoder) for _ in range(num_layers))
        self.final_norm = RMSNorm(config.hidden, 1e-6)
        self.dropout = nn.Dropout(config.dropout)

    def position_bias(self, x: torch.Tensor) -> torch.Tensor:
        """(1, nh, T, T) bias; the decoder's also masks future keys."""
        T = x.size(1)
        pos = torch.arange(T, dtype=torch.long, device=x.device)
        relative = pos[None, :] - pos[:, None]  # (T, T): key - query
        bucket = relative_position_bucket(relative, not self.decoder, self.buckets,
                                          self.max_distance)
        bias = self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)
        if self.decoder:
            bias = bias + (relative > 0).to(bias.dtype) * CAUSAL_BIAS
        return bias

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.position_bias(x)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, bias, memory, None)
        return self.dropout(self.final_norm(x))


class T5(nn.Module):
    """Encoder-decoder language model; returns the decoder's loss or logits (B, T, V)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab, config.hidden)
        self.encoder = T5Stack(config, config.enc_layers, decoder=False)
        self.decoder = T5Stack(config, config.dec_layers, decoder=True)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """T5's initialisation (Mesh TensorFlow): fan-in scaled normals, unit norms."""
        h, d, ff = self.config.hidden, self.config.head_dim, self.config.ffn
        nn.init.normal_(self.shared.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=h ** -0.5)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, T5Attention):
                nn.init.normal_(module.q.weight, std=(h * d) ** -0.5)
                for linear in (module.k, module.v):
                    nn.init.normal_(linear.weight, std=h ** -0.5)
                nn.init.normal_(module.o.weight, std=h ** -0.5)
            elif isinstance(module, T5FeedForward):
                nn.init.normal_(module.wi.weight, std=h ** -0.5)
                nn.init.normal_(module.wo.weight, std=ff ** -0.5)
            elif isinstance(module, T5Stack):
                nn.init.normal_(module.relative_attention_bias.weight, std=h ** -0.5)

    def example_inputs(
        self, batch_size: int = 1, seq_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, decoder_input_ids, labels)``, each (batch_size, seq_len)."""
        seq_len = self.config.seq if seq_len is None else seq_len
        check_seq_len("t5", seq_len, self.config.seq)
        require_positive("t5", batch_size=batch_size)
        generator = default_generator(generator)
        device = model_device(self)
        input_ids = random_ids((batch_size, seq_len), self.config.vocab, device, generator)
        target = random_ids((batch_size, seq_len + 1), self.config.vocab, device, generator)
        return input_ids, target[:, :-1].contiguous(), target[:, 1:].contiguous()

    def forward(
        self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        memory = self.encoder(self.shared(input_ids))  # (B, S, h)
        x = self.decoder(self.shared(decoder_input_ids), memory)  # (B, T, h)
        logits = self.lm_head(x)  # (B, T, V)
        if labels is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))
