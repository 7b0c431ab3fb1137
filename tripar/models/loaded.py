"""What every MODEL spec form gives back (:class:`LoadedModel`), and the seeded RNG
under which zoo, file and Hugging Face models are all initialised."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class LoadedModel:
    """A built model with an example batch for which ``forward`` returns the loss."""

    model: nn.Module
    example_inputs: tuple
    """Positional arguments of ``forward`` (targets included)."""
    example_kwargs: dict = field(default_factory=dict)
    """Keyword arguments of ``forward`` (empty for zoo models)."""
    config: dict = field(default_factory=dict)
    """Sizes (layers, hidden, heads, kv_heads, vocab, seq, ffn, ... as apply), plain ints."""
    spec: str = ""
    """The normalised spec string."""
    family: str = ""
    """``gpt``, ``llama``, ``bert``, ``vit``, ``resnet``, ``t5``, ``file`` or ``hf``."""


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Fork the global RNG (CPU, and ``device``'s accelerator if any) and seed it.

    >>> with seeded(0, torch.device("cpu")):
    ...     first = torch.rand(2)
    >>> with seeded(0, torch.device("cpu")):
    ...     torch.equal(torch.rand(2), first)
    True
    """
    if device.type in ("cpu", "meta"):
        devices, device_type = [], "cuda"
    else:
        devices, device_type = [device.index or 0], device.type
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.manual_seed(seed)
        yield
