"""transformers models as objects, with no ``loss_fn``: their own ``ModelOutput.loss`` trains
under pipeline, tensor and data parallelism exactly like one process, gradient by gradient.

Each family is built from its config class (small sizes, fp32, dropout 0, ``use_cache`` left at
its default: capture turns the cache off and restores it) and passed to ``auto_parallel`` as is
(not wrapped): the last stage returns the exported
graph's output, a dict with ``loss`` and ``logits``, and :func:`tripar.runtime.loss.model_loss`
takes its ``loss``. The families cover decoder-only attention of several kinds (learned
positions, GQA with rotary, parallel attention + MLP with rotary, ALiBi), encoder-only,
encoder-decoder and vision models.

All runs share one launch of two gloo ranks: every family under ``pp=2``, ``tp=2`` and
``dp=2`` (two microbatches of two samples in each layout), and BART under ``tp=2`` (its LM head
adds a bias no region shards, so its tied embeddings stay replicated while T5's are sharded by
all three readers: encoder and decoder embeddings and LM head). Each run first checks
``eval_step`` against one process's loss, then takes one SGD step with learning rate 1, so
that each parameter's change is its gradient; every change is compared with one process's
gradient of the same microbatches.
"""

from __future__ import annotations

import importlib.util
import io
import time

import pytest
import torch
from torch.testing import assert_close

from tests._ranks import run_ranks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs transformers")

GLOBAL_BATCH, SEQ, VOCAB, MICRO = 4, 8, 64, 2
DECODER = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
               intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=16)
ENCODER = dict(DECODER)

# name -> (model class, config class, config keywords, inputs); the kind of attention each
# stands for is in the module docstring and the README's table.
FAMILIES: dict[str, tuple[str, str, dict, str]] = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",   # learned positions, Conv1D projections
             dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16), "causal"),
    "llama": ("LlamaForCausalLM", "LlamaConfig",  # GQA (4 query heads, 2 kv) + rotary
              dict(DECODER, num_key_value_heads=2), "causal"),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig",  # parallel attention + MLP, rotary
                 dict(DECODER, use_parallel_residual=True), "causal"),
    "bloom": ("BloomForCausalLM", "BloomConfig",  # ALiBi
              dict(n_layer=2, hidden_size=32, n_head=4, vocab_size=VOCAB), "causal"),
    "bert": ("BertForMaskedLM", "BertConfig", ENCODER, "masked"),
    "distilbert": ("DistilBertForMaskedLM", "DistilBertConfig",
                   dict(n_layers=2, dim=32, n_heads=4, hidden_dim=64, vocab_size=VOCAB,
                        max_position_embeddings=16), "masked"),
    "t5": ("T5ForConditionalGeneration", "T5Config",  # relative position buckets
           dict(num_layers=2, d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=VOCAB,
                decoder_start_token_id=0), "seq2seq"),
    "bart": ("BartForConditionalGeneration", "BartConfig",  # learned positions, final_logits_bias
             dict(encoder_layers=1, decoder_layers=1, d_model=32, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4,
                  vocab_size=VOCAB, max_position_embeddings=16), "seq2seq"),
    "vit": ("ViTForImageClassification", "ViTConfig",
            dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                 intermediate_size=64, image_size=16, patch_size=8, num_labels=10), "image"),
}
LAYOUTS = {"pp": dict(pp=2, num_microbatches=2), "tp": dict(tp=2, num_microbatches=2),
           "dp": dict(dp=2, num_microbatches=1)}
"""Every layout runs microbatches of two samples, so one process's reference is the same."""
ONLY = {"bart": ("tp",)}
"""Families run in some layouts only (the rest of the suite's time goes elsewhere)."""


def build(name: str) -> torch.nn.Module:
    """The family's model, random-initialised under seed 0, dropout off, the KV cache as the
    config has it (on, for the decoders)."""
    import transformers

    model_cls, config_cls, sizes, _ = FAMILIES[name]
    config = getattr(transformers, config_cls)(**sizes)
    for key, value in config.to_dict().items():
        if key.endswith(("pdrop", "dropout", "dropout_prob", "dropout_rate")) and \
                isinstance(value, float):
            setattr(config, key, 0.0)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).train()


def batch(name: str) -> dict[str, torch.Tensor]:
    """One global batch with labels: the model's forward returns its loss."""
    kind = FAMILIES[name][3]
    g = torch.Generator().manual_seed(1)
    if kind == "image":
        return {"pixel_values": torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g),
                "labels": torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)}
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    if kind == "causal":
        return {"input_ids": ids, "labels": ids.clone()}
    if kind == "seq2seq":
        return {"input_ids": ids, "labels": torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ),
                                                           generator=g)}
    chosen = torch.rand(GLOBAL_BATCH, SEQ, generator=g) < 0.3
    chosen[:, 0] = True  # every microbatch has a masked token to predict
    return {"input_ids": ids, "labels": torch.where(chosen, ids, -100),
            "attention_mask": torch.ones_like(ids)}


def one_process(name: str) -> tuple[float, dict[str, torch.Tensor]]:
    """The mean loss of the microbatches, and the parameters after one SGD step (lr 1) on
    their accumulated gradient, in one process."""
    model = build(name)
    full = batch(name)
    n = GLOBAL_BATCH // MICRO
    losses = []
    for k in range(n):
        loss = model(**{key: t[k * MICRO:(k + 1) * MICRO] for key, t in full.items()}).loss
        (loss / n).backward()
        losses.append(float(loss.detach()))
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    return sum(losses) / n, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _compare(what: str, eval_loss: float, train_loss: float, loss_ref: float,
             start: dict, after: dict, after_ref: dict) -> None:
    assert abs(eval_loss - loss_ref) < 1e-5 and abs(train_loss - loss_ref) < 1e-5, (
        f"{what}: eval loss {eval_loss}, train loss {train_loss}, one process {loss_ref}")
    assert set(after) == set(after_ref), (what, set(after) ^ set(after_ref))
    for key, want in after_ref.items():  # lr 1: the change is the gradient
        assert_close(start[key] - after[key], start[key] - want, rtol=1e-4, atol=1e-6,
                     msg=lambda m, key=key: f"{what}: gradient of {key}: {m}")


def _every_layout(data: bytes) -> list[str]:
    """On each rank: every family under every layout; rank 0 compares and reports."""
    import torch.distributed as dist

    from tripar import api

    references = torch.load(io.BytesIO(data), weights_only=False)
    lines = []
    for name, (loss_ref, after_ref, start) in references.items():
        model = build(name)
        model.load_state_dict(start)
        full = batch(name)
        cache = getattr(model.config, "use_cache", None)
        captured = api.capture_model(model, (), {k: t[:MICRO] for k, t in full.items()})
        assert getattr(model.config, "use_cache", None) == cache, f"{name}: use_cache changed"
        for layout, pins in LAYOUTS.items():
            if layout not in ONLY.get(name, LAYOUTS):
                continue
            t0 = time.perf_counter()
            what = f"{name} {layout}"
            try:
                pm = api.auto_parallel(model, captured=captured, global_batch_size=GLOBAL_BATCH,
                                       optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0),
                                       schedule="1f1b", timeout_s=60, **pins)
                eval_loss = pm.eval_step(full)
                train_loss = pm.train_step(full)
                after = pm.full_state_dict()
            except Exception as error:  # noqa: BLE001 - a build error is every rank's
                lines.append(f"FAILED {what}: {type(error).__name__}: {error}")
                continue
            sharded = len(pm.plan.tp_regions)
            pm.close()
            if dist.get_rank() == 0:
                try:
                    _compare(what, eval_loss, train_loss, loss_ref, start, after, after_ref)
                    assert layout != "tp" or sharded, f"{what}: no region was sharded"
                except AssertionError as error:
                    lines.append(f"FAILED {error}")
                    continue
                lines.append(f"{what}: loss {loss_ref:.4f}, {len(after_ref)} tensors equal, "
                             f"{sharded} regions sharded, {time.perf_counter() - t0:.1f}s")
    return lines


@pytest.mark.timeout(300)
def test_transformers_models_train_on_their_own_loss_like_one_process():
    assert build("llama").config.use_cache is True  # transformers' default, left as it is
    data = io.BytesIO()
    references = {}
    for name in FAMILIES:
        start = {k: v.clone() for k, v in build(name).state_dict().items()}
        references[name] = (*one_process(name), start)
    torch.save(references, data)
    lines = run_ranks(_every_layout, 2, data.getvalue(), timeout_s=280, pg_timeout_s=60)[0]
    print("\n".join(lines))
    failed = [line for line in lines if line.startswith("FAILED")]
    assert not failed, "\n".join(failed)
    assert len(lines) == sum(len(ONLY.get(name, LAYOUTS)) for name in FAMILIES)
