"""``hf:ClassName:key=value,...`` MODEL specs: Hugging Face transformers models.

The class is looked up in ``transformers``; its ``config_class`` is built
from the key/values (ints, floats, bools, ``none`` and strings are told apart
by their text), with ``use_cache=False``, every dropout 0 unless the spec sets
it, and the ``sdpa`` attention implementation (both it and ``eager`` trace with ``torch.export``; sdpa is
faster to trace and run). No weights are downloaded.

The model is wrapped in :class:`HFLoss`, whose ``forward`` returns the loss
tensor instead of a ``ModelOutput``, so every MODEL spec gives a model whose
output is the scalar loss. The Hugging Face module is ``HFLoss.model``. As for
zoo models, the model is built on meta and, for a real device, materialised
with ``to_empty`` and ``init_weights()`` under the seed.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from tripar.errors import ModelSpecError
from tripar.models._common import random_ids
from tripar.models.loaded import LoadedModel, seeded

ATTENTION = "sdpa"
DEFAULT_SEQ = 128
"""Example sequence length when neither ``seq_len`` nor a shorter position table says."""

# LoadedModel.config name -> Hugging Face config attribute names, first found wins
SIZE_NAMES = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "kv_heads": ("num_key_value_heads",),
    "vocab": ("vocab_size",),
    "ffn": ("intermediate_size", "n_inner", "d_ff"),
}
POSITION_NAMES = ("max_position_embeddings", "n_positions")


class HFLoss(nn.Module):
    """Calls a Hugging Face model and returns its ``loss`` (its ``logits`` without labels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return out.logits if labels is None else out.loss

    @torch.no_grad()
    def init_weights(self) -> None:
        """Hugging Face's own initialisation (weights, rotary buffers, tying), global RNG."""
        self.model.init_weights()


def parse_value(text: str) -> Any:
    """Read a spec value as int, float, bool, None or str.

    >>> [parse_value(v) for v in ("2", "1e-5", "true", "none", "gelu")]
    [2, 1e-05, True, None, 'gelu']
    """
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ModelSpecError(
            "hf: MODEL specs need Hugging Face transformers, which is not installed; "
            "run: pip install 'tripar[hf]'"
        ) from None


def build_hf_config(class_name: str, options: dict[str, str]) -> tuple[type, Any]:
    """The transformers class and its config built from the spec's key/values."""
    transformers = _transformers()
    cls = getattr(transformers, class_name, None)
    config_class = getattr(cls, "config_class", None)
    if cls is None or config_class is None:
        raise ModelSpecError(
            f"hf: transformers {transformers.__version__} has no model class {class_name!r}; "
            "give a class such as GPT2LMHeadModel, LlamaForCausalLM or BertForMaskedLM"
        )
    default = config_class()
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ModelSpecError(
            f"hf: {config_class.__name__} has no key {unknown[0]!r}; "
            f"{config_class.__name__} accepts: {', '.join(sorted(known))}"
        )
    values = {k: parse_value(v) for k, v in options.items()}
    values = {**_quiet_defaults(default, values), **values}
    try:
        config = config_class(**values)
    except (TypeError, ValueError) as error:
        raise ModelSpecError(f"hf: {config_class.__name__}({values}) failed: {error}") from None
    if hasattr(config, "use_cache"):
        config.use_cache = False
    config._attn_implementation = ATTENTION
    return cls, config


def _quiet_defaults(default: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Dropouts off (deterministic, comparable runs) and special token ids the vocabulary holds."""
    quiet: dict[str, Any] = {}
    for name, value in default.to_dict().items():
        dropout = name.endswith(("pdrop", "dropout", "dropout_prob", "dropout_rate"))
        if dropout and isinstance(value, float) and value > 0:
            quiet[name] = 0.0
    vocab = values.get("vocab_size")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        token = getattr(default, name, None)
        if isinstance(vocab, int) and isinstance(token, int) and token >= vocab:
            quiet[name] = None  # a shrunken vocabulary no longer holds the default ids
    return quiet


def _size(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def example_kwargs(
    class_name: str, config: Any, batch_size: int, seq_len: int, device: torch.device, seed: int
) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``labels`` (and ``attention_mask`` for masked LMs)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, seq_len)
    vocab = getattr(config, "vocab_size", None) or 2
    ids = random_ids(shape, vocab, device, generator)
    if "SequenceClassification" in class_name:
        labels = random_ids((batch_size,), max(getattr(config, "num_labels", 2), 1), device,
                            generator)
        return {"input_ids": ids, "labels": labels}
    if "MaskedLM" not in class_name:
        return {"input_ids": ids, "labels": ids.clone()}
    if device.type == "meta":
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.empty_like(ids)}
    chosen = torch.rand(shape, generator=generator) < 0.15
    chosen[:, 0] = True
    labels = torch.where(chosen, ids.cpu(), -100).to(device)
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def load_hf_model(
    class_name: str, options: dict[str, str], *, batch_size: int, seq_len: int | None,
    device: torch.device, seed: int,
) -> LoadedModel:
    """Build the model of an ``hf:`` spec, random-initialised under ``seed``."""
    cls, config = build_hf_config(class_name, options)
    positions = _size(config, POSITION_NAMES)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ, positions) if positions else DEFAULT_SEQ
    elif positions is not None and seq_len > positions:
        raise ModelSpecError(
            f"hf: seq_len={seq_len} exceeds {class_name}'s {positions} positions; set "
            f"{POSITION_NAMES[0] if hasattr(config, POSITION_NAMES[0]) else 'n_positions'}"
            f"={seq_len} in the spec or ask for a shorter seq_len"
        )
    with torch.device("meta"):
        model = HFLoss(cls(config))
    if device.type != "meta":  # as for zoo models: meta, then to_empty + seeded init
        model.to_empty(device=device)
        with seeded(seed, device):
            model.init_weights()
    model.train()
    sizes = {name: _size(config, names) for name, names in SIZE_NAMES.items()}
    if sizes["kv_heads"] is None:
        sizes["kv_heads"] = sizes["heads"]
    sizes["seq"] = seq_len
    spec = f"hf:{class_name}:" + ",".join(f"{k}={parse_value(v)}" for k, v in options.items())
    return LoadedModel(
        model=model, example_inputs=(),
        example_kwargs=example_kwargs(class_name, config, batch_size, seq_len, device, seed),
        config={k: v for k, v in sizes.items() if v is not None}, spec=spec.rstrip(":"),
        family="hf",
    )
