"""tripar.graph.replay: a replayed block's nodes get the numbers running it would give."""

from __future__ import annotations

import pytest
import torch

from tripar.graph.annotate import annotate
from tripar.graph.capture import capture
from tripar.models.spec import load_model


def _infos(gm: torch.fx.GraphModule) -> dict:
    return {n.name: n.meta["tripar"] for n in gm.graph.nodes}


@pytest.mark.parametrize("spec", [
    "gpt:layers=4,hidden=32,heads=2,vocab=64,seq=8",
    "llama:layers=3,hidden=32,heads=4,kv_heads=2,vocab=64,seq=8",
    "resnet",
    "t5",
])
def test_replaying_repeated_blocks_gives_the_same_numbers(spec: str) -> None:
    loaded = load_model(spec, batch_size=2, device="meta")
    gm = capture(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    annotate(gm, loaded.example_inputs, loaded.example_kwargs, reuse=False)
    every_node = _infos(gm)
    annotate(gm, loaded.example_inputs, loaded.example_kwargs, reuse=True)
    assert _infos(gm) == every_node
