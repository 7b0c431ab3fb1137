"""The capture pass: a model and one example batch into what the later passes read.

:func:`capture_model` runs capture -> annotate -> build the proxy graph, and records
how batches feed the graph (which batch field feeds each flat graph input). The
result, :class:`Captured`, is what the planner (its ``graph``), codegen (its ``gm`` and
flat inputs) and the assembly of a rank (its batch layout) read. It also keeps what
later builds from the same capture reuse, each in its own typed table: the capture for
each microbatch size, that graph's node values, and the stage splits.

>>> import torch
>>> from tripar.models import load_model
>>> loaded = load_model("gpt:layers=1,hidden=16,heads=2,vocab=32,seq=8", batch_size=2)
>>> captured = capture_model(loaded.model, loaded.example_inputs)
>>> captured.form, captured.keys, captured.batch_size, captured.graph.seq_len
('tuple', (0, 1), 2, 8)
>>> for_micro_batch(captured, 1).constants[0].shape
torch.Size([1, 8])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tripar.errors import ConfigError
from tripar.graph.annotate import annotate
from tripar.graph.build import build_proxy_graph
from tripar.graph.capture import capture, flat_graph_inputs
from tripar.graph.proxy import ProxyGraph

__all__ = ["Captured", "analyze", "batch_size", "capture_model", "example_sizes",
           "for_micro_batch"]


@dataclass(frozen=True, eq=False)
class Captured:
    """A model's graph for an example batch, and how batches feed it."""

    model: nn.Module
    gm: torch.fx.GraphModule
    graph: ProxyGraph
    """The proxy graph (blocks, costs, TP regions) the planner reads."""
    form: str
    """``tuple`` (positional example) or ``dict`` (keyword example)."""
    example: tuple | dict = field(repr=False)
    """The example batch, in its form."""
    keys: tuple[int | str | None, ...]
    """Batch field feeding each flat graph input (None: a constant, e.g. a default)."""
    constants: tuple[Any, ...]
    """The value of each flat graph input in the example (used where ``keys`` is None)."""
    micro: dict[int, Captured] = field(default_factory=dict, repr=False)
    """Microbatch size -> the capture for it (:func:`for_micro_batch`)."""
    values: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    """Microbatch size -> its graph's node values (shape propagation is most of a
    split's cost; codegen's ``propagate_values``)."""
    splits: dict[Any, Any] = field(default_factory=dict, repr=False)
    """The stage splits made from this capture, keyed by codegen's ``SplitKey`` (a
    split depends on nothing else, so plans that cut the model alike share one)."""

    @property
    def batch_size(self) -> int:
        return batch_size(self.example)

    @property
    def args(self) -> tuple:
        """The example as positional arguments (empty for a keyword example)."""
        return self.example if isinstance(self.example, tuple) else ()

    @property
    def kwargs(self) -> dict:
        """The example as keyword arguments (empty for a positional example)."""
        return self.example if isinstance(self.example, dict) else {}


class _Field:
    """Stands for a batch field while the graph's inputs are flattened."""

    def __init__(self, key: int | str) -> None:
        self.key = key


def batch_size(example: tuple | Mapping) -> int:
    """The batch size (dim 0) shared by the example's tensors; ConfigError if none or many."""
    values = example.values() if isinstance(example, Mapping) else example
    sizes = {int(t.shape[0]) for t in values if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ConfigError(f"the example batch needs tensors with one batch size (dim 0); "
                          f"found sizes {sorted(sizes)}")
    return sizes.pop()


def example_sizes(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """(batch size, sequence length) of an example: the first two dims of its first tensor
    of rank >= 1 (sequence length 1 for a rank-1 tensor; (1, 1) without tensors)."""
    tensors = [t for t in list(args) + list(kwargs.values())
               if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not tensors:
        return 1, 1
    first = tensors[0]
    return int(first.shape[0]), int(first.shape[1]) if first.dim() >= 2 else 1


def _resize(example: tuple | dict, size: int) -> tuple | dict:
    """The example with ``size`` samples (its first ones, repeated if it has fewer)."""
    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        reps = -(-size // t.shape[0])
        return (t if reps == 1 else torch.cat([t] * reps))[:size]
    if isinstance(example, Mapping):
        return {k: one(v) for k, v in example.items()}
    return tuple(one(v) for v in example)


def _analyzed(model: nn.Module, args: tuple, kwargs: dict, *, batch: int, seq: int,
              model_config: dict | None, leaf_modules: Sequence[type | str], method: str,
              tp_degrees: Sequence[int]) -> tuple[torch.fx.GraphModule, ProxyGraph]:
    """capture -> annotate -> build the proxy graph: the one place they run in order."""
    gm = capture(model, args, kwargs, leaf_modules=leaf_modules, method=method)
    annotate(gm, args, kwargs)
    return gm, build_proxy_graph(gm, batch_size=batch, seq_len=seq, model_config=model_config,
                                 tp_degrees=tp_degrees)


def analyze(model: nn.Module, example_inputs: Sequence[Any] = (),
            example_kwargs: Mapping[str, Any] | None = None, *,
            leaf_modules: Sequence[type | str] = (), method: str = "auto",
            model_config: dict | None = None, batch_size: int | None = None,
            seq_len: int | None = None, tp_degrees: Sequence[int] = (2, 4, 8)) -> ProxyGraph:
    """capture -> annotate -> build: the proxy graph of ``model`` for the example batch.

    ``batch_size`` and ``seq_len`` default to the first two dims of the first
    tensor input (``seq_len`` 1 when it has one dim; :func:`example_sizes`).

    >>> import torch
    >>> with torch.device("meta"):
    ...     model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    >>> pg = analyze(model, (torch.empty(2, 4, device="meta"),))
    >>> pg.tracer, [b.name for b in pg.blocks], pg.batch_size
    ('fx', ['0', '1'], 2)
    """
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    batch, seq = example_sizes(args, kwargs)
    _, graph = _analyzed(model, args, kwargs, batch=batch if batch_size is None else batch_size,
                         seq=seq if seq_len is None else seq_len, model_config=model_config,
                         leaf_modules=leaf_modules, method=method, tp_degrees=tp_degrees)
    return graph


def capture_model(model: nn.Module, example_inputs: Sequence[Any] = (),
                  example_kwargs: Mapping[str, Any] | None = None, *,
                  model_config: dict | None = None, leaf_modules: Sequence[type | str] = (),
                  method: str = "auto", tp_degrees: Sequence[int] = (2, 4, 8)) -> Captured:
    """capture -> annotate -> build the proxy graph, for the example batch as given, and
    which batch field feeds each flat graph input."""
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    if args and kwargs:
        raise ConfigError("give the example batch either as example_inputs (a tuple: batches "
                          "are tuples) or as example_kwargs (a dict: batches are dicts), not both")
    if not args and not kwargs:
        raise ConfigError("auto_parallel needs an example batch: example_inputs=(...) or "
                          "example_kwargs={...}, with the model's loss or loss_fn's inputs")
    example: tuple | dict = kwargs if kwargs else args
    _, seq = example_sizes(args, kwargs)
    gm, graph = _analyzed(model, args, kwargs, batch=batch_size(example), seq=seq,
                          model_config=model_config, leaf_modules=leaf_modules, method=method,
                          tp_degrees=tp_degrees)
    markers = flat_graph_inputs(gm, tuple(_Field(i) for i in range(len(args))),
                                {k: _Field(k) for k in kwargs})
    values = flat_graph_inputs(gm, args, kwargs)
    keys = tuple(m.key if isinstance(m, _Field) else None for m in markers)
    return Captured(model, gm, graph, "dict" if kwargs else "tuple", example, keys,
                    tuple(values))


def for_micro_batch(captured: Captured, size: int) -> Captured:
    """The capture for microbatches of ``size`` samples (the example resized): a graph from
    ``torch.export`` fixes its batch size, so it is captured again; an FX graph is reused."""
    if captured.batch_size == size:
        return captured
    if size not in captured.micro:
        captured.micro[size] = _recapture(captured, size)
    return captured.micro[size]


def _recapture(captured: Captured, size: int) -> Captured:
    example = _resize(captured.example, size)
    args = example if isinstance(example, tuple) else ()
    kwargs = example if isinstance(example, dict) else {}
    gm = captured.gm
    if gm.meta.get("tripar_tracer") == "export":
        gm = capture(captured.model, args, kwargs, method="export")
    values = flat_graph_inputs(gm, args, kwargs)
    return Captured(captured.model, gm, captured.graph, captured.form, example, captured.keys,
                    tuple(values))
