"""Start from pretrained weights: a transformers checkpoint directory read into a rank's
stages, each rank reading only what it holds.

A directory ``save_pretrained`` wrote holds ``config.json`` and the weights as
safetensors: one ``model.safetensors``, or shards that ``model.safetensors.index.json``
names. Tensors are matched by the model's original FQNs; a tied weight by any of its
names (a checkpoint keeps one of them). The checkpoint's names may be those of a
submodule of the model (a transformers model inside a wrapper, such as an ``hf:`` spec's
``HFLoss``: ``model.`` + the name): the one prefix that matches the most names is used.

:func:`match_pretrained` checks a directory against a model before anything runs: every
tensor of the model has one in the checkpoint, the checkpoint has none the model lacks,
and each shape agrees. It reads only the files' headers, and works for a model on the
meta device. :func:`load_pretrained` then fills a rank's tensors: each ``LocalParam`` is
cut from the checkpoint with the same ``LocalParam.cut`` that loads tripar's own
checkpoints, applied to safetensors' lazy slices, so a rank reads its boxes (the whole
tensor, its tensor-parallel slice, or one slice per part of a fused weight) and nothing
else; no rank holds a copy of the whole model.

>>> import tempfile, torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
>>> directory = tempfile.mkdtemp()
>>> from safetensors.torch import save_file
>>> save_file({"0.weight": torch.ones(2, 4), "0.bias": torch.zeros(2)},
...           f"{directory}/model.safetensors")
>>> match_pretrained(model, directory).names
{'0.weight': '0.weight', '0.bias': '0.bias'}
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tripar.errors import ConfigError
from tripar.graph import param_groups
from tripar.runtime.params import LocalParam

__all__ = ["Pretrained", "load_pretrained", "match_pretrained", "weight_map"]

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


@dataclass(frozen=True)
class Pretrained:
    """Where each of a model's tensors is in a checkpoint directory."""

    directory: Path
    names: dict[str, str]
    """Model FQN (every name of a tied weight) -> the checkpoint's name for it."""
    files: dict[str, str]
    """Checkpoint name -> the safetensors file (in ``directory``) that holds it."""


def _safe_open() -> Any:
    try:
        from safetensors import safe_open
    except ImportError:
        raise ConfigError("reading a transformers checkpoint needs the safetensors package; "
                          "run: pip install 'tripar[hf]'") from None
    return safe_open


def weight_map(directory: str | os.PathLike, flag: str = "init_from=") -> dict[str, str]:
    """Checkpoint name -> file, from the index of a sharded checkpoint or the one file; a
    ConfigError naming ``flag`` when ``directory`` holds neither."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{flag}{directory}: no such directory; give the directory "
                          "save_pretrained wrote (config.json and model.safetensors)")
    index = directory / INDEX
    if index.is_file():
        try:
            files = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{flag}{directory}: {INDEX} is unreadable ({type(error).__name__}"
                              f": {str(error)[:120]}); save the model again with "
                              "save_pretrained") from None
        missing = sorted({f for f in files.values() if not (directory / f).is_file()})
        if missing:
            raise ConfigError(f"{flag}{directory}: {INDEX} names files that are not there "
                              f"({missing[:3]}); copy the whole directory")
        return dict(files)
    if (directory / SINGLE).is_file():
        with _safe_open()(str(directory / SINGLE), framework="pt") as handle:
            return {name: SINGLE for name in handle.keys()}
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = (f"it holds {others[:3]}: load the model in transformers and save it again with "
            "save_pretrained (safetensors is its default)" if others
            else "give the directory save_pretrained wrote")
    raise ConfigError(f"{flag}{directory}: no {SINGLE} and no {INDEX}; {hint}")


def _prefix(model_names: list[str], checkpoint_names: set[str]) -> str:
    """The prefix P (``""`` or ending in ``.``) for which most model names are P + a
    checkpoint name; the shortest among equals."""
    counts: Counter[str] = Counter()
    for name in model_names:
        cut = 0
        while True:
            if name[cut:] in checkpoint_names:
                counts[name[:cut]] += 1
            cut = name.find(".", cut) + 1
            if cut == 0:
                break
    if not counts:
        return ""
    return min(counts, key=lambda p: (-counts[p], len(p)))


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def match_pretrained(model: nn.Module, directory: str | os.PathLike, *,
                     flag: str = "init_from=") -> Pretrained:
    """Where each tensor of ``model`` is in the checkpoint ``directory``; a ConfigError,
    naming ``flag`` and what differs, when the directory is not a checkpoint of this model
    (missing or extra names, other shapes). Reads only the files' headers."""
    path = Path(directory)
    files = weight_map(path, flag)
    groups = list(param_groups(model))
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    params = set(tensors)
    for name, buffer in model.state_dict(keep_vars=True).items():
        if name not in params:  # a persistent buffer: a group of its own
            groups.append((name,))
            tensors[name] = buffer
    prefix = _prefix([n for g in groups for n in g], set(files))
    names: dict[str, str] = {}
    missing = []
    for group in groups:
        found = [n[len(prefix):] for n in group
                 if n.startswith(prefix) and n[len(prefix):] in files]
        if not found:
            missing.append(group[0])
            continue
        names.update((n, found[0]) for n in group)
    fix = (f"build the model from the checkpoint's config (AutoConfig.from_pretrained("
           f"'{path}'), or `tripar train --init-from DIR` without MODEL), or give the "
           "checkpoint of this model")
    if missing:
        raise ConfigError(f"{flag}{path}: the checkpoint has no tensor for {len(missing)} of "
                          f"the model's {len(groups)} ({_listed(missing)}); it is the "
                          f"checkpoint of another model: {fix}")
    unexpected = sorted(set(files) - set(names.values()))
    if unexpected:
        raise ConfigError(f"{flag}{path}: the checkpoint has {len(unexpected)} tensors the "
                          f"model does not ({_listed(unexpected)}); it is the checkpoint of "
                          f"another model: {fix}")
    by_file: dict[str, list[str]] = {}
    for fqn, name in names.items():
        by_file.setdefault(files[name], []).append(fqn)
    wrong = []
    safe_open = _safe_open()
    for file, fqns in sorted(by_file.items()):
        with safe_open(str(path / file), framework="pt") as handle:
            for fqn in fqns:
                shape = list(handle.get_slice(names[fqn]).get_shape())
                if shape != list(tensors[fqn].shape):
                    wrong.append(f"{fqn}: {shape} in the checkpoint, "
                                 f"{list(tensors[fqn].shape)} in the model")
    if wrong:
        raise ConfigError(f"{flag}{path}: {len(wrong)} tensors differ in shape "
                          f"({_listed(sorted(wrong))}); the model's config is not the "
                          f"checkpoint's config.json: {fix}")
    return Pretrained(path, names, {name: files[name] for name in names.values()})


def load_pretrained(pretrained: Pretrained, params: Iterable[LocalParam],
                    tensors: Mapping[str, torch.Tensor]) -> int:
    """Copy into each of ``params`` the part of its tensor it holds, and into ``tensors``
    (buffers by FQN, whole) theirs, read from the checkpoint's lazy slices (a name the
    checkpoint does not hold, a buffer it need not keep, is left as it is). Returns the
    number of values read."""
    handles: dict[str, Any] = {}
    safe_open = _safe_open()
    read = 0
    with ExitStack() as stack, torch.no_grad():
        def slice_of(fqn: str) -> Any:
            name = pretrained.names[fqn]
            file = pretrained.files[name]
            if file not in handles:
                handles[file] = stack.enter_context(
                    safe_open(str(pretrained.directory / file), framework="pt"))
            return handles[file].get_slice(name)

        for lp in params:
            value = lp.cut(slice_of(lp.fqn))
            lp.param.copy_(value)
            read += value.numel()
        for name, tensor in tensors.items():
            if name in pretrained.names:
                value = slice_of(name)[...]
                tensor.copy_(value)
                read += value.numel()
    return read
