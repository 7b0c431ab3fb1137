"""tripar.data: reading text, token files and records as one token stream; epoch batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tripar.data import (
    ByteTokenizer,
    CharTokenizer,
    TokenBatches,
    corpus,
    load_tokenizer,
    read_tokens,
    token_dtype,
)
from tripar.errors import ConfigError


def test_text_file_and_directory_read_as_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("héllo\n", encoding="utf-8")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "2.txt").write_text("two")
    (tmp_path / "docs" / "1.txt").write_text("one ")
    (tmp_path / "docs" / ".hidden").write_text("never")
    src = read_tokens(str(tmp_path / "a.txt"))
    assert src.vocab_size == 256 and bytes(src.tokens.tolist()) == "héllo\n".encode()
    assert bytes(read_tokens(str(tmp_path / "docs")).tokens.tolist()) == b"one two"


@pytest.mark.parametrize("suffix, dtype", [(".npy", np.int32), (".bin", np.uint16),
                                           (".bin", np.uint32)])
def test_token_files_are_memory_mapped(tmp_path, suffix, dtype):
    tokens = np.arange(1000, dtype=dtype) % 77
    path = tmp_path / f"tokens{suffix}"
    if suffix == ".npy":
        np.save(path, tokens)
    else:
        tokens.tofile(path)
    src = read_tokens(str(path), dtype=None if dtype == np.uint16 else np.dtype(dtype).name)
    assert isinstance(src.tokens, np.memmap)
    assert src.vocab_size == 77 and np.array_equal(src.tokens, tokens)


def test_token_dtype_follows_the_vocabulary_and_bad_files_are_refused(tmp_path):
    assert token_dtype(None, None) == np.uint16 and token_dtype(None, 2**16 + 1) == np.uint32
    with pytest.raises(ConfigError, match="--data-dtype must be"):
        token_dtype("int8", None)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ConfigError, match="not a whole number of uint16 tokens"):
        read_tokens(str(tmp_path / "odd.bin"))
    np.save(tmp_path / "m.npy", np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ConfigError, match="one row of integers"):
        read_tokens(str(tmp_path / "m.npy"))
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_tokens(str(tmp_path / "b.txt"))
    with pytest.raises(ConfigError, match="no such file"):
        read_tokens(str(tmp_path / "missing"))


def test_jsonl_records_read_their_text_column(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"text": "ab", "id": 1}) + "\n\n"
                    + json.dumps({"text": "c", "id": 2}) + "\n")
    assert bytes(read_tokens(str(path)).tokens.tolist()) == b"abc"
    with pytest.raises(ConfigError, match="no text column 'body'.*give --text-column"):
        read_tokens(str(path), text_column="body")


def test_saved_datasets_and_parquet_read_with_the_datasets_extra(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["one ", "two"], "n": [1, 2]})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "p.parquet"))
    for name in ("saved", "dict", "p.parquet"):
        assert bytes(read_tokens(str(tmp_path / name)).tokens.tolist()) == b"one two", name


def test_a_transformers_tokenizer_joins_documents_with_eos(tmp_path):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3}
    model = tokenizers.models.WordLevel(vocab, unk_token="[UNK]")
    raw = tokenizers.Tokenizer(model)
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>"
                            ).save_pretrained(tmp_path / "tok")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.txt").write_text("hello world")
    (tmp_path / "d" / "2.txt").write_text("world")
    tok = load_tokenizer(str(tmp_path / "tok"))
    src = read_tokens(str(tmp_path / "d"), tok)
    assert src.vocab_size == 4 and src.tokens.tolist() == [2, 3, 1, 3, 1]
    with pytest.raises(ConfigError, match="not a directory"):
        load_tokenizer(str(tmp_path / "d" / "1.txt"))


def test_batches_cover_every_window_once_per_epoch_deterministically():
    data = TokenBatches(np.arange(10 * 8 + 1), batch_size=3, seq_len=8, seed=5)
    assert data.windows == 10 and data.steps_per_epoch == 3  # the 10th window waits
    for epoch in range(2):
        seen = [w for s in range(3 * epoch, 3 * epoch + 3) for w in data.indices(s)]
        assert len(set(seen)) == 9
    assert data.indices(0) != data.indices(3)  # each epoch its own order
    again = TokenBatches(np.arange(10 * 8 + 1), batch_size=3, seq_len=8, seed=5)
    ids, targets = data.batch(4)
    assert torch.equal(ids, again.batch(4)[0]) and ids.dtype == torch.long
    assert torch.equal(ids[:, 1:], targets[:, :-1])
    assert torch.equal(ids[:, 0] // 8, torch.tensor(data.indices(4)))
    assert data.indices(0) != TokenBatches(np.arange(81), 3, 8, seed=6).indices(0)


def test_too_little_data_for_one_batch_is_refused():
    with pytest.raises(ConfigError, match="fewer than one batch of 4"):
        TokenBatches(np.arange(20), batch_size=4, seq_len=8)


def test_the_generated_corpus_and_byte_tokenizer():
    text = corpus(5)
    assert CharTokenizer.from_text(text).decode(CharTokenizer.from_text(text).encode(text)) == text
    assert ByteTokenizer().encode_documents(["a", "b"]).tolist() == [97, 98]


def test_identity_names_the_stream_and_how_it_is_cut():
    a = TokenBatches(np.arange(200) % 50, batch_size=2, seq_len=8, seed=0)
    assert a.identity() == TokenBatches(np.arange(200) % 50, 2, 8, seed=0).identity()
    for other in (TokenBatches(np.arange(200) % 49, 2, 8, seed=0),  # same length, other tokens
                  TokenBatches(np.arange(200) % 50, 2, 8, seed=1),
                  TokenBatches(np.arange(200) % 50, 4, 8, seed=0)):
        assert other.identity() != a.identity()
