"""GPT-2/3 style decoder: learned positions, pre-LayerNorm blocks, tied LM head.

Parameter names follow nanoGPT / Hugging Face GPT-2 (``wte``, ``wpe``,
``blocks.{i}.attn.c_attn``, ``mlp.c_fc``, ``ln_f``, ``lm_head``), so the graph
layer sees the fused QKV projection and the column -> row MLP pair it knows.
With ``ffn = 4 * hidden`` the parameter count is
``12 l h^2 + 13 l h + (V + s) h + 2 h`` (Megatron's formula plus the final
LayerNorm), the tied LM head counted once.
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
    init_norm,
    model_device,
    random_ids,
    require_attention,
    require_divisible,
    require_positive,
    require_probability,
)


@dataclass(frozen=True, slots=True)
class GPTConfig:
    """Sizes of a GPT model; every field is a key of the ``gpt:`` MODEL spec."""

    layers: int = 2
    """Number of transformer blocks (l)."""
    hidden: int = 64
    """Hidden size (h); a multiple of ``heads``."""
    heads: int = 4
    """Attention heads (a)."""
    vocab: int = 128
    """Vocabulary size (V)."""
    seq: int = 32
    """Maximum sequence length: rows of the learned position table (s)."""
    ffn: int | None = None
    """MLP width; ``None`` means ``4 * hidden``."""
    dropout: float = 0.0
    """Dropout probability after embeddings, attention and MLP (0 disables)."""
    attention: str = "sdpa"
    """``sdpa`` (PyTorch's fused kernel) or ``eager`` (scores, mask, softmax, dropout and the
    product with v written out, as Megatron-LM without a fused kernel runs them)."""

    def __post_init__(self) -> None:
        require_positive("gpt", layers=self.layers, hidden=self.hidden, heads=self.heads,
                         vocab=self.vocab, seq=self.seq)
        require_divisible("gpt", "hidden", self.hidden, "heads", self.heads)
        if self.ffn is None:
            object.__setattr__(self, "ffn", 4 * self.hidden)
        require_positive("gpt", ffn=self.ffn)
        require_probability("gpt", "dropout", self.dropout)
        require_attention("gpt", self.attention)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def sizes(self) -> dict[str, int]:
        """The sizes the planner reads (``LoadedModel.config``)."""
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.heads, "head_dim": self.head_dim, "vocab": self.vocab,
                "seq": self.seq, "ffn": self.ffn}


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with a fused QKV projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.hidden = config.hidden
        self.n_head = config.heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.eager = config.attention == "eager"
        self.c_attn = nn.Linear(config.hidden, 3 * config.hidden)
        self.c_proj = nn.Linear(config.hidden, config.hidden)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # (B, T, h)
        qkv = self.c_attn(x)  # (B, T, 3h)
        q, k, v = qkv.split(self.hidden, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if self.eager:
            y = self.attn_dropout(causal_softmax(q, k)) @ v
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """``c_fc`` -> GELU -> ``c_proj``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden, config.ffn)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(config.ffn, config.hidden)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT language model; ``forward(input_ids, targets=None)``.

    Returns the mean cross-entropy loss when ``targets`` (B, T) are given,
    otherwise the logits (B, T, V).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab, config.hidden)
        self.wpe = nn.Embedding(config.seq, config.hidden)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.init_weights()

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the embedding matrix again (``to_empty`` unties it)."""
        self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 l)."""
        self.tie_weights()
        residual_std = 0.02 / math.sqrt(2 * self.config.layers)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)
        for block in self.blocks:
            init_norm(block.ln_1)
            init_norm(block.ln_2)
            init_linear(block.attn.c_attn)
            init_linear(block.attn.c_proj, residual_std)
            init_linear(block.mlp.c_fc)
            init_linear(block.mlp.c_proj, residual_std)
        init_norm(self.ln_f)

    def example_inputs(
        self, batch_size: int = 1, seq_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, targets)`` of shape (batch_size, seq_len), on the model's device."""
        seq_len = self.config.seq if seq_len is None else seq_len
        check_seq_len("gpt", seq_len, self.config.seq)
        require_positive("gpt", batch_size=batch_size)
        generator = default_generator(generator)
        device = model_device(self)
        ids = random_ids((batch_size, seq_len + 1), self.config.vocab, device, generator)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        T = input_ids.size(1)
        pos = torch.arange(T, dtype=torch.long, device=input_ids.device)  # (T,)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))  # (B, T, h)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
