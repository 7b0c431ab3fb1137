"""Pretrained weights in: a transformers checkpoint directory read into the parallel model.

Single-process tests check the matching and its errors (small modules saved with
safetensors). One launch of two gloo ranks builds transformers models on the meta device
and starts them from checkpoints that ``save_pretrained`` wrote (Llama with tied embeddings,
sharded into many files, under pp=2, tp=2 and dp=2; GPT-2, whose fused ``c_attn`` tensor
parallelism cuts per part, in one file, under tp=2): every parameter equals its slice of the saved model,
the first step's loss equals ``from_pretrained``'s, and each rank reads from the files
exactly the values it holds (counted through the safetensors slices it is handed).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tests._ranks import run_ranks
from tripar.errors import ConfigError
from tripar.runtime import pretrained
from tripar.runtime.pretrained import match_pretrained

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                              reason="needs transformers")


class _Net(torch.nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(8, width)
        self.head = torch.nn.Linear(width, 8, bias=False)
        self.head.weight = self.emb.weight  # tied: the checkpoint keeps one name
        self.register_buffer("scale", torch.ones(width))


def _save(directory, tensors) -> str:
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    return str(directory)


def test_names_match_through_ties_and_a_wrapper_prefix(tmp_path):
    good = _save(tmp_path / "a", {"emb.weight": torch.ones(8, 4), "scale": torch.ones(4)})
    assert match_pretrained(_Net(), good).names == {
        "emb.weight": "emb.weight", "head.weight": "emb.weight", "scale": "scale"}
    wrapped = torch.nn.ModuleDict({"model": _Net()})  # an hf: spec's HFLoss holds .model
    assert match_pretrained(wrapped, good).names["model.head.weight"] == "emb.weight"
    with torch.device("meta"):
        assert match_pretrained(_Net(), good).files == {"emb.weight": "model.safetensors",
                                                        "scale": "model.safetensors"}


def test_errors_name_what_is_wrong_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="no such directory; give the directory"):
        match_pretrained(_Net(), tmp_path / "absent")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no model.safetensors.*pytorch_model.bin.*save_pretrained"):
        match_pretrained(_Net(), tmp_path / "bin")
    lacking = _save(tmp_path / "lacking", {"emb.weight": torch.ones(8, 4)})
    with pytest.raises(ConfigError, match=r"no tensor for 1 of the model's 2 \(scale\).*"
                                          r"AutoConfig.from_pretrained"):
        match_pretrained(_Net(), lacking, flag="--init-from ")
    extra = _save(tmp_path / "extra", {"emb.weight": torch.ones(8, 4), "scale": torch.ones(4),
                                       "pos.weight": torch.ones(2)})
    with pytest.raises(ConfigError, match=r"1 tensors the model does not \(pos.weight\)"):
        match_pretrained(_Net(), extra)
    with pytest.raises(ConfigError, match=r"emb.weight: \[8, 4\] in the checkpoint, \[8, 6\] "
                                          r"in the model.*config.json"):
        match_pretrained(_Net(width=6), _save(tmp_path / "a", {"emb.weight": torch.ones(8, 4),
                                                                "scale": torch.ones(6)}))
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"emb.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ConfigError, match="names files that are not there"):
        match_pretrained(_Net(), tmp_path / "index")


# ---- two ranks: transformers checkpoints into pp, tp and dp layouts ---------------------

GLOBAL_BATCH, MICRO, SEQ, VOCAB = 4, 2, 8, 64
MODELS = {  # name -> (config class, keywords, save_pretrained's max_shard_size, layouts)
    "llama": ("LlamaConfig", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64,
                                  vocab_size=VOCAB, max_position_embeddings=16,
                                  tie_word_embeddings=True), "20KB", ("pp", "tp", "dp")),
    "gpt2": ("GPT2Config", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), None,
             ("tp",)),
}
LAYOUTS = {"pp": dict(pp=2, num_microbatches=2), "tp": dict(tp=2, num_microbatches=2),
           "dp": dict(dp=2, num_microbatches=1)}


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids.clone()}


class _Counting:
    """safetensors' ``safe_open``, counting the values each slice read returns."""

    read = 0

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, *args, **kwargs):
        handle = self.inner(*args, **kwargs)
        outer = self

        class Handle:
            def __enter__(self):
                self.h = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return self.h.keys()

            def get_slice(self, name):
                inner = self.h.get_slice(name)

                class Slice:
                    def get_shape(self):
                        return inner.get_shape()

                    def __getitem__(self, index):
                        value = inner[index]
                        outer.read += value.numel()
                        return value
                return Slice()
        return Handle()


def _from_checkpoints(directories: dict[str, str], references: dict) -> list[str]:
    import transformers

    from tripar import api

    counting = _Counting(pretrained._safe_open())
    pretrained._safe_open = lambda: counting
    full = _batch()
    lines = []
    for name, directory in directories.items():
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.from_pretrained(directory))
        captured = api.capture_model(model, (), {k: t[:MICRO] for k, t in full.items()})
        saved, loss_ref, total = references[name]
        for layout in MODELS[name][3]:
            counting.read = 0
            pm = api.auto_parallel(model, captured=captured, global_batch_size=GLOBAL_BATCH,
                                   init_from=directory, schedule="1f1b", timeout_s=60,
                                   **LAYOUTS[layout])
            assert all(p.is_meta for p in model.parameters())  # the user's model stays
            held = 0
            for lp in pm.params:
                what = f"{name} {layout} {lp.fqn}"
                assert torch.equal(lp.param.detach(), lp.cut(saved[lp.fqn])), what
                held += lp.param.numel()
            assert counting.read == held, (name, layout, counting.read, held)
            assert held < total or layout == "dp", (name, layout, held, total)
            loss = pm.train_step(full)
            assert abs(loss - loss_ref) < 1e-5, (name, layout, loss, loss_ref)
            lines.append(f"{name} {layout}: read {counting.read} of {total} values, loss {loss:.4f}")
            pm.close()
    return lines


@needs_hf
@pytest.mark.timeout(240)
def test_transformers_checkpoints_start_pp_tp_and_dp_models_reading_only_their_slices(
        tmp_path):
    import transformers

    directories, references = {}, {}
    full = _batch()
    for name, (config_class, sizes, shard, _) in MODELS.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(**sizes)
        source = transformers.AutoModelForCausalLM.from_config(config)
        directory = str(tmp_path / name)
        source.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
        assert os.path.exists(os.path.join(
            directory, "model.safetensors.index.json" if shard else "model.safetensors"))
        loaded = transformers.AutoModelForCausalLM.from_pretrained(directory)
        losses = [loaded(**{k: t[i:i + MICRO] for k, t in full.items()}).loss.item()
                  for i in range(0, GLOBAL_BATCH, MICRO)]
        state = dict(loaded.named_parameters(remove_duplicate=False))
        references[name] = ({k: v.detach() for k, v in state.items()}, sum(losses) / len(losses),
                            sum(p.numel() for p in loaded.parameters()))
        directories[name] = directory
    lines = run_ranks(_from_checkpoints, 2, directories, references, timeout_s=220,
                      pg_timeout_s=60)[0]
    print("\n".join(lines))
    assert len(lines) == sum(len(m[3]) for m in MODELS.values())
