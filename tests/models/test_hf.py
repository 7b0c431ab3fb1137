"""``hf:`` MODEL specs (Hugging Face transformers, small configs).

Without transformers installed, the tests that build a model skip; the message that says
how to install it, and spec value parsing, are tested either way."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from tripar.errors import ModelSpecError
from tripar.models import load_model
from tripar.models.hf import HFLoss, parse_value

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers")

GPT2 = "hf:GPT2LMHeadModel:n_layer=2,n_embd=32,n_head=4,vocab_size=64,n_positions=32"
LLAMA = ("hf:LlamaForCausalLM:num_hidden_layers=2,hidden_size=32,num_attention_heads=4,"
         "num_key_value_heads=2,intermediate_size=64,vocab_size=64")
BERT = ("hf:BertForMaskedLM:num_hidden_layers=2,hidden_size=32,num_attention_heads=4,"
        "intermediate_size=64,vocab_size=64")


@needs_transformers
@pytest.mark.parametrize("spec, kwargs, sizes", [
    (GPT2, {"input_ids", "labels"}, {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 4}),
    (LLAMA, {"input_ids", "labels"}, {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2,
                                      "ffn": 64}),
    (BERT, {"input_ids", "labels", "attention_mask"}, {"layers": 2, "hidden": 32, "ffn": 64}),
])
def test_hf_models_build_and_give_a_loss(spec, kwargs, sizes):
    loaded = load_model(spec, batch_size=2, seq_len=8)
    assert loaded.family == "hf" and isinstance(loaded.model, HFLoss)
    assert set(loaded.example_kwargs) == kwargs and loaded.example_inputs == ()
    assert loaded.example_kwargs["input_ids"].shape == (2, 8)
    assert sizes.items() <= loaded.config.items() and loaded.config["seq"] == 8
    config = loaded.model.model.config
    assert config.use_cache is False and config._attn_implementation == "sdpa"
    loss = loaded.model(**loaded.example_kwargs)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in loaded.model.parameters() if p.requires_grad)
    again = load_model(spec, batch_size=2, seq_len=8)  # seeded: same weights, same loss
    torch.testing.assert_close(again.model(**again.example_kwargs), loss.detach())


@needs_transformers
def test_hf_on_meta_allocates_nothing():
    loaded = load_model(LLAMA, batch_size=2, seq_len=8, device="meta")
    tensors = [*loaded.model.parameters(), *loaded.model.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert all(t.device.type == "meta" for t in loaded.example_kwargs.values())


@needs_transformers
def test_hf_meta_then_materialise_equals_cpu_build():
    cpu = load_model(LLAMA, seq_len=8, seed=1)
    meta = load_model(LLAMA, seq_len=8, seed=1, device="meta")
    meta.model.to_empty(device="cpu")
    torch.manual_seed(1)
    meta.model.init_weights()  # Hugging Face's init also refills the rotary buffers
    for (name, a), (_, b) in zip(cpu.model.state_dict().items(),
                                 meta.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    for (name, a), (_, b) in zip(cpu.model.named_buffers(), meta.model.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)


@needs_transformers
def test_gpt2_exports_and_matches_eager():
    loaded = load_model(GPT2, batch_size=1, seq_len=8)
    program = torch.export.export(loaded.model, (), loaded.example_kwargs, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**loaded.example_kwargs),
                                   loaded.model(**loaded.example_kwargs))


def test_value_parsing():
    assert [parse_value(v) for v in ("3", "0.5", "False", "None", "silu")] == [
        3, 0.5, False, None, "silu"]


@needs_transformers
def test_spec_values_reach_the_config():
    loaded = load_model(GPT2 + ",activation_function=gelu_new", device="meta", seq_len=8)
    assert loaded.model.model.config.activation_function == "gelu_new"
    assert loaded.spec.startswith("hf:GPT2LMHeadModel:n_layer=2,")


@needs_transformers
def test_hf_errors():
    with pytest.raises(ModelSpecError, match="no model class 'NotAModel'"):
        load_model("hf:NotAModel:x=1", device="meta")
    with pytest.raises(ModelSpecError, match="no key 'n_layers'.*accepts: .*n_layer"):
        load_model("hf:GPT2LMHeadModel:n_layers=2", device="meta")
    with pytest.raises(ModelSpecError, match="seq_len=64 exceeds"):
        load_model(GPT2, seq_len=64, device="meta")


def test_missing_transformers_says_how_to_install(monkeypatch):
    real_import_module = importlib.import_module

    def without_transformers(name, package=None):
        if name.split(".")[0] == "transformers":
            raise ImportError("No module named 'transformers'")
        return real_import_module(name, package)

    monkeypatch.setattr(importlib, "import_module", without_transformers)
    with pytest.raises(ModelSpecError, match=r"pip install 'tripar\[hf\]'"):
        load_model(GPT2, device="meta")


@needs_transformers
def test_a_model_directory_builds_from_its_config(tmp_path, monkeypatch):
    """``hf:DIR``: the class a directory's config.json names, its config (dropouts its own,
    the spec's keys set on it); a transformers model records its class and config for
    ``tripar export --to hf``."""
    import transformers

    from tripar.models.hf import transformers_source

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, attention_dropout=0.25,
                                      architectures=["LlamaForCausalLM"])
    config.save_pretrained(tmp_path / "llama")
    monkeypatch.chdir(tmp_path)
    loaded = load_model("hf:llama:num_hidden_layers=1", batch_size=2, seq_len=8)
    inner = loaded.model.model
    assert type(inner).__name__ == "LlamaForCausalLM"
    assert loaded.spec == "hf:llama:num_hidden_layers=1"
    assert inner.config.attention_dropout == 0.25 and inner.config.use_cache is False
    assert inner.config.num_hidden_layers == 1
    assert set(loaded.example_kwargs) == {"input_ids", "labels"}
    assert loaded.model(**loaded.example_kwargs).dim() == 0
    source = transformers_source(loaded.model)
    assert source["class"] == "LlamaForCausalLM" and source["prefix"] == "model."
    assert source["config"]["hidden_size"] == 32
    assert transformers_source(inner)["prefix"] == ""
    assert transformers_source(torch.nn.Linear(2, 2)) is None

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="not a transformers checkpoint directory"):
        load_model("hf:empty")
    config.architectures = None
    config.save_pretrained(tmp_path / "nameless")
    with pytest.raises(ModelSpecError, match="names no model class"):
        load_model("hf:nameless")
    with pytest.raises(ModelSpecError, match="has no key 'colour'"):
        load_model("hf:llama:colour=1")
