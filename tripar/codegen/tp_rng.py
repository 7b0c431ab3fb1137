"""Random streams for tensor parallelism (Megatron's ``get_cuda_rng_tracker``, on any device).

Dropout on a *replicated* tensor must draw the same mask on every tensor-parallel
rank (the ranks compute the same values), so it uses the default generator, seeded
alike on all of them. Dropout on a *sharded* tensor (attention probabilities split
by heads, an MLP's hidden features) must draw independent masks per rank, as the
unsharded model draws independent numbers for different heads. An `RNGTracker` keeps
named generator states apart from the default one; ``with tracker.fork():`` swaps the
``tensor-parallel`` state in for the duration of a call and swaps it back, so the
default stream advances identically on every rank. `ForkedRNG` is the graph module
the rewrite puts around a random op of a sharded region.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["TP_RNG", "ForkedRNG", "RNGTracker", "tp_rng_tracker"]

TP_RNG = "tensor-parallel"
"""The name of the stream sharded regions draw from."""

TP_SEED_OFFSET = 2718
"""Added to the seed (plus the tp rank) for the tensor-parallel stream, as Megatron does."""


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGTracker:
    """Named generator states for ``device`` (``cpu`` or a CUDA device), forked in and out of
    the default generator. Deep copies share the tracker (one per process).

    >>> tracker = RNGTracker()
    >>> tracker.add("tp", seed=7)
    >>> before = torch.get_rng_state()
    >>> with tracker.fork("tp"):
    ...     a = torch.rand(2)
    >>> torch.equal(torch.get_rng_state(), before)
    True
    >>> torch.equal(a, torch.rand(2, generator=torch.Generator().manual_seed(7)))
    True
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._states: dict[str, torch.Tensor] = {}

    def __deepcopy__(self, memo: dict) -> RNGTracker:
        return self

    def add(self, name: str, seed: int) -> None:
        """Start the stream ``name`` from ``seed``."""
        if name in self._states:
            raise ValueError(f"random stream {name!r} already exists")
        if self.device.type == "cuda":
            saved = _get_state(self.device)
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(seed)
            self._states[name] = _get_state(self.device)
            _set_state(self.device, saved)
        else:
            self._states[name] = torch.Generator().manual_seed(seed).get_state()

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copies of every stream's state (to replay a forward when recomputing)."""
        return {k: v.clone() for k, v in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = TP_RNG) -> Iterator[None]:
        """Draw from stream ``name`` inside the block; the default stream is untouched."""
        if name not in self._states:
            raise KeyError(f"random stream {name!r} was never added (known: {sorted(self._states)})")
        saved = _get_state(self.device)
        _set_state(self.device, self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_state(self.device)
            _set_state(self.device, saved)


def tp_rng_tracker(seed: int, tp_rank: int, device: str | torch.device = "cpu") -> RNGTracker:
    """A tracker whose ``tensor-parallel`` stream starts at ``seed + 2718 + tp_rank``."""
    tracker = RNGTracker(device)
    tracker.add(TP_RNG, seed + TP_SEED_OFFSET + tp_rank)
    return tracker


def _call_method(name: str, obj: Any, *args: Any, **kwargs: Any) -> Any:
    return getattr(obj, name)(*args, **kwargs)


def method_caller(name: str) -> Callable[..., Any]:
    """A picklable ``lambda obj, *a, **k: obj.name(*a, **k)``."""
    return functools.partial(_call_method, name)


class ForkedRNG(nn.Module):
    """Runs ``fn`` (a function or a module) with the tracker's stream ``name`` forked in."""

    def __init__(self, fn: Callable[..., Any], tracker: RNGTracker, name: str = TP_RNG) -> None:
        super().__init__()
        self.fn = fn  # a module becomes a child, a function a plain attribute
        self.tracker, self.stream = tracker, name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.tracker.fork(self.stream):
            return self.fn(*args, **kwargs)

    def meta_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The op on the default stream: on fake tensors only shapes matter, and no
        stream is forked (``tripar.graph.values`` runs this instead of ``forward``)."""
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        fn = self.fn if isinstance(self.fn, nn.Module) else getattr(self.fn, "__name__", self.fn)
        return f"stream={self.stream!r}" + ("" if isinstance(self.fn, nn.Module) else f", fn={fn}")
