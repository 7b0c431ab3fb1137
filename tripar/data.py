"""Training data: a generated corpus, files read as tokens, deterministic batches.

Without data, ``tripar train`` reads a small generated corpus (``corpus``, one token per
character, ``CharTokenizer``). ``read_tokens`` reads a user's data as one token stream:
plain text (a file or a directory of files), a pre-tokenized token file (``.npy``, or a raw
``.bin`` of uint16/uint32 tokens, nanoGPT's convention), JSON lines with a text column, and
with the ``datasets`` extra a dataset saved with ``save_to_disk`` or parquet files. Text is
read as bytes (vocabulary 256) unless a local transformers tokenizer is given.
``TokenBatches`` cuts the stream into windows and deals them out in epochs: a seeded
permutation per epoch, so no window repeats within an epoch and ``batch(step)`` depends only
on the seed and the step (every rank draws the same global batch; each data-parallel rank
trains on its own rows of it).

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

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tripar.errors import ConfigError

__all__ = ["ByteTokenizer", "CharTokenizer", "TextBatches", "TokenBatches", "TokenSource",
           "corpus", "load_tokenizer", "read_tokens", "token_dtype"]

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


# ---- user data -----------------------------------------------------------------------------

TOKEN_SUFFIXES = (".npy", ".bin")
_RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True, slots=True)
class ByteTokenizer:
    """Text as its UTF-8 bytes: vocabulary 256, no files.

    >>> ByteTokenizer().encode_documents(["hé"]).tolist()
    [104, 195, 169]
    """

    vocab_size: int = 256

    def encode_documents(self, docs: Iterable[str]) -> np.ndarray:
        """The documents' bytes, one after another (uint8)."""
        return np.frombuffer("".join(docs).encode("utf-8"), dtype=np.uint8).copy()


class _HFTokenizer:
    """A local transformers tokenizer; documents are joined with its EOS token, if any."""

    def __init__(self, path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError("--tokenizer needs transformers: pip install 'tripar[hf]'"
                              ) from None
        if not Path(path).is_dir():
            raise ConfigError(f"--tokenizer {path}: not a directory (give a local transformers "
                              f"tokenizer directory, as save_pretrained writes)")
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError(f"--tokenizer {path}: transformers cannot load a tokenizer from "
                              f"it ({str(error)[:200]})") from None
        self.vocab_size = len(self.tok)
        self.path = path

    def encode_documents(self, docs: Iterable[str]) -> np.ndarray:
        eos = self.tok.eos_token_id
        out: list[int] = []
        for doc in docs:
            out.extend(self.tok(doc, add_special_tokens=False)["input_ids"])
            if eos is not None:
                out.append(eos)
        return np.asarray(out, dtype=token_dtype(None, self.vocab_size))


def load_tokenizer(path: str | None) -> ByteTokenizer | _HFTokenizer:
    """The tokenizer in the local directory ``path`` (transformers), or bytes when None."""
    return ByteTokenizer() if path is None else _HFTokenizer(path)


def token_dtype(name: str | None, vocab_size: int | None) -> np.dtype:
    """The dtype of a raw ``.bin`` token file: ``name`` (``uint16``/``uint32``) when given,
    else uint16 when the vocabulary fits in it (nanoGPT's convention), else uint32.

    >>> token_dtype(None, 50257), token_dtype(None, 128256), token_dtype("uint32", None)
    (dtype('uint16'), dtype('uint32'), dtype('uint32'))
    """
    if name is not None:
        if name not in ("uint16", "uint32"):
            raise ConfigError(f"--data-dtype must be uint16 or uint32, got {name!r}")
        return np.dtype(name)
    return np.dtype(np.uint16 if vocab_size is None or vocab_size <= 2**16 else np.uint32)


@dataclass(frozen=True)
class TokenSource:
    """A token stream read from ``--data``: the tokens (an array or a memmap), the
    vocabulary they index, and where they came from."""

    tokens: np.ndarray
    vocab_size: int
    description: str


def read_tokens(path: str, tokenizer: ByteTokenizer | _HFTokenizer | None = None, *,
                dtype: str | None = None, text_column: str = "text") -> TokenSource:
    """Read ``path`` as one token stream (see the module docstring for the formats).

    Token files are memory-mapped, not read; their vocabulary is the tokenizer's, or the
    largest token + 1. Text is encoded by ``tokenizer`` (bytes when None).
    """
    tok = tokenizer or ByteTokenizer()
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--data {path}: no such file or directory")
    if p.is_file() and p.suffix in TOKEN_SUFFIXES:
        given = tokenizer.vocab_size if tokenizer is not None else None
        if p.suffix == ".npy":
            tokens = np.load(p, mmap_mode="r", allow_pickle=False)
            if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
                raise ConfigError(f"--data {path}: a token file holds one row of integers, got "
                                  f"shape {tokens.shape} of {tokens.dtype}")
        else:
            dt = token_dtype(dtype, given)
            if p.stat().st_size % dt.itemsize:
                raise ConfigError(f"--data {path}: {p.stat().st_size} bytes is not a whole "
                                  f"number of {dt} tokens; give --data-dtype")
            tokens = np.memmap(p, dtype=dt, mode="r")
        if len(tokens) == 0:
            raise ConfigError(f"--data {path}: the token file is empty")
        top = int(tokens.max())
        if int(tokens.min()) < 0 or (given is not None and top >= given):
            raise ConfigError(f"--data {path}: tokens range over [{int(tokens.min())}, {top}], "
                              f"outside the tokenizer's vocabulary of {given}")
        return TokenSource(tokens, given or top + 1, f"{p} ({len(tokens)} tokens)")
    docs = _documents(p, text_column)
    tokens = tok.encode_documents(docs)
    if len(tokens) == 0:
        raise ConfigError(f"--data {path}: no text in it")
    return TokenSource(tokens, tok.vocab_size, f"{p} ({len(tokens)} tokens)")


def _documents(p: Path, column: str) -> list[str]:
    """The texts in a file or directory, one per file or record, in path order."""
    if p.is_dir() and any((p / name).is_file() for name in ("dataset_info.json",
                                                            "dataset_dict.json")):
        return _saved_dataset(p, column)
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise ConfigError(f"--data {p}: the directory holds no files")
    docs: list[str] = []
    for f in files:
        if f.suffix in TOKEN_SUFFIXES:
            raise ConfigError(f"--data {p}: token file {f.name} in a directory; give a token "
                              f"file by itself")
        if f.suffix in (".jsonl", ".json"):
            docs.extend(_jsonl(f, column))
        elif f.suffix == ".parquet":
            docs.extend(_parquet(f, column))
        else:
            try:
                docs.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError as error:
                raise ConfigError(f"--data: {f} is not UTF-8 text ({error.reason} at byte "
                                  f"{error.start}); give text, a token file (.npy, .bin) or "
                                  f"records (.jsonl, .parquet)") from None
    return docs


def _column(f: Any, records: Iterable[Any], column: str) -> list[str]:
    out = []
    for i, rec in enumerate(records):
        text = rec.get(column) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise ConfigError(f"--data: record {i} of {f} has no text column {column!r} "
                              f"(it has {keys}); give --text-column")
        out.append(text)
    return out


def _jsonl(f: Path, column: str) -> list[str]:
    records = []
    for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as error:
                raise ConfigError(f"--data: line {n} of {f} is not JSON ({error})") from None
    return _column(f, records, column)


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError("parquet files and saved datasets need the datasets extra: "
                          "pip install 'tripar[data]'") from None
    return datasets


def _parquet(f: Path, column: str) -> list[str]:
    ds = _datasets().load_dataset("parquet", data_files=str(f), split="train")
    return _column(f, ds, column)


def _saved_dataset(p: Path, column: str) -> list[str]:
    datasets = _datasets()
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"--data {p}: a dataset dict without a 'train' split "
                              f"(splits {sorted(ds)}); give one split's directory")
        ds = ds["train"]
    if column not in ds.column_names:
        raise ConfigError(f"--data {p}: the dataset has no text column {column!r} (it has "
                          f"{ds.column_names}); give --text-column")
    return list(ds[column])


@dataclass(frozen=True)
class TokenBatches:
    """A token stream cut into windows of ``seq_len + 1`` tokens (each window starts
    ``seq_len`` after the last), dealt out ``batch_size`` at a time in epochs.

    Epoch ``e`` is a permutation of the windows seeded by ``(seed, e)``; its last partial
    batch is dropped. ``batch(step)`` is ``(input_ids, targets)``, targets shifted by one,
    and depends only on the seed and ``step`` (the data position), so a resumed run
    continues where it stopped.

    >>> data = TokenBatches(np.arange(101), batch_size=2, seq_len=10, seed=0)
    >>> data.windows, data.steps_per_epoch
    (10, 5)
    >>> seen = [w for s in range(5) for w in data.indices(s)]
    >>> sorted(seen) == list(range(10))
    True
    """

    tokens: Any
    """1-D integer array, tensor or memmap."""
    batch_size: int
    seq_len: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1:
            raise ConfigError(f"batch_size and seq_len must be positive, got "
                              f"{self.batch_size} and {self.seq_len}")
        if self.steps_per_epoch < 1:
            raise ConfigError(f"the data has {len(self.tokens)} tokens: {self.windows} windows "
                              f"of seq_len + 1 = {self.seq_len + 1}, fewer than one batch of "
                              f"{self.batch_size}; give more data or a smaller --global-batch "
                              f"or --seq")

    @property
    def windows(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    @property
    def steps_per_epoch(self) -> int:
        return self.windows // self.batch_size

    def indices(self, step: int) -> list[int]:
        """The windows of batch ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = _epoch_order(self.seed, epoch, self.windows)
        return order[k * self.batch_size:(k + 1) * self.batch_size].tolist()

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for w in self.indices(step):
            start = w * self.seq_len
            window = np.array(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)
            rows.append(torch.from_numpy(window))  # a copy: memory maps are read-only
        windows = torch.stack(rows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def identity(self) -> dict[str, int | str]:
        """What a saved data position is valid for: the same stream (its length and a digest
        of its first and last 64K tokens), cut the same way."""
        ends = [np.array(part, dtype=np.int64).tobytes()
                for part in (self.tokens[:65536], self.tokens[-65536:])]
        return {"tokens": len(self.tokens), "digest": hashlib.sha1(b"".join(ends)).hexdigest(),
                "batch_size": self.batch_size, "seq_len": self.seq_len, "seed": self.seed}



@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, windows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(windows, generator=g)
