"""Mixed precision: stage modules run under autocast, weights and optimizer stay fp32.

``precision="bf16"`` (``tripar.auto_parallel``, ``tripar train --precision bf16``) wraps
every stage module in :class:`Autocast`: its forward (and so its backward, and a
recompute's forward) runs under ``torch.autocast`` with bfloat16, so matmuls read bf16
copies of the fp32 weights, while the parameters, their gradients and the optimizer's
state stay fp32 (the master weights). What leaves a stage -- the activations sent to the
next stage, the loss -- is cast back to the dtype the plan's wire specs were captured
with (fp32), so the pipeline's transfers and the loss function see the same dtypes as
in fp32 training.

>>> import torch
>>> stage = Autocast(torch.nn.Linear(4, 4), "bf16", torch.device("cpu"))
>>> out = stage(torch.ones(2, 4))
>>> out.dtype, stage.module.weight.dtype
(torch.float32, torch.float32)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tripar.errors import ConfigError

__all__ = ["PRECISIONS", "Autocast", "check_precision"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
"""Precision name -> autocast dtype (None: no autocast)."""


def check_precision(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision``; ConfigError naming the choices otherwise."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of "
                          f"{', '.join(PRECISIONS)} (bf16: autocast with fp32 master weights)")
    return PRECISIONS[precision]


class Autocast(nn.Module):
    """``module`` run under ``torch.autocast`` at ``precision``; floating outputs cast to
    ``out_dtype``."""

    def __init__(self, module: nn.Module, precision: str, device: torch.device,
                 out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.module = module
        self.dtype = check_precision(precision)
        self.device_type = device.type
        self.out_dtype = out_dtype

    def forward(self, *args: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            out = self.module(*args)
        return _cast(out, self.out_dtype)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return type(value)({k: _cast(v, dtype) for k, v in value.items()})
    return value
