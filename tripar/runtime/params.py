"""What part of an original tensor a rank holds: ``LocalParam`` and its boxes.

>>> import torch
>>> lp = LocalParam("w", torch.nn.Parameter(torch.ones(2, 3)), (4, 3), (((2, 4), (0, 3)),))
>>> lp.cut(torch.arange(12.).reshape(4, 3)).tolist()
[[6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Box", "LocalParam", "whole_box"]

Box = tuple[tuple[int, int], ...]
"""``[start, stop)`` per dim of an original tensor."""


@dataclass(frozen=True, slots=True)
class LocalParam:
    """One parameter this rank holds, and what part of the original tensor it is.

    Without tensor parallelism a rank holds the whole tensor: one box covering it. A
    tensor-parallel slice is one box, or, for a fused weight (QKV) cut per part, one box
    per part; the local tensor is the concatenation of the boxes along ``dim``.
    """

    fqn: str
    """Canonical FQN in the original model."""
    param: nn.Parameter
    shape: tuple[int, ...]
    """Shape of the whole original tensor."""
    boxes: tuple[Box, ...]
    """The boxes of the original tensor that ``param`` holds, concatenated along ``dim``."""
    dim: int = 0
    counts: bool = True
    """Whether this copy counts in sums over ranks (False: a tensor-parallel replica,
    counted on tensor-parallel rank 0)."""

    @classmethod
    def whole(cls, fqn: str, param: nn.Parameter) -> LocalParam:
        """The whole original tensor ``param``."""
        return cls(fqn, param, tuple(param.shape), (whole_box(param.shape),))

    def pieces(self, local: torch.Tensor) -> list[tuple[Box, torch.Tensor]]:
        """``local`` (shaped like ``param``: the parameter or an elementwise optimizer state)
        cut into its boxes: (box, the part of ``local`` holding it)."""
        if len(self.boxes) == 1:
            return [(self.boxes[0], local)]
        sizes = [hi - lo for lo, hi in (box[self.dim] for box in self.boxes)]
        return list(zip(self.boxes, local.split(sizes, dim=self.dim)))

    def cut(self, full: Any) -> torch.Tensor:
        """This rank's part of ``full``: the original tensor, or anything that gives a box
        of it when indexed by a tuple of slices (a safetensors slice, which then reads only
        this rank's boxes)."""
        parts = [full[tuple(slice(lo, hi) for lo, hi in box)] for box in self.boxes]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


def whole_box(shape: Sequence[int]) -> Box:
    """The box covering a whole tensor of ``shape``."""
    return tuple((0, int(n)) for n in shape)
