"""Which nodes run sample-wise: the parts of a stage sub-pipelined tensor parallelism
may run on a slice of the microbatch.

A node is *sample-wise* when the batch dimension maps through: run on a slice of the
microbatch, it gives the same slice of its output. :func:`batch_split` finds, from the
fake-tensor values of a graph at microbatch size ``batch`` and no table of names:

1. *The inputs that carry the batch*: tensor placeholders with exactly one dim of size
   ``batch``. A placeholder with two such dims is ambiguous, and the graph is not split.
2. *The nodes that run per part.* The graph runs again, node by node, on fake values
   whose batch dim has the size `PROBE` (a node's ``size()`` calls see it too, so a
   ``view(B, T, ...)`` follows). A node reading a per-part value runs per part when it
   runs at all, no operator it dispatches mixes samples (the sequence probe's
   `TokenMixing`, on the batch dim, plus attention kernels, which work per sample and
   per head), and its output has `PROBE` where its recorded value had the batch (a
   tensor output must carry the batch somewhere; a non-tensor one, ``x.size(0)``, is
   per part as it is).
3. *Joins.* Every other node reading a per-part value concatenates the parts and runs
   once, on the whole microbatch: a loss's mean over the batch, a batch norm. What
   follows a join runs whole until another input brings parts back.

Random operators are accepted per part: each part draws its own mask, a valid draw
though not the one the whole microbatch would draw.

>>> import torch
>>> from torch import nn
>>> class Head(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.proj = nn.Linear(4, 3)
...     def forward(self, x, y):
...         return nn.functional.cross_entropy(self.proj(x).view(-1, 3), y.view(-1))
>>> gm = torch.fx.symbolic_trace(Head())
>>> from tripar.graph.values import node_values
>>> split = batch_split(gm, node_values(gm, [torch.ones(2, 5, 4), torch.zeros(2, 5).long()]),
...                     batch=2)
>>> split.inputs, sorted(split.parts), sorted(split.joins)
({'x': 0, 'y': 0}, ['proj', 'view', 'view_1'], ['cross_entropy'])
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from tripar.graph.sequence import PROBE, Probe, TokenMixing, carries, sequence_dim

__all__ = ["BatchSplit", "batch_split"]

aten = torch.ops.aten
_ATTENTION = {
    aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention, aten._scaled_dot_product_attention_math,
}
"""Attention kernels: batched over every dim but the last two (sequence and features)."""


class _SampleMixing(TokenMixing):
    """`TokenMixing` on the batch dim: an attention kernel mixes samples only when a
    tensor carries the batch in one of its last two dims."""

    def _check(self, func: Any, args: tuple, kwargs: dict) -> str:
        if func.overloadpacket in _ATTENTION:
            tensors = [x for x in pytree.tree_leaves((args, kwargs))
                       if isinstance(x, torch.Tensor)]
            if any(carries(x, d) for x in tensors for d in (-1, -2) if x.dim() >= 2):
                return f"{func.overloadpacket} attends across the batch"
            return ""
        return super()._check(func, args, kwargs)


@dataclass(frozen=True, slots=True)
class BatchSplit:
    """What of a graph runs per part of a microbatch of ``batch`` samples."""

    batch: int
    inputs: dict[str, int] = field(default_factory=dict)
    """Placeholder -> the dim that carries the batch (the placeholders split into parts)."""
    parts: dict[str, int | None] = field(default_factory=dict)
    """Node run per part -> the dim of its output that carries the batch (None: a
    non-tensor value, or a tensor that cannot be concatenated back)."""
    joins: dict[str, str] = field(default_factory=dict)
    """Node that reads parts but runs whole -> why."""
    uniform: frozenset[str] = frozenset()
    """Nodes that read parts but whose (non-tensor) value is every part's and the whole's
    (``T`` of ``B, T, C = x.size()``): computed once, from the first part."""
    why_not: str = ""
    """Why nothing is split, when nothing is."""

    @property
    def dims(self) -> dict[str, int | None]:
        """Every per-part value's batch dim: the inputs' and the nodes'."""
        return {**self.inputs, **self.parts}


def batch_split(gm: torch.fx.GraphModule, values: Mapping[str, Any], *, batch: int,
                known: Mapping[str, int | None] | None = None) -> BatchSplit:
    """The per-part nodes of ``gm`` (see the module docstring); ``values`` are its nodes'
    values (fake or meta tensors) on a microbatch of ``batch`` samples. ``known`` gives
    the batch dim of placeholders whose shape has several dims of that size (a stage's
    input, from the whole graph's split: ``BatchSplit.dims``)."""
    inputs: dict[str, int] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        value = values.get(node.name)
        if not isinstance(value, torch.Tensor):
            continue
        dims = [d for d in range(value.dim()) if value.shape[d] == batch]
        hint = (known or {}).get(node.name)
        if len(dims) > 1 and hint in dims:
            dims = [hint]
        if len(dims) > 1:
            return BatchSplit(batch, why_not=f"input {node.name} of shape {tuple(value.shape)} "
                                             f"has several dims of the batch's size {batch}")
        if dims:
            inputs[node.name] = dims[0]
    if batch < 2 or not inputs:
        return BatchSplit(batch, why_not="no input carries the batch" if batch >= 2
                          else "a microbatch of one sample has no parts")
    run = Probe(gm)
    probed: dict[str, Any] = {}  # per-part values at batch PROBE
    parts: dict[str, int | None] = {}
    joins: dict[str, str] = {}
    joined: set[str] = set()  # whole values computed from parts: the parts slice them
    uniform: set[str] = set()
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    quiet, fake_log.disabled = fake_log.disabled, True  # a failing probe is an answer
    try:
        with run.fake_weights(), run.mode, torch.no_grad():
            for name, dim in inputs.items():
                probed[name] = _resized(run, values[name], dim)
            for node in gm.graph.nodes:
                if node.op not in ("call_function", "call_method", "call_module"):
                    continue
                if not any(a.name in probed for a in node.all_input_nodes):
                    if any(a.name in joined for a in node.all_input_nodes):
                        joined.add(node.name)
                    continue
                result, why = _probe(run, node, values, probed, joined, batch)
                if why:
                    joins[node.name] = why
                    joined.add(node.name)
                    continue
                if not isinstance(result, torch.Tensor) and _same(result, values.get(node.name)):
                    uniform.add(node.name)  # T of x.size(): every part's and the whole's
                    continue
                probed[node.name] = result
                parts[node.name] = _carrying_dim(result)
    finally:
        fake_log.disabled = quiet
    return BatchSplit(batch, inputs, parts, joins, frozenset(uniform))


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - values that do not compare are not the same
        return False


def _resized(run: Probe, value: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [PROBE if d == dim else n for d, n in enumerate(value.shape)]
    return torch.empty(shape, dtype=value.dtype, device=run.device)


def _carrying_dim(value: Any) -> int | None:
    if not isinstance(value, torch.Tensor):
        return None
    dims = [d for d in range(value.dim()) if value.shape[d] % PROBE == 0 and value.shape[d]]
    return dims[0] if len(dims) == 1 else None


def _probe(run: Probe, node: torch.fx.Node, values: Mapping[str, Any],
           probed: Mapping[str, Any], joined: set[str], batch: int) -> tuple[Any, str]:
    """(the node's per-part value, "") or (None, why it must run whole)."""
    env: dict[str, Any] = {}
    for arg in node.all_input_nodes:
        if arg.name in probed:
            env[arg.name] = probed[arg.name]
            continue
        value = values.get(arg.name)
        dim = sequence_dim(value, batch) if arg.name in joined else None
        if isinstance(value, torch.Tensor) and dim is not None:
            env[arg.name] = _resized(run, value, dim)  # a whole value the parts slice
        else:
            env[arg.name] = run.fake(value)
    mixing = _SampleMixing()
    try:
        with mixing:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs),
                                                 lambda a: env[a.name])  # slices too
            result = getattr(run, node.op)(node.target, args, kwargs)
    except Exception as error:  # noqa: BLE001 - a node that cannot run on a part runs whole
        return None, f"does not run on a part ({type(error).__name__})"
    if mixing.mixed:
        return None, mixing.mixed
    before = values.get(node.name)
    got, want = pytree.tree_leaves(result), pytree.tree_leaves(before)
    if len(got) != len(want):
        return None, "its output changes form on a part"
    tensors = [(g, w) for g, w in zip(got, want) if isinstance(g, torch.Tensor)]
    for g, w in tensors:
        if not isinstance(w, torch.Tensor) or g.dim() != w.dim():
            return None, "its output changes form on a part"
        for d in range(g.dim()):
            if g.shape[d] % PROBE == 0 and g.shape[d]:
                if g.shape[d] // PROBE * batch != w.shape[d]:
                    return None, f"dim {d} of its output does not follow the batch"
            elif g.shape[d] != w.shape[d]:
                return None, f"dim {d} of its output changes with the batch"
    if tensors and not any(carries(g) for g, _ in tensors):
        return None, "its output does not carry the batch (it reduces over it)"
    return result, ""
