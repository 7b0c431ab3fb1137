"""T5: relative position buckets, decoder causality, encoder-decoder wiring."""

from __future__ import annotations

import torch

from tripar.models.t5 import T5, T5Config, relative_position_bucket


def test_relative_buckets():
    rel = torch.arange(-200, 201)
    causal = relative_position_bucket(rel, bidirectional=False, buckets=32, max_distance=128)
    assert torch.equal(causal[rel >= 0], torch.zeros(201, dtype=torch.long))  # future: bucket 0
    assert torch.equal(causal[200 - 15:200], torch.arange(15, 0, -1))  # exact up close
    assert int(causal.max()) == 31 and int(causal[0]) == 31  # far past shares the last bucket
    both = relative_position_bucket(rel, bidirectional=True, buckets=32, max_distance=128)
    assert int(both.min()) == 0 and int(both.max()) == 31
    assert torch.equal(both[rel > 0] >= 16, torch.ones(200, dtype=torch.bool))
    assert (torch.diff(causal[rel <= 0]) <= 0).all()  # monotone in distance


def test_layers_key_and_stacks():
    config = T5Config(layers=3, dec_layers=1, hidden=32, heads=4, vocab=20, seq=6)
    assert (config.enc_layers, config.dec_layers) == (3, 1)
    model = T5(config)
    assert len(model.encoder.layers) == 3 and len(model.decoder.layers) == 1
    assert model.decoder.layers[0].cross_attn is not None
    assert model.encoder.layers[0].cross_attn is None


def test_decoder_is_causal_and_reads_the_encoder():
    torch.manual_seed(0)
    model = T5(T5Config(layers=1, hidden=32, heads=4, vocab=20, seq=6)).eval()
    src = torch.randint(0, 20, (1, 6))
    tgt = torch.randint(0, 20, (1, 6))
    logits = model(src, tgt)
    assert logits.shape == (1, 6, 20)
    later = tgt.clone()
    later[0, 4] = (later[0, 4] + 1) % 20
    torch.testing.assert_close(model(src, later)[:, :4], logits[:, :4])
    other_src = (src + 1) % 20
    assert not torch.allclose(model(other_src, tgt)[:, 0], logits[:, 0])
