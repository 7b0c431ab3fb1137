"""BERT: tied MLM decoder, padding mask, ignored labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tripar.models.bert import Bert, BertConfig
from tripar.models.spec import load_model


def small() -> Bert:
    torch.manual_seed(0)
    return Bert(BertConfig(layers=2, hidden=32, heads=4, vocab=40, seq=10)).eval()


def test_decoder_tied_to_word_embeddings():
    model = small()
    assert model.mlm.decoder.weight is model.embeddings.word_embeddings.weight
    with torch.device("meta"):
        meta = Bert(BertConfig())
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert meta.mlm.decoder.weight is meta.embeddings.word_embeddings.weight
    assert "layers.1.attention.query.weight" in dict(model.named_parameters())


def test_padding_mask_hides_padded_keys():
    model = small()
    ids = torch.randint(0, 40, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 7:] = 0
    other = ids.clone()
    other[0, 7:] = (other[0, 7:] + 3) % 40  # change only padded tokens
    torch.testing.assert_close(model(ids, mask)[:, :7], model(other, mask)[:, :7])
    full = torch.ones_like(mask)
    assert not torch.allclose(model(ids, full)[:, :7], model(other, full)[:, :7])


def test_labels_of_minus_100_are_ignored():
    model = small()
    ids = torch.randint(0, 40, (2, 10))
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    logits = model(ids, mask)
    expected = F.cross_entropy(logits[:, 2], ids[:, 2])
    torch.testing.assert_close(model(ids, mask, labels), expected)


def test_example_inputs_mask_and_labels():
    loaded = load_model("bert:layers=1,hidden=16,heads=2,vocab=30,seq=8", batch_size=2)
    ids, mask, labels = loaded.example_inputs
    assert ids.shape == mask.shape == labels.shape == (2, 8)
    assert int(mask[1].sum()) == 6 and int(mask[0].sum()) == 8
    predicted = labels != -100
    assert predicted[:, 0].all()
    assert torch.equal(labels[predicted], ids[predicted])
    assert not predicted[mask == 0].any()
