"""Llama-style decoder: RMSNorm, rotary positions, SwiGLU, grouped-query attention.

Layers live under ``layers.{i}`` with ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj`` (Hugging Face names); the LM head is untied. The
rotary cos/sin tables are non-persistent buffers computed with plain tensor
ops, so they exist (empty) on the meta device and ``init_weights()`` fills
them after ``to_empty``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tripar.models._common import (
    causal_softmax,
    check_seq_len,
    default_generator,
    init_linear,
    llama_ffn,
    model_device,
    random_ids,
    require_attention,
    require_divisible,
    require_positive,
)


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    """Sizes of a Llama model; every field is a key of the ``llama:`` MODEL spec."""

    layers: int = 2
    """Number of decoder layers."""
    hidden: int = 64
    """Hidden size; a multiple of ``heads``."""
    heads: int = 4
    """Query heads."""
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention); must divide ``heads``. ``None``: ``heads``."""
    vocab: int = 128
    """Vocabulary size."""
    seq: int = 32
    """Maximum sequence length (rows of the rotary tables)."""
    ffn: int | None = None
    """SwiGLU width; ``None``: 8/3 * hidden rounded up to a multiple of 256 (Llama's rule)."""
    rope_theta: float = 10000.0
    """Rotary base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    attention: str = "sdpa"
    """``sdpa`` (PyTorch's fused kernel) or ``eager`` (the scores and softmax written out)."""

    def __post_init__(self) -> None:
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.ffn is None:
            object.__setattr__(self, "ffn", llama_ffn(self.hidden))
        require_positive("llama", layers=self.layers, hidden=self.hidden, heads=self.heads,
                         kv_heads=self.kv_heads, vocab=self.vocab, seq=self.seq, ffn=self.ffn)
        require_divisible("llama", "hidden", self.hidden, "heads", self.heads)
        require_divisible("llama", "heads", self.heads, "kv_heads", self.kv_heads)
        require_divisible("llama", "head_dim", self.head_dim, "2 (rotary pairs)", 2)
        require_attention("llama", self.attention)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def sizes(self) -> dict[str, int]:
        """The sizes the planner reads (``LoadedModel.config``)."""
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim, "vocab": self.vocab,
                "seq": self.seq, "ffn": self.ffn}


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale and no bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """Precomputed rotary cos/sin tables of shape (seq, head_dim)."""

    def __init__(self, head_dim: int, seq: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.seq = seq
        self.theta = theta
        self.register_buffer("cos", torch.empty(seq, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(seq, head_dim), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fill the tables on the buffers' own device (a no-op on meta)."""
        device = self.cos.device
        half = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (self.theta ** (half / self.head_dim))  # (hd/2,)
        t = torch.arange(self.seq, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (seq, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (seq, hd)
        self.cos.copy_(emb.cos())
        self.sin.copy_(emb.sin())

    def forward(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos.narrow(0, 0, T), self.sin.narrow(0, 0, T)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hd) by tables of shape (T, hd)."""
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    """Grouped-query causal attention with rotary positions."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_head = config.heads
        self.n_kv_head = config.kv_heads
        self.n_rep = config.heads // config.kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden, config.heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden, config.kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden, config.kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.heads * config.head_dim, config.hidden, bias=False)
        self.eager = config.attention == "eager"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, nh|nkv, T, hd)
        k = k.repeat_interleave(self.n_rep, dim=1)  # (B, nh, T, hd)
        v = v.repeat_interleave(self.n_rep, dim=1)
        if self.eager:
            y = causal_softmax(q, k) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden, config.ffn, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.ffn, bias=False)
        self.down_proj = nn.Linear(config.ffn, config.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-RMSNorm decoder layer."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden, config.norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden, config.norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Llama language model; ``forward(input_ids, targets=None)`` -> loss or logits."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab, config.hidden)
        self.rotary = RotaryEmbedding(config.head_dim, config.seq, config.rope_theta)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, 0.02) weights, output projections scaled by 1/sqrt(2 l); rotary tables."""
        residual_std = 0.02 / math.sqrt(2 * self.config.layers)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        self.rotary.reset_parameters()
        for layer in self.layers:
            layer.input_layernorm.reset_parameters()
            layer.post_attention_layernorm.reset_parameters()
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                init_linear(linear)
            init_linear(attn.o_proj, residual_std)
            init_linear(mlp.down_proj, residual_std)
        self.norm.reset_parameters()
        init_linear(self.lm_head)

    def example_inputs(
        self, batch_size: int = 1, seq_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, targets)`` of shape (batch_size, seq_len), on the model's device."""
        seq_len = self.config.seq if seq_len is None else seq_len
        check_seq_len("llama", seq_len, self.config.seq)
        require_positive("llama", batch_size=batch_size)
        device = model_device(self)
        ids = random_ids((batch_size, seq_len + 1), self.config.vocab, device,
                         default_generator(generator))
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        T = input_ids.size(1)
        cos, sin = self.rotary(T)  # (T, hd) each
        x = self.embed_tokens(input_ids)  # (B, T, h)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
