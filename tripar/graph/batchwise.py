"""Which nodes run sample-wise (or token-wise): the parts of a stage sub-pipelined
tensor parallelism may run on a slice of the microbatch.

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

   A node reading no part but a join's value that has one dim of the split's size
   (the attention's output, after the whole-sequence attention) runs per part again,
   on slices of it: the parts come back after a join.

:func:`sequence_split` splits a microbatch of one sample along the sequence instead:
the same proof with the sequence dim as the one split. Attention, whose scores relate
two positions of the sequence, is then a join (it runs once, on the whole sequence:
causal or not, it is exact), and the linears, norms and MLPs around it run per part.
Two rules matter more there than along the batch:

- an output with two dims of the split's size (attention scores) is a join;
- a tensor built from a part's sizes alone (``arange(T)`` positions, a causal mask
  ``ones(T, T)``) would restart at 0 in every part: it is built whole, at the whole
  sequence's sizes, and the parts read their slice of it.

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

__all__ = ["BatchSplit", "batch_split", "microbatch_split", "sequence_split"]

aten = torch.ops.aten
_ATTENTION = {
    aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention, aten._scaled_dot_product_attention_math,
}
"""Attention kernels: batched over every dim but the last two (sequence and features)."""


class _SampleMixing(TokenMixing):
    """`TokenMixing` on the split dim: an attention kernel mixes the parts only when a
    tensor carries the split dim in one of its last two dims (sequence and features:
    always, when the sequence is split)."""

    def _check(self, func: Any, args: tuple, kwargs: dict) -> str:
        if func.overloadpacket in _ATTENTION:
            tensors = [x for x in pytree.tree_leaves((args, kwargs))
                       if isinstance(x, torch.Tensor)]
            if any(carries(x, d) for x in tensors for d in (-1, -2) if x.dim() >= 2):
                return f"{func.overloadpacket} attends across the parts"
            return ""
        return super()._check(func, args, kwargs)


@dataclass(frozen=True, slots=True)
class BatchSplit:
    """What of a graph runs per part of a microbatch split along ``along``: its
    ``size`` samples (``"batch"``), or its ``size`` tokens (``"sequence"``, a microbatch
    of one sample)."""

    size: int
    """The split dim's size: samples per microbatch, or tokens per sample."""
    inputs: dict[str, int] = field(default_factory=dict)
    """Placeholder -> the dim that carries the batch (the placeholders split into parts)."""
    parts: dict[str, int | None] = field(default_factory=dict)
    """Node run per part -> the dim of its output that carries the batch (None: a
    non-tensor value, or a tensor that cannot be concatenated back)."""
    joins: dict[str, str] = field(default_factory=dict)
    """Node that reads parts but runs whole -> why."""
    scaled: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Node whose shape argument holds the batch as a literal (``torch.export`` bakes
    sizes into views) -> (the position in its shape list, the multiple of the batch
    there): a part's copy takes that multiple of the part's size."""
    slices: dict[str, frozenset[str]] = field(default_factory=dict)
    """Node run per part -> the whole values it reads sliced to the part, along their dim
    of the batch's size (computed after a join, or built whole at the batch's size: an
    attention mask)."""
    uniform: frozenset[str] = frozenset()
    """Nodes that read parts but whose (non-tensor) value is every part's and the whole's
    (``T`` of ``B, T, C = x.size()``): computed once, from the first part."""
    why_not: str = ""
    """Why nothing is split, when nothing is."""
    along: str = "batch"
    """The dim split: ``"batch"`` or ``"sequence"``."""

    @property
    def unit(self) -> str:
        """What the split dim counts: ``"samples"`` or ``"tokens"``."""
        return "tokens" if self.along == "sequence" else "samples"

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
    if batch < 2:
        return BatchSplit(batch, why_not="a microbatch of one sample has no parts along "
                                         "the batch (sequence_split splits its tokens)")
    return _split(gm, values, batch, known, "batch")


def sequence_split(gm: torch.fx.GraphModule, values: Mapping[str, Any], *, seq_len: int,
                   known: Mapping[str, int | None] | None = None) -> BatchSplit:
    """The nodes of ``gm`` that run per part of a one-sample microbatch's ``seq_len``
    tokens (see the module docstring); ``known`` as for :func:`batch_split`."""
    if seq_len < 2:
        return BatchSplit(seq_len, along="sequence",
                          why_not="a sequence of one token has no parts")
    return _split(gm, values, seq_len, known, "sequence")


def microbatch_split(gm: torch.fx.GraphModule, values: Mapping[str, Any], *,
                     micro_batch_size: int, seq_len: int,
                     known: Mapping[str, int | None] | None = None) -> BatchSplit:
    """Along the batch, or along the sequence where the microbatch is one sample."""
    if micro_batch_size > 1:
        return batch_split(gm, values, batch=micro_batch_size, known=known)
    return sequence_split(gm, values, seq_len=seq_len, known=known)


def _split(gm: torch.fx.GraphModule, values: Mapping[str, Any], size: int,
           known: Mapping[str, int | None] | None, along: str) -> BatchSplit:
    inputs: dict[str, int] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        value = values.get(node.name)
        if not isinstance(value, torch.Tensor):
            continue
        dims = [d for d in range(value.dim()) if value.shape[d] == size]
        hint = (known or {}).get(node.name)
        if len(dims) > 1 and hint in dims:
            dims = [hint]
        if len(dims) > 1:
            return BatchSplit(size, why_not=f"input {node.name} of shape {tuple(value.shape)} "
                                            f"has several dims of the {along}'s size {size}",
                              along=along)
        if dims:
            inputs[node.name] = dims[0]
    if not inputs:
        return BatchSplit(size, why_not=f"no input carries the {along}", along=along)
    run = Probe(gm)
    probed: dict[str, Any] = {}  # per-part values at size PROBE
    parts: dict[str, int | None] = {}
    joins: dict[str, str] = {}
    joined: set[str] = set()  # whole values computed from parts: the parts slice them
    uniform: set[str] = set()
    scaled: dict[str, tuple[int, int]] = {}
    slices: dict[str, frozenset[str]] = {}
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    quiet, fake_log.disabled = fake_log.disabled, True  # a failing probe is an answer
    try:
        with run.fake_weights(), run.mode, torch.no_grad():
            for name, dim in inputs.items():
                probed[name] = _resized(run, values[name], dim)
            for node in gm.graph.nodes:
                if node.op not in ("call_function", "call_method", "call_module"):
                    continue
                reads = node.all_input_nodes
                whole = {a.name for a in reads
                         if a.name in joined and sequence_dim(values.get(a.name), size) is not None}
                if not any(a.name in probed for a in reads):
                    if any(a.name in joined for a in reads):
                        joined.add(node.name)
                        if whole:  # after a join, the parts come back where they can
                            result, why = _probe(run, node, values, probed, whole, size)
                            if not why and carries(result):
                                joined.discard(node.name)
                                slices[node.name] = frozenset(whole)
                                probed[node.name] = result
                                parts[node.name] = _carrying_dim(result)
                    continue
                if _asserts(node):  # a check of a part's metadata: per part, as it is
                    parts[node.name] = None
                    continue
                if along == "sequence" and _positional(node, probed, values):
                    joins[node.name] = (
                        "reads a join's value and a part's sizes: runs whole"
                        if any(a.name in joined for a in reads) else
                        "built from the part's sizes alone (positions, a causal mask): "
                        "built whole, the parts slice it")
                    joined.add(node.name)
                    continue
                result, why = _probe(run, node, values, probed, whole, size)
                literal = _baked_batch(node, values, probed, size) if why else None
                if literal is not None:
                    result, why = _probe(run, node, values, probed, whole, size, literal)
                if why:  # a value the graph built whole, at the split's size (a mask)
                    shared = {a.name for a in reads if a.name not in probed
                              and a.op != "get_attr"
                              and sequence_dim(values.get(a.name), size) is not None}
                    if shared - whole:
                        whole |= shared
                        result, why = _probe(run, node, values, probed, whole, size, literal)
                if not why:
                    if literal is not None:
                        scaled[node.name] = literal
                    if whole:
                        slices[node.name] = frozenset(whole)
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
    return BatchSplit(size, inputs, parts, joins, scaled, slices, frozenset(uniform),
                      along=along)


def _positional(node: torch.fx.Node, probed: Mapping[str, Any],
                values: Mapping[str, Any]) -> bool:
    """Whether ``node`` builds a tensor from a part's sizes alone: its per-part inputs
    hold no tensor (``T`` of ``x.size()``) and its recorded value is a tensor."""
    mine = [a for a in node.all_input_nodes if a.name in probed]
    return bool(mine) and isinstance(values.get(node.name), torch.Tensor) and not any(
        isinstance(x, torch.Tensor) for a in mine for x in pytree.tree_leaves(probed[a.name]))


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


_SHAPED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
           aten.expand.default}
"""Operators whose second argument is a shape list (baked by ``torch.export``)."""


def _baked_batch(node: torch.fx.Node, values: Mapping[str, Any], probed: Mapping[str, Any],
                 batch: int) -> tuple[int, int] | None:
    """Where a view's literal shape holds the batch: (position, multiple of the batch),
    the dim whose elements before it are the input's elements before its batch dim."""
    if node.target not in _SHAPED or len(node.args) < 2 or not isinstance(node.args[1], list | tuple):
        return None
    x, shape = node.args[0], list(node.args[1])
    if not isinstance(x, torch.fx.Node) or x.name not in probed or \
            not all(isinstance(n, int) for n in shape):
        return None
    part, whole = probed[x.name], values.get(x.name)
    dim = _carrying_dim(part)
    if dim is None or not isinstance(whole, torch.Tensor):
        return None
    if node.target is aten.expand.default:
        at = dim + len(shape) - whole.dim()
        return (at, shape[at] // batch) if 0 <= at < len(shape) and shape[at] == \
            whole.shape[dim] and shape[at] % batch == 0 else None
    before = 1
    for n in whole.shape[:dim]:
        before *= n
    seen = 1
    for at, n in enumerate(shape):
        if seen == before and n > 0 and n % batch == 0:
            return at, n // batch
        if n < 0:  # a -1 before it: the elements before are not known
            return None
        seen *= n
    return None


def _probe(run: Probe, node: torch.fx.Node, values: Mapping[str, Any],
           probed: Mapping[str, Any], whole: set[str], batch: int,
           literal: tuple[int, int] | None = None) -> tuple[Any, str]:
    """(the node's per-part value, "") or (None, why it must run whole). The inputs named
    in ``whole`` are sliced to the part along their dim of the batch's size; ``literal``:
    the batch baked into its shape list (``_baked_batch``) is resized too."""
    env: dict[str, Any] = {}
    for arg in node.all_input_nodes:
        if arg.name in probed:
            env[arg.name] = probed[arg.name]
            continue
        value = values.get(arg.name)
        dim = sequence_dim(value, batch) if arg.name in whole else None
        if isinstance(value, torch.Tensor) and dim is not None:
            env[arg.name] = _resized(run, value, dim)  # a whole value the parts slice
        else:
            env[arg.name] = run.fake(value)
    mixing = _SampleMixing()
    try:
        with mixing:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs),
                                                 lambda a: env[a.name])  # slices too
            if literal is not None:
                at, times = literal
                shape = list(args[1])
                shape[at] = times * PROBE
                args = (args[0], shape, *args[2:])
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
    if any(sum(1 for n in g.shape if n and n % PROBE == 0) > 1 for g, _ in tensors):
        return None, "its output relates two positions of the split dim (attention scores)"
    if tensors and not any(carries(g) for g, _ in tensors):
        return None, "its output does not carry the batch (it reduces over it)"
    if _reshapes(node) and not _batch_stays_outer(env[node.args[0].name], result,
                                                  values.get(node.args[0].name), before):
        return None, "a view moves the batch into another dim"
    return result, ""


def _asserts(node: torch.fx.Node) -> bool:
    """``torch.export``'s checks of a value's dtype and device (no output, no users)."""
    return node.op == "call_function" and not node.users and node.target in (
        aten._assert_tensor_metadata.default, aten._assert_scalar.default)


def _reshapes(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("view", "reshape") and isinstance(node.args[0], torch.fx.Node)
    return node.op == "call_function" and (node.target in _SHAPED - {aten.expand.default}
                                           or node.target is torch.reshape)


def _batch_stays_outer(part_in: Any, part_out: Any, whole_in: Any, whole_out: Any) -> bool:
    """A view keeps each sample's elements together only where as many elements come
    before the batch dim in its output as in its input (a ``-1`` may otherwise absorb
    the batch into another dim: ``(b, h, s, d) -> (b', -1, s, d)`` with b' = b)."""
    if not all(isinstance(t, torch.Tensor) for t in (part_in, part_out, whole_in, whole_out)):
        return False
    d_in, d_out = _carrying_dim(part_in), _carrying_dim(part_out)
    if d_in is None or d_out is None:
        return False

    def before(t: torch.Tensor, d: int) -> int:
        n = 1
        for size in t.shape[:d]:
            n *= size
        return n

    return before(whole_in, d_in) == before(whole_out, d_out)
