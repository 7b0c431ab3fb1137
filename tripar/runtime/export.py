"""Standard checkpoints out of a tripar checkpoint: transformers, a torch state dict, DCP.

``export_checkpoint(CKPT, to, OUT)`` (and ``tripar export CKPT --to FORMAT OUT``) reads
the whole model from a checkpoint ``ParallelModel.save`` / ``tripar train --save`` wrote,
under any plan, in one process and without a process group
(:func:`~tripar.runtime.checkpoint.read_state_dict`: tensor-parallel slices and fused
weights' parts put back together, a tied weight under each of its names), and writes it as

- ``hf``: a transformers model directory (``config.json`` and ``model.safetensors``,
  sharded above ``max_shard_size``) that ``from_pretrained`` loads; for models that are
  transformers models (``hf:`` specs, model directories, or a ``PreTrainedModel`` given
  to ``auto_parallel``), rebuilt from the class and config the checkpoint records;
- ``torch``: one file of ``torch.save(state_dict)``, for ``model.load_state_dict``;
- ``dcp``: a ``torch.distributed.checkpoint`` directory of the same state dict, for
  ``dcp.load`` (which reshards it onto any layout).

The names are the original model's: those of the module given to ``auto_parallel``, or,
for ``hf:`` specs and model directories (which tripar wraps to return the loss), those
of the transformers model. Optimizer state is not exported.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from tripar.errors import ConfigError
from tripar.runtime.checkpoint import CheckpointError, read_manifest, read_state_dict

__all__ = ["FORMATS", "export_checkpoint"]

FORMATS = ("hf", "torch", "dcp")
"""What a checkpoint exports to: a transformers directory, a torch.save file, a DCP
directory."""


def export_checkpoint(checkpoint: str | os.PathLike, to: str, out: str | os.PathLike, *,
                      max_shard_size: int | str = "5GB") -> Path:
    """Write the model of tripar checkpoint ``checkpoint`` to ``out`` in format ``to``
    (``hf``, ``torch`` or ``dcp``; see the module docstring); returns ``out``.
    ``max_shard_size``: the largest safetensors file of an ``hf`` export (transformers'
    ``save_pretrained`` splits larger models and writes an index)."""
    if to not in FORMATS:
        raise ConfigError(f"cannot export to {to!r}; give one of {', '.join(FORMATS)}")
    manifest = read_manifest(checkpoint)
    out = Path(out)
    if out.exists() and (to == "torch") == out.is_dir():
        kind = "a directory" if out.is_dir() else "a file"
        raise ConfigError(f"{out} is {kind}; --to {to} writes "
                          f"{'a file' if to == 'torch' else 'a directory'}: give another path")
    source = manifest.get("transformers")
    if to == "hf":
        if not source:
            raise ConfigError(
                f"the checkpoint at {checkpoint} is of model "
                f"{manifest['model']['spec'] or 'given to auto_parallel'!r}, which is not a "
                f"transformers model, so it has no transformers directory; export it with "
                f"--to torch (a state_dict file) or --to dcp")
        _to_hf(source, _renamed(read_state_dict(checkpoint), source), out, max_shard_size)
        return out
    state = _renamed(read_state_dict(checkpoint), source)
    if to == "torch":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
    else:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():  # one process writes it all, on purpose, also
            warnings.filterwarnings("ignore", "torch.distributed is disabled")  # in a job
            dcp.save(state, checkpoint_id=out, no_dist=True)
    return out


def _renamed(state: dict[str, torch.Tensor], source: dict[str, Any] | None
             ) -> dict[str, torch.Tensor]:
    """``state`` under the transformers model's own names (without the prefix of tripar's
    wrapper), or as it is for other models."""
    prefix = source["prefix"] if source else ""
    if not prefix:
        return state
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _to_hf(source: dict[str, Any], state: dict[str, torch.Tensor], out: Path,
           max_shard_size: int | str) -> None:
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise ConfigError("--to hf needs Hugging Face transformers, which is not installed; "
                          "run: pip install 'tripar[hf]'") from None
    cls = getattr(transformers, source["class"], None)
    if cls is None:
        raise ConfigError(f"transformers {transformers.__version__} has no model class "
                          f"{source['class']!r}, which the checkpoint was trained as; install "
                          f"the transformers that trained it")
    config = cls.config_class.from_dict(dict(source["config"]))
    config.architectures = [cls.__name__]
    if hasattr(config, "use_cache"):  # tripar trains without a KV cache; generation wants one
        config.use_cache = getattr(cls.config_class(), "use_cache", True)
    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint does not hold a {cls.__name__}: it lacks {missing[:5]} and has "
            f"{unexpected[:5]} besides; it was written for another model")
    model.save_pretrained(out, state_dict=state, max_shard_size=max_shard_size)
