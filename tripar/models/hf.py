"""``hf:ClassName:key=value,...`` MODEL specs: Hugging Face transformers models.

The class is looked up in ``transformers``; its ``config_class`` is built
from the key/values (ints, floats, bools, ``none``, bracketed lists such as
``depths=[2,2]`` and strings are told apart by their text), with
``use_cache=False``, every dropout 0 unless the spec sets it, and the ``sdpa``
attention implementation where the class has one, else ``eager`` (both trace
with ``torch.export``; sdpa is faster to trace and run). Keys are the config's
fields, its attribute aliases, ``num_labels`` and the special token ids
(``decoder_start_token_id`` included, which some configs no longer hold); an
encoder-decoder config without a decoder start token starts decoding from its
pad token. No weights are downloaded. ``hf:DIR:key=value,...`` builds the class and config
that a checkpoint directory's ``config.json`` names (``save_pretrained``'s output), with
the spec's keys set on it and its dropouts as they are; its weights are read by
``auto_parallel(init_from=DIR)`` / ``tripar train --init-from DIR``.

The example batch is read from the model's ``forward`` signature and its
config, not from a table of models: the main input is the first of
``input_ids``, ``pixel_values`` (``num_channels`` x ``image_size``),
``input_features`` (``num_mel_bins`` x twice ``max_source_positions``, or
``seq`` frames of ``input_feat_per_channel * input_channels``) and
``input_values`` that ``forward`` takes; ``labels`` are shaped for the head the
class name ends with (causal and masked LM, sequence-to-sequence, sequence,
token, image or audio classification); ``decoder_input_ids`` are the labels
shifted right when ``forward`` takes them.

The model is wrapped in :class:`HFLoss`, whose ``forward`` returns the loss
tensor instead of a ``ModelOutput``, so every MODEL spec gives a model whose
output is the scalar loss. The Hugging Face module is ``HFLoss.model``. As for
zoo models, the model is built on meta and, for a real device, materialised
with ``to_empty`` and ``init_weights()`` under the seed.

Tested families (``tests/models/test_hf_families.py``): see ``FAMILY_SPECS`` there.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
from typing import Any

import torch
from torch import nn

from tripar.errors import ModelSpecError
from tripar.models._common import random_floats, random_ids
from tripar.models.loaded import LoadedModel, seeded

ATTENTION = "sdpa"
"""The attention implementation asked for; ``eager`` where the class has no sdpa path."""
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
                  "decoder_start_token_id")
"""Token ids every config may carry (read by generation and label shifting)."""
MAIN_INPUTS = ("input_ids", "pixel_values", "input_features", "input_values")
"""The model inputs an example batch can be made for, in the order they are looked for."""
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

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """The model's loss on ``inputs`` (its keyword arguments: ``input_ids``,
        ``pixel_values``, ``labels``, ...); its ``logits`` when no labels are given."""
        out = self.model(**inputs)
        return out.logits if inputs.get("labels") is None else out.loss

    @torch.no_grad()
    def init_weights(self) -> None:
        """Hugging Face's own initialisation (weights, rotary buffers, tying), global RNG."""
        self.model.init_weights()


def transformers_source(model: nn.Module) -> dict[str, Any] | None:
    """What rebuilds ``model`` as a transformers model, or None when it is not one: its
    class name, its config (``to_json_string``'s values) and the prefix of its parameter
    names in ``model`` (``model.`` under :class:`HFLoss`, else empty). Recorded in
    checkpoints, so that ``tripar export --to hf`` needs nothing else."""
    prefix, inner = ("model.", model.model) if isinstance(model, HFLoss) else ("", model)
    config = getattr(inner, "config", None)
    if not (hasattr(inner, "save_pretrained") and hasattr(config, "to_json_string")):
        return None
    return {"class": type(inner).__name__, "prefix": prefix,
            "config": json.loads(config.to_json_string(use_diff=False))}


def parse_value(text: str) -> Any:
    """Read a spec value as int, float, bool, None, a bracketed list of those, or str.

    >>> [parse_value(v) for v in ("2", "1e-5", "true", "none", "gelu", "[2, 2]", "[]")]
    [2, 1e-05, True, None, 'gelu', [2, 2], []]
    >>> parse_value("[[[global,local],1]]")
    [[['global', 'local'], 1]]
    """
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_value(part) for part in split_items(inner)] if inner else []
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


def split_items(text: str) -> list[str]:
    """``text`` split at the commas outside brackets, so that list values stay whole.

    >>> split_items("depths=[2,2],embed_dim=32")
    ['depths=[2,2]', 'embed_dim=32']
    """
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def _text(value: Any) -> str:
    """The spec text of a parsed value (lists without spaces, so the spec reads back)."""
    if isinstance(value, list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return str(value)


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ModelSpecError(
            "hf: MODEL specs need Hugging Face transformers, which is not installed; "
            "run: pip install 'tripar[hf]'"
        ) from None


def build_hf_config(class_name: str, options: dict[str, str]) -> tuple[type, Any]:
    """The transformers class and its config built from the spec's key/values;
    ``class_name`` may be a checkpoint directory, whose config.json names both."""
    transformers = _transformers()
    if os.path.isdir(class_name):
        return _directory_config(transformers, class_name, options)
    cls = getattr(transformers, class_name, None)
    config_class = getattr(cls, "config_class", None)
    if cls is None or config_class is None:
        raise ModelSpecError(
            f"hf: transformers {transformers.__version__} has no model class {class_name!r}; "
            "give a class such as GPT2LMHeadModel, LlamaForCausalLM or BertForMaskedLM"
        )
    default = config_class()
    known = accepted_keys(config_class, default)
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
    return cls, _for_training(cls, config)


def _directory_config(transformers: Any, directory: str, options: dict[str, str]
                      ) -> tuple[type, Any]:
    """The class and config of a checkpoint directory's config.json, the spec's key/values
    set on it (its dropouts stay as they are), without the KV cache."""
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise ModelSpecError(f"hf:{directory}: not a transformers checkpoint directory "
                             f"({str(error).splitlines()[0][:160]}); give the directory "
                             "save_pretrained wrote (config.json and model.safetensors)") from None
    names = list(getattr(config, "architectures", None) or [])
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is None:
        raise ModelSpecError(f"hf:{directory}: its config.json names no model class this "
                             f"transformers {transformers.__version__} has (architectures: "
                             f"{names}); give the class: hf:ClassName:key=value,...")
    known = accepted_keys(type(config), config)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ModelSpecError(f"hf:{directory}: {type(config).__name__} has no key "
                             f"{unknown[0]!r}; it accepts: {', '.join(sorted(known))}")
    for key, text in options.items():
        setattr(config, key, parse_value(text))
    return cls, _for_training(cls, config)


def _for_training(cls: type, config: Any) -> Any:
    """``config`` without the KV cache, with a decoder start token where an encoder-decoder
    needs one, and the attention implementation ``cls`` traces best with."""
    if hasattr(config, "use_cache"):
        config.use_cache = False
    if config.is_encoder_decoder and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = _start_token(config)
    config._attn_implementation = attention_for(cls)
    return config


def accepted_keys(config_class: type, default: Any) -> set[str]:
    """The keys a spec may set on ``config_class``: what its ``to_dict`` holds, its fields
    and attribute aliases, ``num_labels`` and the special token ids."""
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    if dataclasses.is_dataclass(config_class):
        known |= {f.name for f in dataclasses.fields(config_class)}
    known |= {name for name in dir(config_class)
              if isinstance(getattr(config_class, name, None), property)
              and getattr(config_class, name).fset is not None and not name.startswith("_")}
    return known | set(SPECIAL_TOKENS)


def attention_for(cls: type) -> str:
    """``sdpa`` where the model class has an sdpa attention path, else ``eager``."""
    return ATTENTION if getattr(cls, "_supports_sdpa", False) else "eager"


def _start_token(config: Any) -> int:
    """The token decoding starts from, for a config that names none: its pad token (the
    convention of T5-style models), else its bos token, else 0."""
    for name in ("pad_token_id", "bos_token_id"):
        token = getattr(config, name, None)
        if isinstance(token, int):
            return token
    return 0


def _quiet_defaults(default: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Dropouts off (deterministic, comparable runs) and special token ids the vocabulary holds."""
    quiet: dict[str, Any] = {}
    for name, value in default.to_dict().items():
        dropout = name.endswith(("pdrop", "dropout", "dropout_prob", "dropout_rate"))
        if dropout and isinstance(value, float) and value > 0:
            quiet[name] = 0.0
    vocab = values.get("vocab_size")
    for name in SPECIAL_TOKENS:
        token = getattr(default, name, None)
        if isinstance(vocab, int) and isinstance(token, int) and token >= vocab:
            quiet[name] = None  # a shrunken vocabulary no longer holds the default ids
    if "decoder_start_token_id" in quiet:  # decoding needs one: the pad token, or 0
        pad = values.get("pad_token_id", quiet.get("pad_token_id",
                                                    getattr(default, "pad_token_id", None)))
        quiet["decoder_start_token_id"] = pad if isinstance(pad, int) else 0
    return quiet


def _size(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def example_kwargs(
    cls: type, config: Any, batch_size: int, seq_len: int, device: torch.device, seed: int
) -> dict[str, torch.Tensor]:
    """A batch the model's ``forward`` takes and computes its loss from: its main input (by
    the signature), ``labels`` for its head, and the inputs those need (``attention_mask``
    for masked LMs, ``decoder_input_ids`` where ``forward`` takes them)."""
    takes = inspect.signature(cls.forward).parameters
    main = next((name for name in MAIN_INPUTS if name in takes), None)
    if main is None:
        raise ModelSpecError(
            f"hf: {cls.__name__}.forward takes none of {', '.join(MAIN_INPUTS)}; tripar makes "
            "example batches for text, image and audio models; build the model in a file "
            "(path/to/file.py:function) that returns it with its example inputs"
        )
    generator = torch.Generator().manual_seed(seed)
    batch = {main: _main_input(main, config, batch_size, seq_len, device, generator)}
    if "labels" not in takes:
        return batch
    head = _head(cls.__name__, config)
    vocab = getattr(config, "vocab_size", None) or 2
    classes = max(getattr(config, "num_labels", 2), 1)
    shape = (batch_size, seq_len)
    if head == "sample":
        batch["labels"] = random_ids((batch_size,), classes, device, generator)
    elif head == "token":
        batch["labels"] = random_ids(shape, classes, device, generator)
    elif head == "causal":
        batch["labels"] = batch[main].clone()
    elif head == "masked":
        batch.update(_masked(batch[main], device, generator))
    else:  # sequence to sequence: target ids, and the decoder's inputs made from them
        labels = random_ids(shape, vocab, device, generator)
        batch["labels"] = labels
        if "decoder_input_ids" in takes:
            start = config.decoder_start_token_id
            batch["decoder_input_ids"] = torch.cat(
                [torch.full((batch_size, 1), start, dtype=labels.dtype, device=device),
                 labels[:, :-1]], dim=1)
    return batch


def _head(class_name: str, config: Any) -> str:
    """What the labels of the class's head are: one per ``sample``, one per ``token``,
    ``causal`` (the inputs themselves), ``masked`` or ``seq2seq`` (target ids)."""
    if class_name.endswith(("SequenceClassification", "ImageClassification",
                            "AudioClassification", "ImageClassificationWithTeacher")):
        return "sample"
    if class_name.endswith("TokenClassification"):
        return "token"
    if "MaskedLM" in class_name:
        return "masked"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return "causal"


def _main_input(name: str, config: Any, batch_size: int, seq_len: int, device: torch.device,
                generator: torch.Generator) -> torch.Tensor:
    if name == "input_ids":
        return random_ids((batch_size, seq_len), getattr(config, "vocab_size", None) or 2,
                          device, generator)
    if name == "pixel_values":
        size = getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = getattr(config, "num_channels", 3)
        return random_floats((batch_size, channels, height, width), device, generator)
    if name == "input_features":
        bins = getattr(config, "num_mel_bins", None)
        if bins is not None:  # (mel bins, frames): the encoder's two strided convs halve them
            frames = 2 * getattr(config, "max_source_positions", seq_len)
            return random_floats((batch_size, bins, frames), device, generator)
        width = (getattr(config, "input_feat_per_channel", 80)
                 * getattr(config, "input_channels", 1))
        return random_floats((batch_size, seq_len, width), device, generator)
    strides = 1  # input_values: raw audio, as many samples as the feature encoder consumes
    for stride in getattr(config, "conv_stride", ()) or ():
        strides *= stride
    return random_floats((batch_size, seq_len * strides), device, generator)


def _masked(ids: torch.Tensor, device: torch.device, generator: torch.Generator
            ) -> dict[str, torch.Tensor]:
    """Labels for about 15% of the tokens (at least the first of each sample), -100 else."""
    if device.type == "meta":
        return {"labels": ids.clone(), "attention_mask": torch.empty_like(ids)}
    chosen = torch.rand(ids.shape, generator=generator) < 0.15
    chosen[:, 0] = True
    labels = torch.where(chosen, ids.cpu(), -100).to(device)
    return {"labels": labels, "attention_mask": torch.ones_like(ids)}


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
    spec = f"hf:{class_name}:" + ",".join(f"{k}={_text(parse_value(v))}"
                                          for k, v in options.items())
    return LoadedModel(
        model=model, example_inputs=(),
        example_kwargs=example_kwargs(cls, config, batch_size, seq_len, device, seed),
        config={k: v for k, v in sizes.items() if v is not None}, spec=spec.rstrip(":"),
        family="hf",
    )
