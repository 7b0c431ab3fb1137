"""Transformers families through the ``hf:`` MODEL specs: ``tripar inspect``, ``tripar plan
--tp 2`` and, for a few, a short ``tripar train``.

``FAMILY_SPECS`` is the tested set: small configs of decoder-only, encoder-only,
encoder-decoder (text and speech) and vision models. They cover the three causes the specs
once failed on: example batches read from ``forward``'s signature and the config
(``pixel_values`` for ViT, DeiT, Swin, ConvNeXt and ResNet, ``input_features`` for Whisper,
``decoder_input_ids`` for the sequence-to-sequence models); classes with no sdpa attention
(Bloom, GPT-Neo, DeBERTa-v2, ConvNeXt) built with eager attention; and encoder-decoder
configs with no ``decoder_start_token_id`` (T5) or list values (Swin's ``depths=[2,2]``,
GPT-Neo's nested ``attention_types``).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tripar.cli import main
from tripar.errors import ModelSpecError
from tripar.models import load_model
from tripar.models.hf import HFLoss, build_hf_config, parse_value
from tripar.models.spec import parse_spec

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs transformers")

_D = ("num_hidden_layers=2,hidden_size=32,num_attention_heads=4,intermediate_size=64,"
      "vocab_size=64,max_position_embeddings=32")
_SEQ2SEQ = ("encoder_layers=1,decoder_layers=1,d_model=32,encoder_ffn_dim=64,"
            "decoder_ffn_dim=64,encoder_attention_heads=4,decoder_attention_heads=4,"
            "vocab_size=64")
_PATCHES = ("num_hidden_layers=2,hidden_size=32,num_attention_heads=4,intermediate_size=64,"
            "image_size=16,patch_size=8,num_labels=10")
FAMILY_SPECS = {
    # decoder-only: learned positions, GQA + rotary, parallel attention + MLP, ALiBi, ...
    "gpt2": "hf:GPT2LMHeadModel:n_layer=2,n_embd=32,n_head=4,vocab_size=64,n_positions=32",
    "llama": f"hf:LlamaForCausalLM:{_D},num_key_value_heads=2",
    "mistral": f"hf:MistralForCausalLM:{_D},num_key_value_heads=2",
    "gemma": f"hf:GemmaForCausalLM:{_D},num_key_value_heads=2,head_dim=8",
    "phi": f"hf:PhiForCausalLM:{_D}",
    "gpt_neox": f"hf:GPTNeoXForCausalLM:{_D}",
    "gptj": "hf:GPTJForCausalLM:n_layer=2,n_embd=32,n_head=4,rotary_dim=4,vocab_size=64,"
            "n_positions=32",
    "gpt_neo": "hf:GPTNeoForCausalLM:num_layers=2,hidden_size=32,num_heads=4,"
               "attention_types=[[[global,local],1]],vocab_size=64,max_position_embeddings=32",
    "bloom": "hf:BloomForCausalLM:n_layer=2,hidden_size=32,n_head=4,vocab_size=64",
    "falcon": "hf:FalconForCausalLM:num_hidden_layers=2,hidden_size=32,num_attention_heads=4,"
              "vocab_size=64,alibi=true",
    "opt": "hf:OPTForCausalLM:num_hidden_layers=2,hidden_size=32,num_attention_heads=4,"
           "ffn_dim=64,vocab_size=64,max_position_embeddings=32,word_embed_proj_dim=32",
    "mpt": "hf:MptForCausalLM:n_layers=2,d_model=32,n_heads=4,vocab_size=64,max_seq_len=32",
    "stablelm": f"hf:StableLmForCausalLM:{_D},num_key_value_heads=4",
    # encoder-only
    "bert": f"hf:BertForMaskedLM:{_D}",
    "bert_classifier": f"hf:BertForSequenceClassification:{_D},num_labels=3",
    "roberta": f"hf:RobertaForMaskedLM:{_D}",
    "distilbert": "hf:DistilBertForMaskedLM:n_layers=2,dim=32,n_heads=4,hidden_dim=64,"
                  "vocab_size=64,max_position_embeddings=32",
    "albert": "hf:AlbertForMaskedLM:num_hidden_layers=2,hidden_size=32,num_attention_heads=4,"
              "intermediate_size=64,embedding_size=16,vocab_size=64,max_position_embeddings=32",
    "electra_tokens": f"hf:ElectraForTokenClassification:{_D},embedding_size=32,num_labels=5",
    "deberta_v2": f"hf:DebertaV2ForMaskedLM:{_D}",
    # encoder-decoder
    "t5": "hf:T5ForConditionalGeneration:num_layers=2,d_model=32,d_ff=64,num_heads=4,d_kv=8,"
          "vocab_size=64",
    "bart": f"hf:BartForConditionalGeneration:{_SEQ2SEQ},max_position_embeddings=32",
    "pegasus": f"hf:PegasusForConditionalGeneration:{_SEQ2SEQ},max_position_embeddings=32",
    "whisper": f"hf:WhisperForConditionalGeneration:{_SEQ2SEQ},num_mel_bins=8,"
               "max_source_positions=16,max_target_positions=32",
    # vision
    "vit": f"hf:ViTForImageClassification:{_PATCHES}",
    "deit": f"hf:DeiTForImageClassification:{_PATCHES}",
    "swin": "hf:SwinForImageClassification:depths=[2,2],num_heads=[2,4],embed_dim=32,"
            "image_size=32,patch_size=4,window_size=4,num_labels=10",
    "convnext": "hf:ConvNextForImageClassification:num_stages=2,depths=[1,1],"
                "hidden_sizes=[16,32],image_size=32,num_labels=10",
    "resnet": "hf:ResNetForImageClassification:embedding_size=16,hidden_sizes=[16,32],"
              "depths=[1,1],num_labels=10",
}
TRAINED = {"vit": ["--pp", "2"], "t5": ["--dp", "2"]}
"""The families ``tripar train`` runs (two processes, three steps): an image model through a
pipeline cut, an encoder-decoder model over data parallelism."""


@pytest.mark.parametrize("name", list(FAMILY_SPECS))
def test_family_inspects_and_plans_with_tp2(name, capsys):
    spec = FAMILY_SPECS[name]
    assert main(["inspect", spec, "--seq", "8", "--format", "json"]) == 0
    graph = json.loads(capsys.readouterr().out)
    assert graph["params"] > 0 and len(graph["blocks"]) >= 3, name
    assert main(["plan", spec, "--seq", "8", "--tp", "2", "--global-batch", "4",
                 "--gpu", "cpu", "--gpus-per-node", "2", "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["parallel"]["tp"] == 2, name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(TRAINED))
def test_family_trains(name, capsys):
    code = main(["train", FAMILY_SPECS[name], "--nproc", "2", "--steps", "3", "--seq", "8",
                 "--global-batch", "4", *TRAINED[name], "--format", "json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["losses"]) == 3 and all(0 < x < 20 for x in out["losses"]), out


# ---- the three causes, each without a capture ----------------------------------------------

@pytest.mark.parametrize("name, inputs", [
    ("vit", {"pixel_values": (2, 3, 16, 16), "labels": (2,)}),
    ("convnext", {"pixel_values": (2, 3, 32, 32), "labels": (2,)}),
    ("whisper", {"input_features": (2, 8, 32), "labels": (2, 8), "decoder_input_ids": (2, 8)}),
    ("t5", {"input_ids": (2, 8), "labels": (2, 8), "decoder_input_ids": (2, 8)}),
    ("bert_classifier", {"input_ids": (2, 8), "labels": (2,)}),
    ("electra_tokens", {"input_ids": (2, 8), "labels": (2, 8)}),
    ("bert", {"input_ids": (2, 8), "labels": (2, 8), "attention_mask": (2, 8)}),
    ("gpt2", {"input_ids": (2, 8), "labels": (2, 8)}),
])
def test_the_example_batch_comes_from_the_signature_and_config(name, inputs):
    loaded = load_model(FAMILY_SPECS[name], batch_size=2, seq_len=8)
    assert {k: tuple(v.shape) for k, v in loaded.example_kwargs.items()} == inputs
    loss = loaded.model(**loaded.example_kwargs)
    assert isinstance(loaded.model, HFLoss) and loss.shape == () and torch.isfinite(loss)


def test_decoder_inputs_are_the_labels_shifted_right_from_the_start_token():
    batch = load_model(FAMILY_SPECS["t5"], batch_size=2, seq_len=8).example_kwargs
    start = torch.zeros(2, 1, dtype=torch.long)  # T5 starts from its pad token
    assert torch.equal(batch["decoder_input_ids"],
                       torch.cat([start, batch["labels"][:, :-1]], dim=1))


@pytest.mark.parametrize("class_name, attention", [
    ("BloomForCausalLM", "eager"), ("DebertaV2ForMaskedLM", "eager"),
    ("GPT2LMHeadModel", "sdpa"), ("ViTForImageClassification", "sdpa"),
])
def test_classes_without_sdpa_attention_get_eager(class_name, attention):
    _, config = build_hf_config(class_name, {})
    assert config._attn_implementation == attention


def test_encoder_decoder_keys_and_list_values_parse():
    _, t5 = build_hf_config("T5ForConditionalGeneration",
                            {"num_layers": "1", "decoder_start_token_id": "3"})
    assert t5.decoder_start_token_id == 3
    _, t5 = build_hf_config("T5ForConditionalGeneration", {"num_layers": "1"})
    assert t5.decoder_start_token_id == t5.pad_token_id == 0  # the config names none
    family, raw = parse_spec(FAMILY_SPECS["swin"])
    assert family == "hf" and raw["depths"] == "[2,2]" and raw["num_heads"] == "[2,4]"
    _, swin = build_hf_config(raw.pop("class"), raw)
    assert swin.depths == [2, 2] and swin.num_heads == [2, 4]
    assert parse_value("[[[global,local],1]]") == [[["global", "local"], 1]]
    loaded = load_model(FAMILY_SPECS["swin"], device="meta")
    assert "depths=[2,2]" in loaded.spec and parse_spec(loaded.spec)[1]["depths"] == "[2,2]"
    with pytest.raises(ModelSpecError, match="unbalanced brackets"):
        parse_spec("hf:SwinForImageClassification:depths=[2,2")
    with pytest.raises(ModelSpecError, match="has no key 'depth'"):
        build_hf_config("SwinForImageClassification", {"depth": "[2]"})
