"""The proxy graph's own arithmetic: model FLOPs per sample."""

from __future__ import annotations

import pytest

from tripar.graph import analyze
from tripar.models import load_model


def test_flops_per_sample_is_forward_and_backward_over_the_batch() -> None:
    loaded = load_model("gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8", batch_size=4,
                        device="meta")
    graph = analyze(loaded.model, loaded.example_inputs)
    total = sum(b.forward_flops + b.backward_flops for b in graph.blocks)
    assert graph.flops_per_sample == total / 4
    # the 72*B*s*l*h^2-style count of a transformer is dominated by its matmuls: with
    # backward = 2x forward, the per-sample FLOPs are about 3x a forward pass
    forward = sum(b.forward_flops for b in graph.blocks) / 4
    assert graph.flops_per_sample == pytest.approx(3 * forward, rel=0.1)
