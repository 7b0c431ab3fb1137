"""The records of a stage: what crosses a cut (``TensorSpec``) and one stage's program
(``StageProgram``), one definition each, read by the split, the emitter and the runtime.

A ``StageProgram`` is what codegen makes and what a rank runs. The split fills in the
wiring (what the stage receives, reads and sends, the weights it holds); the assembly of
a rank (``tripar.runtime.assemble``) adds which microbatch fields feed its graph inputs
(``batch_inputs``) and wraps the module for the run (constants bound, autocast).

>>> import torch
>>> spec = TensorSpec((2, 8, 32), torch.float32, name="add_4")
>>> spec.numel, spec.dtype_name, spec.needs_grad
(512, 'float32', True)
>>> TensorSpec.of(torch.zeros(2, dtype=torch.int64))
TensorSpec(shape=(2,), dtype=torch.int64, requires_grad=None, name='')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tripar.errors import ConfigError, PlanError

__all__ = ["StageProgram", "StageSplit", "TensorSpec", "TiedGroup"]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One value crossing a stage boundary or feeding a stage, for one microbatch."""

    shape: tuple[int, ...]
    dtype: torch.dtype | str = torch.float32
    """A tensor's dtype; for a graph input that is not a tensor, its Python type's name."""
    requires_grad: bool | None = None
    """Whether a gradient flows back through it; None: yes for floating-point dtypes."""
    name: str = ""
    """The FX node (or placeholder) it is the value of; empty where it has no name."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.dtype, torch.dtype)

    @property
    def dtype_name(self) -> str:
        """``float32``, ``int64``..., or the Python type's name of a non-tensor value."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def needs_grad(self) -> bool:
        """Whether the receiver sends a gradient back for this tensor."""
        if self.requires_grad is None:
            return self.is_tensor and (self.dtype.is_floating_point or self.dtype.is_complex)
        return self.requires_grad

    def empty(self, device: torch.device) -> torch.Tensor:
        """An uninitialised buffer to receive this tensor into."""
        return torch.empty(self.shape, dtype=self.dtype, device=device)

    def check(self, t: object, what: str) -> torch.Tensor:
        """Return ``t`` if it is a tensor matching this spec; raise ConfigError naming ``what``."""
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{what} is a {type(t).__name__}, but its spec says a tensor of "
                              f"shape {self.shape} and dtype {self.dtype}")
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise ConfigError(f"{what} has shape {tuple(t.shape)} and dtype {t.dtype}, but its "
                              f"spec says shape {self.shape} and dtype {self.dtype}; fix the "
                              f"stage program's TensorSpec (shapes are per microbatch)")
        return t

    @staticmethod
    def of(t: torch.Tensor, *, requires_grad: bool | None = None, name: str = "") -> TensorSpec:
        """The spec of an example tensor."""
        return TensorSpec(tuple(t.shape), t.dtype, requires_grad, name)


@dataclass(frozen=True, slots=True)
class TiedGroup:
    """One parameter held by several stages, or known under several FQNs."""

    fqns: tuple[str, ...]
    """Every FQN naming it in the captured graph, the canonical (first registered) first."""
    stages: tuple[int, ...]
    """Stages holding a replica; gradients are summed across them when there are two or more."""


@dataclass(frozen=True, slots=True)
class StageProgram:
    """One stage: its module and how it is wired to the pipeline.

    ``module(*received, *graph_inputs)`` returns a tuple with one tensor per entry of
    ``sent`` (every stage but the last) or the graph's output (the last). At run time
    the graph inputs come from the microbatch fields ``batch_inputs``.
    """

    index: int
    """Virtual stage index; it runs on pipeline rank ``index % pp``."""
    module: nn.Module
    """The stage's GraphModule, as split; at run time, wrapped for the run."""
    received: tuple[TensorSpec, ...] = ()
    """Activations received from stage ``index - 1``, in input order."""
    sent: tuple[TensorSpec, ...] = ()
    """Activations it sends to stage ``index + 1`` (empty on the last stage)."""
    batch_inputs: tuple[int | str, ...] = ()
    """Microbatch fields (tuple positions or dict keys) passed after the received tensors
    (filled in by the assembly of a rank; the split does not know the batch's form)."""
    num_stages: int = 1
    blocks: tuple[str, ...] = ()
    """Block names it holds (empty when split by node lists alone)."""
    graph_inputs: tuple[TensorSpec, ...] = ()
    """Graph inputs it reads directly, in input order after ``received``."""
    graph_input_positions: tuple[int, ...] = ()
    """Position of each of ``graph_inputs`` in the flat list of the graph's inputs."""
    params: tuple[tuple[str, str], ...] = ()
    """(local parameter name, FQN in the captured graph), in ``named_parameters`` order."""
    replicas: tuple[str, ...] = ()
    """Local names of parameters other stages hold too (gradients summed across them)."""
    recomputed: tuple[str, ...] = ()
    """Nodes this stage recomputes that another stage (or none) was assigned."""

    def __post_init__(self) -> None:
        for name in ("received", "sent", "batch_inputs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.module, nn.Module):
            raise ConfigError(f"stage {self.index}: module must be an nn.Module, "
                              f"got {type(self.module).__name__}")

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.received + self.graph_inputs)

    def split_inputs(self, activations: Sequence[Any], graph_inputs: Sequence[Any]) -> tuple:
        """The positional arguments of ``module``: received activations, then this stage's
        own graph inputs picked from the flat list of all graph inputs."""
        if len(activations) != len(self.received):
            raise PlanError(f"stage {self.index} expects {len(self.received)} received "
                            f"tensors ({[s.name for s in self.received]}), got {len(activations)}")
        mine = tuple(graph_inputs[p] for p in self.graph_input_positions)
        return tuple(activations) + mine


@dataclass(frozen=True, slots=True)
class StageSplit:
    """The stage programs of one pipeline, in pipeline order, and the tied parameters."""

    stages: tuple[StageProgram, ...]
    tied: tuple[TiedGroup, ...]
    """Parameters held by more than one stage, or with more than one FQN."""
    graph_inputs: tuple[TensorSpec, ...]
    """Every input of the captured graph, flat, in order."""

    def param_map(self) -> dict[int, dict[str, str]]:
        """Stage index -> {local parameter name: FQN}."""
        return {s.index: dict(s.params) for s in self.stages}
