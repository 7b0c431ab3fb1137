"""A small text corpus, generated, a character tokenizer and deterministic batches.

The corpus is English-like sentences drawn from a tiny grammar, so a small model
learns its spelling and word order within a few hundred steps and the loss falls
visibly (from about ln(vocabulary) towards about 1 nat per character); nothing is
downloaded and nothing is stored.

>>> text = corpus(sentences=3, seed=0)
>>> tok = CharTokenizer.from_text(text)
>>> tok.decode(tok.encode(text)) == text, tok.vocab_size < 40
(True, True)
>>> ids, targets = TextBatches(tok.encode(text), batch_size=2, seq_len=8).batch(0)
>>> ids.shape, torch.equal(ids[:, 1:], targets[:, :-1])
(torch.Size([2, 8]), True)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tripar.errors import ConfigError

__all__ = ["CharTokenizer", "TextBatches", "corpus"]

_SUBJECTS = ("the cat", "a dog", "the old man", "my sister", "the bird", "a child",
             "the teacher", "our neighbour", "the farmer", "a young girl")
_VERBS = ("sees", "likes", "finds", "follows", "paints", "calls", "helps", "watches",
          "carries", "remembers")
_OBJECTS = ("the red ball", "a small house", "the river", "a green tree", "the moon",
            "an apple", "the garden", "a long letter", "the blue door", "a quiet song")
_PLACES = ("in the morning", "at night", "by the sea", "after school", "in the park",
           "every day", "near the hill", "before dinner")


def corpus(sentences: int = 4000, *, seed: int = 0) -> str:
    """``sentences`` generated sentences, one per line (about 45 characters each)."""
    if sentences < 1:
        raise ConfigError(f"the corpus needs at least one sentence, got {sentences}")
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        if rng.random() < 0.7:
            words.append(rng.choice(_PLACES))
        sentence = " ".join(words)
        lines.append(sentence[0].upper() + sentence[1:] + ".")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class CharTokenizer:
    """One token per character of a fixed alphabet."""

    alphabet: str

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The tokenizer of ``text``'s characters, sorted."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` (int64); raises ConfigError for an unknown character."""
        index = {c: i for i, c in enumerate(self.alphabet)}
        try:
            return torch.tensor([index[c] for c in text], dtype=torch.long)
        except KeyError as error:
            raise ConfigError(f"character {error.args[0]!r} is not in the tokenizer's "
                              f"alphabet {self.alphabet!r}") from None

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.alphabet[int(i)] for i in ids)


@dataclass(frozen=True)
class TextBatches:
    """Random windows of a token stream: ``(input_ids, targets)``, targets shifted by one.

    ``batch(step)`` depends only on the seed and the step, so every rank of a job draws
    the same global batch without communicating.
    """

    tokens: torch.Tensor
    batch_size: int
    seq_len: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1 or len(self.tokens) <= self.seq_len + 1:
            raise ConfigError(f"the token stream ({len(self.tokens)} tokens) must be longer "
                              f"than seq_len + 1 = {self.seq_len + 1}")
        if self.batch_size < 1 or self.seq_len < 1:
            raise ConfigError(f"batch_size and seq_len must be positive, got "
                              f"{self.batch_size} and {self.seq_len}")

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,),
                               generator=g)
        windows = torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
