"""BERT encoder with a masked-language-model head.

Post-LayerNorm layers under ``layers.{i}`` with separate ``query``, ``key``,
``value`` projections; the MLM decoder's weight is the word-embedding matrix
(tied). ``forward(input_ids, attention_mask, labels=None)``: the mask (1 keep,
0 pad) becomes an additive bias on the attention scores; labels of -100 are
ignored by the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tripar.models._common import (
    check_seq_len,
    default_generator,
    init_linear,
    init_norm,
    model_device,
    random_ids,
    require_divisible,
    require_positive,
    require_probability,
)

MASK_BIAS = -10000.0
"""Added to the attention scores of padded keys (BERT's value)."""
IGNORE_INDEX = -100


@dataclass(frozen=True, slots=True)
class BertConfig:
    """Sizes of a BERT model; every field is a key of the ``bert:`` MODEL spec."""

    layers: int = 2
    """Number of encoder layers."""
    hidden: int = 64
    """Hidden size; a multiple of ``heads``."""
    heads: int = 4
    """Attention heads."""
    vocab: int = 128
    """Vocabulary size."""
    seq: int = 32
    """Maximum sequence length (rows of the position table)."""
    ffn: int | None = None
    """Intermediate width; ``None`` means ``4 * hidden``."""
    type_vocab: int = 2
    """Token-type (segment) vocabulary; every example token has type 0."""
    dropout: float = 0.0
    """Dropout after embeddings, attention probabilities and sub-layers."""
    norm_eps: float = 1e-12
    """LayerNorm epsilon."""

    def __post_init__(self) -> None:
        if self.ffn is None:
            object.__setattr__(self, "ffn", 4 * self.hidden)
        require_positive("bert", layers=self.layers, hidden=self.hidden, heads=self.heads,
                         vocab=self.vocab, seq=self.seq, ffn=self.ffn,
                         type_vocab=self.type_vocab)
        require_divisible("bert", "hidden", self.hidden, "heads", self.heads)
        require_probability("bert", "dropout", self.dropout)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def sizes(self) -> dict[str, int]:
        """The sizes the planner reads (``LoadedModel.config``)."""
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.heads, "head_dim": self.head_dim, "vocab": self.vocab,
                "seq": self.seq, "ffn": self.ffn}


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab, config.hidden)
        self.position_embeddings = nn.Embedding(config.seq, config.hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.size(1)
        pos = torch.arange(T, dtype=torch.long, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)
        x = x + self.token_type_embeddings.weight[0]  # every token is segment 0
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Bidirectional multi-head attention with an additive padding mask."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.n_head = config.heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.query = nn.Linear(config.hidden, config.hidden)
        self.key = nn.Linear(config.hidden, config.hidden)
        self.value = nn.Linear(config.hidden, config.hidden)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q = self.query(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.key(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.value(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(  # mask_bias: (B, 1, 1, T)
            q, k, v, attn_mask=mask_bias, dropout_p=self.dropout if self.training else 0.0
        )
        return y.transpose(1, 2).contiguous().view(B, T, C)


class BertLayer(nn.Module):
    """Post-LayerNorm encoder layer (attention, then intermediate/output MLP)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertSelfAttention(config)
        self.attention_output = nn.Linear(config.hidden, config.hidden)
        self.attention_norm = nn.LayerNorm(config.hidden, eps=config.norm_eps)
        self.intermediate = nn.Linear(config.hidden, config.ffn)
        self.output = nn.Linear(config.ffn, config.hidden)
        self.output_norm = nn.LayerNorm(config.hidden, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        a = self.dropout(self.attention_output(self.attention(x, mask_bias)))
        x = self.attention_norm(x + a)
        m = self.dropout(self.output(F.gelu(self.intermediate(x))))
        return self.output_norm(x + m)


class BertMLMHead(nn.Module):
    """Transform (dense, GELU, LayerNorm) and a decoder tied to the word embeddings."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = nn.Linear(config.hidden, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.norm_eps)
        self.decoder = nn.Linear(config.hidden, config.vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(F.gelu(self.transform(x))))


class Bert(nn.Module):
    """BERT for masked language modelling."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.layers))
        self.mlm = BertMLMHead(config)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Make the MLM decoder's weight the word embeddings again (``to_empty`` unties it)."""
        self.mlm.decoder.weight = self.embeddings.word_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
        self.tie_weights()
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.mlm.decoder:
                init_linear(module)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                init_norm(module)
        nn.init.zeros_(self.mlm.decoder.bias)

    def example_inputs(
        self, batch_size: int = 1, seq_len: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, labels)``: 15% of positions are predicted.

        The last quarter of every other sample is padding (mask 0).
        """
        seq_len = self.config.seq if seq_len is None else seq_len
        check_seq_len("bert", seq_len, self.config.seq)
        require_positive("bert", batch_size=batch_size)
        generator = default_generator(generator)
        device = model_device(self)
        shape = (batch_size, seq_len)
        ids = random_ids(shape, self.config.vocab, device, generator)
        if device.type == "meta":
            return ids, torch.empty(shape, dtype=torch.long, device=device), ids.clone()
        mask = torch.ones(shape, dtype=torch.long)
        mask[1::2, seq_len - seq_len // 4:] = 0
        chosen = torch.rand(shape, generator=generator) < 0.15
        chosen[:, 0] = True  # at least one predicted token per sample
        labels = torch.where(chosen & mask.bool(), ids.cpu(), IGNORE_INDEX)
        return ids, mask.to(device), labels.to(device)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids)  # (B, T, h)
        keep = attention_mask[:, None, None, :].to(x.dtype)  # (B, 1, 1, T)
        mask_bias = (1.0 - keep) * MASK_BIAS
        for layer in self.layers:
            x = layer(x, mask_bias)
        logits = self.mlm(x)  # (B, T, V)
        if labels is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1),
                               ignore_index=IGNORE_INDEX)
