"""tripar.graph.build: blocks, signatures, cuts, skips, late inputs, tied weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tripar.graph import analyze
from tripar.graph.proxy import ProxyGraph
from tripar.models.spec import load_model

TRANSFORMERS = {
    "gpt": "gpt:layers=3,hidden=64,heads=4,vocab=128,seq=16",
    "llama": "llama:layers=3,hidden=64,heads=4,kv_heads=2,vocab=128,seq=16",
    "bert": "bert:layers=3,hidden=64,heads=4,vocab=128,seq=16",
    "vit": "vit",
    "hf-gpt2": "hf:GPT2LMHeadModel:n_layer=3,n_embd=64,n_head=4,vocab_size=128,n_positions=32",
    "hf-llama": "hf:LlamaForCausalLM:num_hidden_layers=3,hidden_size=64,num_attention_heads=4,"
                "num_key_value_heads=2,intermediate_size=128,vocab_size=128",
    "hf-bert": "hf:BertForMaskedLM:num_hidden_layers=3,hidden_size=64,num_attention_heads=4,"
               "intermediate_size=128,vocab_size=128",
}


def _proxy(spec: str, batch: int = 2, seq: int | None = 16) -> tuple[ProxyGraph, object]:
    loaded = load_model(spec, batch_size=batch, seq_len=seq, device="meta")
    proxy = analyze(loaded.model, loaded.example_inputs, loaded.example_kwargs,
                    model_config=loaded.config)
    return proxy, loaded


def _check_consistent(proxy: ProxyGraph, model: nn.Module) -> None:
    assert sum(b.params for b in proxy.blocks) == sum(p.numel() for p in model.parameters())
    assert [b.index for b in proxy.blocks] == list(range(len(proxy.blocks)))
    assert [c.after for c in proxy.cuts] == [b.name for b in proxy.blocks[:-1]]
    index = {b.name: b.index for b in proxy.blocks}
    for src, dst in proxy.graph.edges:  # contiguous in topological order
        assert index[src] < index[dst]
    nodes = [n for b in proxy.blocks for n in b.nodes]
    assert len(nodes) == len(set(nodes))
    assert all(b.forward_flops >= 0 and b.saved_bytes >= 0 for b in proxy.blocks)


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformers_cut_at_layer_boundaries_with_one_signature(name: str) -> None:
    proxy, loaded = _proxy(TRANSFORMERS[name])
    _check_consistent(proxy, loaded.model)
    if name.startswith("hf"):
        assert proxy.tracer == "export" and "fell back to export" in proxy.tracer_reason
    layers = [b for b in proxy.blocks if b.kind == "layer"]
    assert len(layers) == loaded.config["layers"]
    assert len({b.signature for b in layers}) == 1
    assert len({(b.params, b.forward_flops, b.backward_flops) for b in layers}) == 1
    assert proxy.blocks[0].kind == "embedding"
    assert any(b.kind == "head" for b in proxy.blocks)
    assert proxy.blocks[-1].kind == "loss"
    hidden = loaded.config["hidden"]
    for cut in proxy.cuts:
        if cut.after in {b.name for b in layers[:-1]} | {proxy.blocks[0].name}:
            assert len(cut.tensors) == 1, (cut.after, cut.tensors)
            (tensor,) = cut.tensors
            assert tensor.shape[-1] == hidden
            assert cut.bytes == math.prod(tensor.shape) * 4
    assert proxy.skips == []
    # the labels are loaded by the stage holding the loss, not sent through the pipeline
    assert proxy.blocks[-1].name in {block for _, block in proxy.late_inputs}


@pytest.mark.parametrize("spec", ["resnet", "t5"])
def test_other_zoo_models_are_captured_and_annotated(spec: str) -> None:
    proxy, loaded = _proxy(spec)
    _check_consistent(proxy, loaded.model)
    assert sum(b.forward_flops for b in proxy.blocks) > 0
    assert proxy.blocks[-1].kind == "loss"
    layers = [b for b in proxy.blocks if b.kind == "layer"]
    assert len(layers) >= 4


def test_t5_decoder_layers_read_the_encoder_output() -> None:
    proxy, _ = _proxy("t5")
    decoder = [b.name for b in proxy.blocks if b.name.startswith("decoder.layers.")]
    assert len(decoder) >= 2
    # the encoder output skips over blocks into every decoder layer after the first
    sources = {src for src, dst in proxy.skips if dst == decoder[-1]}
    assert any(s.startswith("encoder") for s in sources)


def test_tied_weights_late_inputs_and_derived_inputs() -> None:
    proxy, _ = _proxy(TRANSFORMERS["gpt"])
    assert proxy.tied_weights == [("wte.weight", "lm_head.weight")]
    assert proxy.late_inputs == [("targets", "loss")]
    head = next(b for b in proxy.blocks if b.kind == "head")
    assert head.params == 0 and "lm_head.weight" not in head.param_names
    bert, _ = _proxy(TRANSFORMERS["bert"])
    # the additive attention mask is computed from the input: not a p2p tensor
    assert [b for _, b in bert.derived_inputs] == ["layers.0"]
    assert "mul" not in {t.node for c in bert.cuts for t in c.tensors}
    llama, _ = _proxy(TRANSFORMERS["llama"])
    assert {b for _, b in llama.derived_inputs} == {"layers.0"}  # rotary tables


def test_repeated_layers_are_costed_from_one_signature_in_deep_models() -> None:
    proxy, _ = _proxy("gpt:layers=32,hidden=64,heads=4,vocab=128,seq=16", batch=1)
    layers = [b for b in proxy.blocks if b.kind == "layer"]
    assert len(layers) == 32 and len({b.signature for b in layers}) == 1
    assert proxy.graph.number_of_nodes() == len(proxy.blocks)
    edge = proxy.graph.edges["blocks.0", "blocks.1"]
    assert edge["bytes"] == 1 * 16 * 64 * 4 and len(edge["tensors"]) == 1


class SkipNet(nn.Module):
    """layers.0's output is added back after layers.2: a skip over two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.layers[0](x)
        y = self.layers[2](self.layers[1](first))
        return self.head(y + first)


def test_skip_connections_are_recorded_and_cross_the_cuts() -> None:
    proxy = analyze(SkipNet(), (torch.randn(4, 8),))
    assert [b.name for b in proxy.blocks] == ["layers.0", "layers.1", "layers.2", "head"]
    # the root-level add joins layers.2, the block open when it runs
    assert proxy.skips == [("layers.0", "layers.2")]
    cut = next(c for c in proxy.cuts if c.after == "layers.1")
    assert {t.node for t in cut.tensors} == {"layers_0", "layers_1"}
    assert cut.bytes == 2 * 4 * 8 * 4
