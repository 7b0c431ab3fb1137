"""Pieces the zoo models share: config checks, initialisation, example inputs."""

from __future__ import annotations

import math

import torch
from torch import nn

from tripar.errors import ModelSpecError


def require_positive(family: str, **values: int) -> None:
    """Raise ModelSpecError unless every value is an int >= 1."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelSpecError(
                f"{family}: {key}={value!r} must be a positive integer; give {key}=N with N >= 1"
            )


def require_divisible(family: str, key: str, value: int, by_key: str, by: int) -> None:
    """Raise ModelSpecError unless ``value`` is a multiple of ``by``."""
    if value % by:
        lower = value - value % by
        hint = f"{key}={lower} or {key}={lower + by}" if lower else f"{key}={by}"
        raise ModelSpecError(
            f"{family}: {key}={value} is not divisible by {by_key}={by}; "
            f"make {key} a multiple of {by_key} (e.g. {hint})"
        )


def require_probability(family: str, key: str, value: float) -> None:
    """Raise ModelSpecError unless ``0 <= value < 1``."""
    if not 0.0 <= value < 1.0:
        raise ModelSpecError(f"{family}: {key}={value} must be in [0, 1)")


ATTENTION = ("sdpa", "eager")
"""How a zoo model computes attention: PyTorch's fused kernel or the written-out path."""


def require_attention(family: str, value: str) -> None:
    """Raise ModelSpecError unless ``value`` is one of ATTENTION."""
    if value not in ATTENTION:
        raise ModelSpecError(f"{family}: attention={value!r} is not one of "
                             f"{', '.join(ATTENTION)}")


def causal_softmax(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal attention probabilities ``softmax(q k^T / sqrt(d))`` with future positions
    masked, written out (the unfused path: the scores and probabilities are tensors of
    ``heads x s x s`` per sample). ``q``, ``k``: (B, nh, T, hd)."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def init_linear(linear: nn.Linear, std: float = 0.02) -> None:
    """Normal(0, std) weight, zero bias (GPT-2 / BERT style)."""
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def init_norm(norm: nn.Module) -> None:
    """Unit weight, zero bias for LayerNorm / RMSNorm."""
    if getattr(norm, "weight", None) is not None:
        nn.init.ones_(norm.weight)
    if getattr(norm, "bias", None) is not None:
        nn.init.zeros_(norm.bias)


def model_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (CPU for a module without any)."""
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def default_generator(generator: torch.Generator | None, seed: int = 0) -> torch.Generator:
    """``generator`` or a fresh CPU generator seeded with ``seed``."""
    return generator if generator is not None else torch.Generator().manual_seed(seed)


def random_ids(
    shape: tuple[int, ...], high: int, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """Integer ids in ``[0, high)``; drawn on CPU from ``generator``, an empty tensor on meta."""
    if device.type == "meta":
        return torch.empty(shape, dtype=torch.long, device=device)
    return torch.randint(0, high, shape, generator=generator).to(device)


def random_floats(
    shape: tuple[int, ...], device: torch.device, generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard-normal values (images); drawn on CPU from ``generator``, empty on meta."""
    if device.type == "meta":
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def check_seq_len(family: str, seq_len: int, limit: int) -> None:
    """Raise ModelSpecError when a requested sequence is longer than the model's positions."""
    require_positive(family, seq_len=seq_len)
    if seq_len > limit:
        raise ModelSpecError(
            f"{family}: seq_len={seq_len} exceeds the model's seq={limit} positions; "
            f"build the model with seq={seq_len} or ask for seq_len <= {limit}"
        )


def llama_ffn(hidden: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4*hidden, rounded up to a multiple of ``multiple_of``."""
    width = int(2 * 4 * hidden / 3)
    return multiple_of * math.ceil(width / multiple_of)
