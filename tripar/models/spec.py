"""MODEL spec strings: parsing, and building a model with its example batch.

Three forms are understood:

- ``family[:key=value,...]``: a zoo model (``gpt``, ``llama``, ``bert``, ``vit``,
  ``resnet``, ``t5``); the keys are the fields of the family's config class,
  a bare family name gives its small default.
- ``path/to/file.py:function``: a user function returning a module (see
  :mod:`tripar.models.custom`).
- ``hf:ClassName:key=value,...``: a Hugging Face transformers class built from
  its config (see :mod:`tripar.models.hf`); ``hf:DIR:key=value,...`` builds the class
  and config a checkpoint directory's ``config.json`` names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tripar.errors import ConfigError, ModelSpecError
from tripar.models.custom import load_file_model
from tripar.models.hf import load_hf_model, split_items
from tripar.models.loaded import LoadedModel, seeded

# family -> (module, config class, model class)
ZOO: dict[str, tuple[str, str, str]] = {
    "gpt": ("tripar.models.gpt", "GPTConfig", "GPT"),
    "llama": ("tripar.models.llama", "LlamaConfig", "Llama"),
    "bert": ("tripar.models.bert", "BertConfig", "Bert"),
    "vit": ("tripar.models.vit", "ViTConfig", "ViT"),
    "resnet": ("tripar.models.resnet", "ResNetConfig", "ResNet"),
    "t5": ("tripar.models.t5", "T5Config", "T5"),
}

FORMS = (
    "a zoo model such as 'gpt' or 'gpt:layers=2,hidden=64,heads=4,vocab=128,seq=16' "
    f"(families: {', '.join(ZOO)}), 'path/to/file.py:function', or "
    "'hf:ClassName:key=value,...' (hf:path/to/model_dir for a transformers model directory)"
)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split a MODEL spec into its family and raw ``key -> value`` strings.

    File specs give ``("file", {"path": ..., "function": ...})``; Hugging Face
    specs give ``("hf", {"class": ..., key: value, ...})``, ``class`` a class name or
    a model directory.

    >>> parse_spec("gpt:layers=2,hidden=64")
    ('gpt', {'layers': '2', 'hidden': '64'})
    >>> parse_spec("hf:GPT2LMHeadModel:n_layer=2")
    ('hf', {'class': 'GPT2LMHeadModel', 'n_layer': '2'})
    >>> parse_spec("hf:SwinModel:depths=[2,2],embed_dim=32")
    ('hf', {'class': 'SwinModel', 'depths': '[2,2]', 'embed_dim': '32'})
    >>> parse_spec("models/mine.py:build")
    ('file', {'path': 'models/mine.py', 'function': 'build'})
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty MODEL spec; give {FORMS}")
    spec = spec.strip()
    path, sep, function = spec.rpartition(":")
    if sep and path.endswith(".py"):
        if not function.isidentifier():
            raise ModelSpecError(
                f"MODEL spec {spec!r}: {function!r} is not a function name; "
                "write path/to/file.py:function"
            )
        return "file", {"path": path, "function": function}
    if spec.endswith(".py"):
        raise ModelSpecError(
            f"MODEL spec {spec!r} names a file but no function; write {spec}:function, "
            "where function returns the module (and optionally its example inputs)"
        )
    family, _, rest = spec.partition(":")
    family = family.strip().lower()
    if family == "hf":
        class_name, _, rest = rest.partition(":")
        class_name = class_name.strip()
        if not class_name.isidentifier() and not os.path.isdir(class_name):
            raise ModelSpecError(
                f"MODEL spec {spec!r}: give a transformers class after 'hf:', "
                "e.g. hf:GPT2LMHeadModel:n_layer=2,n_embd=64,n_head=4, or a directory "
                "with a config.json (hf:path/to/checkpoint)"
            )
        return "hf", {"class": class_name, **_parse_pairs(spec, rest)}
    if family not in ZOO:
        raise ModelSpecError(f"unknown model {family!r} in MODEL spec {spec!r}; give {FORMS}")
    return family, _parse_pairs(spec, rest)


def _parse_pairs(spec: str, text: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    if text.count("[") != text.count("]"):
        raise ModelSpecError(f"MODEL spec {spec!r}: unbalanced brackets; write list values "
                             "as key=[a,b,...]")
    for item in split_items(text):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ModelSpecError(
                f"MODEL spec {spec!r}: {item.strip()!r} is not key=value; "
                "write keys as key=value separated by commas"
            )
        if key in pairs:
            raise ModelSpecError(f"MODEL spec {spec!r}: key {key!r} is given twice")
        pairs[key] = value
    return pairs


def zoo_classes(family: str) -> tuple[type, type[nn.Module]]:
    """The config and model classes of a zoo family."""
    module_name, config_name, model_name = ZOO[family]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, model_name)


def accepted_keys(config_cls: type) -> tuple[str, ...]:
    """The spec keys a zoo config class accepts (its field names)."""
    return tuple(f.name for f in dataclasses.fields(config_cls))


def build_config(family: str, raw: dict[str, str]) -> Any:
    """Turn raw spec strings into the family's config dataclass (validated).

    >>> build_config("gpt", {"layers": "3"}).layers
    3
    """
    config_cls, _ = zoo_classes(family)
    keys = accepted_keys(config_cls)
    accepted = f"{family} accepts: {', '.join(keys)}"
    types = {f.name: str(f.type) for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in types:
            raise ModelSpecError(f"{family}: unknown key {key!r}; {accepted}")
        values[key] = _convert(family, key, text, types[key], accepted)
    try:
        return config_cls(**values)
    except ModelSpecError as error:
        raise ModelSpecError(f"{error} ({accepted})") from None


def _convert(family: str, key: str, text: str, type_name: str, accepted: str) -> Any:
    try:
        if "tuple" in type_name:
            return tuple(int(part) for part in text.replace("x", "-").split("-"))
        if "bool" in type_name:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return lowered in ("true", "1")
        if "float" in type_name:
            return float(text)
        if "int" in type_name:
            return int(text)
    except ValueError:
        kind = "dash-separated ints like 3-4-6-3" if "tuple" in type_name else type_name
        raise ModelSpecError(
            f"{family}: {key}={text!r} is not a valid value (expected {kind}); {accepted}"
        ) from None
    return text


def normalise(family: str, config: Any) -> str:
    """The canonical spec string of a zoo config (every field, in field order).

    >>> from tripar.models.gpt import GPTConfig
    >>> normalise("gpt", GPTConfig(layers=1))
    'gpt:layers=1,hidden=64,heads=4,vocab=128,seq=32,ffn=256,dropout=0.0,attention=sdpa'
    """
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        text = "-".join(map(str, value)) if isinstance(value, tuple) else str(value)
        parts.append(f"{f.name}={text}")
    return f"{family}:{','.join(parts)}"


def check_device(device: str | torch.device) -> torch.device:
    """Parse a device string, raising ConfigError for a malformed one."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(
            f"device={device!r} is not a torch device ({error}); use 'cpu', 'meta' or 'cuda:0'"
        ) from None


@contextlib.contextmanager
def _initialisers_skipped() -> Iterator[None]:
    """Make ``torch.nn.init``'s in-place initialisers return their tensor untouched.

    A zoo model is built on the meta device, where an initialiser draws nothing, and
    filled by ``init_weights()`` once it has storage; at GPT-3 175B the no-op calls
    alone took 1.4 s of a 9 s ``tripar plan``.
    """
    names = [name for name in vars(nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def load_model(
    spec: str, *, batch_size: int = 1, seq_len: int | None = None, device: str = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Build the model a MODEL spec names, with an example batch that yields the loss.

    The model is built on the meta device; for any other device it is then
    materialised with ``to_empty`` and ``init_weights()`` under ``seed``, which
    is also how a meta-built model is materialised later: ``to_empty(device)``,
    ``torch.manual_seed(seed)``, ``init_weights()`` give the same weights. (An
    accelerator draws from its own RNG, so CUDA weights differ from CPU ones.)
    Example inputs are drawn on CPU from ``seed`` whatever the device, then
    moved. ``seq_len`` replaces the spec's ``seq`` (image models ignore it).

    >>> loaded = load_model("gpt:layers=1,hidden=32,heads=2,vocab=64,seq=8", batch_size=2)
    >>> loaded.example_inputs[0].shape, loaded.model(*loaded.example_inputs).dim()
    (torch.Size([2, 8]), 0)
    """
    target = check_device(device)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int)
                                or seq_len < 1):
        raise ConfigError(f"seq_len={seq_len!r} must be a positive integer or None")
    family, raw = parse_spec(spec)
    if family == "file":
        return load_file_model(raw["path"], raw["function"], batch_size=batch_size,
                               seq_len=seq_len, device=target, seed=seed)
    if family == "hf":
        options = {k: v for k, v in raw.items() if k != "class"}
        return load_hf_model(raw["class"], options, batch_size=batch_size, seq_len=seq_len,
                             device=target, seed=seed)
    config_cls, model_cls = zoo_classes(family)
    if seq_len is not None and "seq" in accepted_keys(config_cls):
        raw = {**raw, "seq": str(seq_len)}
    config = build_config(family, raw)
    with torch.device("meta"), _initialisers_skipped():
        model = model_cls(config)
    if target.type != "meta":
        model.to_empty(device=target)
        with seeded(seed, target):
            model.init_weights()
    generator = torch.Generator().manual_seed(seed)
    inputs = model.example_inputs(batch_size, generator=generator)
    return LoadedModel(model=model, example_inputs=tuple(inputs), example_kwargs={},
                       config=config.sizes(), spec=normalise(family, config), family=family)
