"""Which nodes run token-wise: the parts sequence parallelism may run on a sequence shard.

A node is *token-wise* when its sequence dimension maps through: computed on a slice of
the sequence, it gives the same slice of its output. :func:`token_wise_nodes` proves it
per node, from the fake-tensor values of :mod:`tripar.graph.values` and no table of
names:

1. *The sequence dimension maps through.* The node runs again on fake inputs whose
   sequence dimension (of every activation it reads, as :func:`sequence_dims` finds it
   from the graph's inputs; weights and buffers are left whole) has a size no other dim
   has (`PROBE`). Its output must then have that size at exactly its own sequence dim,
   and every other dim unchanged. A node with a size baked in (a ``view``
   to ``(b, s, h)``, an ``arange(s)``), two sequence dims (attention scores) or no
   activation input fails this.
2. *No operator mixes tokens.* While it runs, every ATen operator it dispatches is
   checked (:class:`TokenMixing`): pointwise and view operators pass; an operator with
   a ``dim`` (a reduction, softmax, a scan, a slice or a concatenation), a
   ``normalized_shape`` or a contraction (``mm``, ``bmm``) passes only when none of the
   dims it reduces, normalizes, indexes or contracts carries the sequence; anything
   else that reads a sequence-carrying tensor fails (attention, convolutions, sorting).

A token-wise node whose operators draw random numbers is accepted only when it is a
dropout (its mask can be drawn whole and sliced, so a sequence shard draws the slice one
process would); :func:`sequence_zone` then grows, from the exits of tensor-parallel
regions, the set of token-wise nodes the sharded plan runs on the shard.

>>> import torch
>>> from torch import nn
>>> class Block(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.norm = nn.LayerNorm(4)
...     def forward(self, x):
...         return self.norm(x + 1).softmax(dim=1).sum(-1)
>>> gm = torch.fx.symbolic_trace(Block())
>>> from tripar.graph.values import node_values
>>> values = node_values(gm, [torch.ones(2, 6, 4)])
>>> sorted(token_wise_nodes(gm, values, seq_len=6))  # the softmax over dim 1 mixes tokens
['add', 'norm', 'sum_1']
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tripar.graph.values import FakeInterpreter

__all__ = ["PROBE", "Probe", "TokenMixing", "TokenWise", "carries", "is_dropout", "sequence_dim",
           "sequence_dims", "sequence_zone", "token_wise_nodes"]

PROBE = 1_000_003
"""The sequence length a node is probed with: a prime no other dim of a model has, so
a dim carries the sequence exactly when its size is a multiple of it."""

aten = torch.ops.aten
_VIEWS = {
    aten.view, aten._unsafe_view, aten.reshape, aten.expand, aten.permute, aten.transpose,
    aten.t, aten.unsqueeze, aten.squeeze, aten.clone, aten.contiguous, aten._to_copy,
    aten.to, aten.detach, aten.alias, aten.empty_like, aten.zeros_like, aten.ones_like,
    aten.full_like, aten.lift_fresh, aten.copy_, aten.copy, aten._local_scalar_dense,
    aten.type_as, aten.view_as, aten.expand_as, aten.reshape_as, aten.flatten,
    aten.unflatten, aten.embedding, aten.native_dropout, aten.dropout, aten.bernoulli,
    aten.bernoulli_, aten.rand_like, aten.empty, aten.empty_strided, aten.fill_,
    aten.zero_, aten.scalar_tensor, aten.new_empty, aten.new_zeros, aten.new_ones,
    aten.new_full, aten.feature_dropout,
}
_CONTRACTIONS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.matmul, aten.linear,
                 aten.addmv, aten.mv}
_RANDOM = {aten.native_dropout, aten.dropout, aten.bernoulli, aten.bernoulli_,
           aten.rand_like, aten.feature_dropout, aten.rand, aten.randn, aten.randn_like,
           aten.normal, aten.normal_, aten.uniform_, aten.randint, aten.randint_like,
           aten.multinomial, aten.rrelu, aten.rrelu_with_noise, aten.alpha_dropout,
           aten.feature_alpha_dropout}
_DROPOUTS = {aten.native_dropout, aten.dropout, aten.bernoulli, aten.bernoulli_,
             aten.empty_like}


def carries(x: Any, dim: int | None = None) -> bool:
    if not isinstance(x, torch.Tensor):
        return False
    dims = range(x.dim()) if dim is None else [dim % max(x.dim(), 1)]
    return any(x.dim() and x.shape[d] and x.shape[d] % PROBE == 0 for d in dims)


class TokenMixing(TorchDispatchMode):
    """Records whether an operator mixes tokens (``mixed``) or draws random numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed = ""
        self.random: set[Any] = set()

    def _check(self, func: Any, args: tuple, kwargs: dict) -> str:
        packet = func.overloadpacket
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if not any(carries(x) for x in tensors):
            return ""
        if torch.Tag.pointwise in func.tags or packet in _VIEWS or func.namespace == "prim":
            return ""
        if packet in _CONTRACTIONS:
            a, b = ([x for x in args if isinstance(x, torch.Tensor)] + [None, None])[-2:] \
                if packet in (aten.addmm, aten.baddbmm, aten.addmv) else (args[0], args[1])
            if packet is aten.linear:
                return "" if not carries(a, -1) and not carries(b) else f"{packet} contracts"
            batch = b.dim() - 2 if isinstance(b, torch.Tensor) and b.dim() > 2 else 0
            b_dims = [d for d in range(batch, b.dim())] if isinstance(b, torch.Tensor) else []
            if carries(a, -1) or any(carries(b, d) for d in b_dims):
                return f"{packet} contracts or multiplies along the sequence"
            return ""
        names = [a.name for a in func._schema.arguments]
        given = dict(zip(names, args)) | kwargs
        first = next((x for x in tensors), None)
        if "normalized_shape" in given:
            n = len(given["normalized_shape"])
            return "" if not any(carries(first, -1 - i) for i in range(n)) else \
                f"{packet} normalizes over the sequence"
        if "dim" in given or "dims" in given:
            dims = given.get("dim", given.get("dims"))
            if dims is None:
                return f"{packet} reduces every dim"
            dims = [dims] if isinstance(dims, int) else list(dims)
            if not dims and packet not in (aten.squeeze,):
                return f"{packet} reduces every dim"
            if any(carries(first, d) for d in dims):
                return f"{packet} works along the sequence"
            return ""
        return f"{packet} is not known to be token-wise"

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket in _RANDOM:
            self.random.add(func.overloadpacket)
        if not self.mixed:
            self.mixed = self._check(func, args, kwargs)
        return func(*args, **kwargs)


class TokenWise(dict):
    """Node name -> the dim of its output that carries the sequence; ``dropout`` names
    the random ones among them (each is a dropout); ``dims`` is every node's sequence dim,
    token-wise or not (:func:`sequence_dims`: the zone's exits and the inputs it scatters
    too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dropout: set[str] = set()
        self.dims: dict[str, int | None] = {}


def sequence_dim(value: Any, seq_len: int) -> int | None:
    """The one dim of ``value`` (a tensor) of size ``seq_len``; None when it has none or
    several.

    >>> sequence_dim(torch.empty(2, 8, 16), 8), sequence_dim(torch.empty(8, 8), 8)
    (1, None)
    """
    if not isinstance(value, torch.Tensor):
        return None
    dims = [d for d in range(value.dim()) if value.shape[d] == seq_len]
    return dims[0] if len(dims) == 1 else None


def sequence_dims(gm: torch.fx.GraphModule, values: Mapping[str, Any], *,
                  seq_len: int) -> dict[str, int | None]:
    """Node name -> the dim of its value (a tensor) that carries the sequence, for the
    nodes (weights and buffers aside) whose value has a dim of size ``seq_len``; None for
    those whose dims of that size are not the sequence's, or are several.

    The sequence comes from the graph's inputs (an input's one dim of size ``seq_len``)
    and flows through the graph: a node runs on its inputs with their sequence dims
    resized to `PROBE`, and the one dim of its output of that size is the sequence's.
    Read off sizes alone (as :func:`sequence_dim` does), a sequence as long as the
    hidden size would be confused with it. A node that cannot run so keeps the sequence
    where it was in memory when it reshapes its one input that carries it (to sizes baked
    in); one that reads no input carrying the sequence (``arange(s)``) carries it at its
    one dim of size ``seq_len``, unless a reader can only run with that dim whole (it is
    the hidden size, say, of a row of a weight).

    >>> class Square(torch.nn.Module):   # tokens (2, 8) -> features of 8: (2, 8, 8)
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.wte, self.norm = torch.nn.Embedding(16, 8), torch.nn.LayerNorm(8)
    ...     def forward(self, ids):
    ...         return self.norm(self.wte(ids)).view(2, 8, 8).mean(1)
    >>> gm = torch.fx.symbolic_trace(Square())
    >>> from tripar.graph.values import node_values
    >>> values = node_values(gm, [torch.zeros(2, 8, dtype=torch.long)])
    >>> sequence_dim(values["norm"], 8), sequence_dims(gm, values, seq_len=8)
    (None, {'ids': 1, 'wte': 1, 'norm': 1, 'view': 1, 'mean': None})
    """
    run = Probe(gm)
    with run.fake_weights(), run.mode, torch.no_grad():
        return _Dims(run, values, seq_len).of_every_node()


class _Dims:
    """:func:`sequence_dims`, inside a probe's fake weights and mode."""

    def __init__(self, run: Probe, values: Mapping[str, Any], seq_len: int) -> None:
        self.run, self.values, self.seq_len = run, values, seq_len
        self.dims: dict[str, int | None] = {}
        self.guessed: set[str] = set()  # read off the size: no input brought the sequence
        self.cache: dict[Any, int | None] = {}
        self.modules = dict(run.module.named_modules())

    def of_every_node(self) -> dict[str, int | None]:
        for node in self.run.module.graph.nodes:
            value = self.values.get(node.name)
            if node.op in ("get_attr", "output") or not isinstance(value, torch.Tensor):
                continue
            sizes = [d for d in range(value.dim()) if value.shape[d] == self.seq_len]
            if not sizes:
                continue
            carrying = [a for a in node.all_input_nodes if self.dims.get(a.name) is not None]
            if node.op == "placeholder" or not carrying:
                self.dims[node.name] = sizes[0] if len(sizes) == 1 else None
                if len(sizes) == 1 and node.op != "placeholder":
                    self.guessed.add(node.name)
                continue
            self.dims[node.name] = self._carried(node, sizes, carrying)
        return self.dims

    def _carried(self, node: torch.fx.Node, sizes: list[int],
                 carrying: list[torch.fx.Node]) -> int | None:
        """The one of ``sizes`` that the inputs' sequence dims reach (cached by operator,
        shapes and dims, as the probes of a model's repeated layers are)."""
        try:
            key = _probe_key(node, self.values, self.modules, self.dims)
            hash(key)
        except Exception:  # noqa: BLE001 - unhashable arguments: probe it alone
            key = None
        if key is not None and key in self.cache:
            return self.cache[key]
        dim = self._run(node, sizes, ())
        if dim is _FAILED:
            dim = self._reshaped(node, sizes, carrying)
        if dim is _FAILED and (whole := [a.name for a in carrying if a.name in self.guessed]):
            dim = self._run(node, sizes, whole)  # a guess made it fail: it is no sequence
            if dim is not _FAILED:
                self.dims.update(dict.fromkeys(whole))
                key = None
        if dim is _FAILED:  # cannot tell: its one dim of the sequence's size, if one
            dim = sizes[0] if len(sizes) == 1 else None
        if key is not None:
            self.cache[key] = dim
        return dim

    def _run(self, node: torch.fx.Node, sizes: list[int], whole: Collection[str]) -> Any:
        env = _probe_inputs(self.run, node, self.values, self.dims, self.seq_len, whole)
        if env is None:
            return _FAILED
        try:
            result = _quietly(self.run, node, env)
        except Exception:  # noqa: BLE001 - it cannot run resized
            return _FAILED
        if not isinstance(result, torch.Tensor):
            return _FAILED
        found = [d for d in range(result.dim()) if carries(result, d)]
        return found[0] if len(found) == 1 and found[0] in sizes else None

    def _reshaped(self, node: torch.fx.Node, sizes: list[int],
                  carrying: list[torch.fx.Node]) -> Any:
        """The dim of ``node``'s value, a reshape of its one input that carries the
        sequence, preceded by as many elements as preceded the sequence there."""
        value = self.values[node.name]
        if len(carrying) != 1 or self.values[carrying[0].name].numel() != value.numel():
            return _FAILED
        source, dim = self.values[carrying[0].name], self.dims[carrying[0].name]
        before = math.prod(source.shape[:dim])
        found = [d for d in sizes if math.prod(value.shape[:d]) == before]
        return found[0] if len(found) == 1 else _FAILED


_FAILED = object()
"""A probe's answer when the node cannot run on its resized inputs."""


class Probe(FakeInterpreter):
    """Runs single nodes of ``gm`` on resized fake inputs (weights faked once)."""

    def node_output(self, node: torch.fx.Node, env: Mapping[str, Any]) -> Any:
        args, kwargs = pytree.tree_map_only(torch.fx.Node, lambda n: env[n.name],
                                            (node.args, node.kwargs))
        return getattr(self, node.op)(node.target, args, kwargs)


def _probe_key(node: torch.fx.Node, values: Mapping[str, Any], modules: Mapping[str, Any],
               dims: Mapping[str, int | None]) -> Any:
    def leaf(v: Any) -> Any:
        if isinstance(v, torch.fx.Node):
            val = values.get(v.name)
            if isinstance(val, torch.Tensor):
                return ("t", tuple(val.shape), val.dtype, v.op == "get_attr", dims.get(v.name))
            return ("v", repr(val))
        return ("c", repr(v))

    target = node.target
    if node.op == "call_module":
        mod = modules[node.target]
        target = (type(mod), repr(mod), tuple((k, tuple(p.shape)) for k, p in mod.named_parameters()))
    return (node.op, repr(target) if node.op == "call_module" else target,
            tuple(pytree.tree_map(leaf, (node.args, node.kwargs))[0]),
            repr(pytree.tree_map(leaf, (node.args, node.kwargs))[1]))


def token_wise_nodes(gm: torch.fx.GraphModule, values: Mapping[str, Any], *, seq_len: int,
                     skip: Collection[str] = ()) -> TokenWise:
    """The token-wise nodes of ``gm`` (see the module docstring) and the dim of each one's
    output that carries the sequence. ``values`` are the nodes' values (fake or meta
    tensors) for inputs of ``seq_len`` tokens; nodes in ``skip`` are not probed. Nodes of
    the same operator on the same shapes are probed once (a model's repeated layers)."""
    out = TokenWise()
    if seq_len < 2:
        return out
    run = Probe(gm)
    modules = dict(gm.named_modules())
    cache: dict[Any, tuple[bool, bool]] = {}
    with run.fake_weights(), run.mode, torch.no_grad():
        dims = out.dims = _Dims(run, values, seq_len).of_every_node()
        for node in gm.graph.nodes:
            if node.op not in ("call_function", "call_method", "call_module") or node.name in skip:
                continue
            dim = dims.get(node.name)
            if dim is None:
                continue
            try:
                key = _probe_key(node, values, modules, dims)
                hash(key)
            except Exception:  # noqa: BLE001 - unhashable arguments: probe it alone
                key = None
            if key is not None and key in cache:
                ok, random = cache[key]
            else:
                ok, random = _probe(run, node, values, dims, seq_len, dim)
                if key is not None:
                    cache[key] = (ok, random)
            if ok:
                out[node.name] = dim
                if random:
                    out.dropout.add(node.name)
    return out


def _probe_inputs(run: Probe, node: torch.fx.Node, values: Mapping[str, Any],
                  dims: Mapping[str, int | None], seq_len: int,
                  whole: Collection[str] = ()) -> dict[str, Any] | None:
    """``node``'s inputs with their sequence dims resized to PROBE (weights, buffers and
    the inputs in ``whole`` whole); None when none carries the sequence, or one has
    several dims of size ``seq_len`` and none known to carry it (the sequence cannot be
    told from the others)."""
    env: dict[str, Any] = {}
    resized = False
    for arg in node.all_input_nodes:
        value = values.get(arg.name)
        if isinstance(value, torch.Tensor) and arg.op != "get_attr":
            dim = None if arg.name in whole else dims.get(arg.name)
            if dim is None and arg.name not in whole and list(value.shape).count(seq_len) > 1:
                return None
            shape = [PROBE if d == dim else n for d, n in enumerate(value.shape)]
            resized |= dim is not None
            env[arg.name] = torch.empty(shape, dtype=value.dtype, device=run.device)
        elif isinstance(value, torch.Tensor):
            env[arg.name] = run.fake(value)
        else:
            env[arg.name] = value
    return env if resized else None


def _quietly(run: Probe, node: torch.fx.Node, env: dict[str, Any]) -> Any:
    """``node`` run on ``env``; an exception is the answer (fake tensors do not log it)."""
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level, fake_log.disabled = fake_log.disabled, True
    try:
        return run.node_output(node, env)
    finally:
        fake_log.disabled = level


def _probe(run: Probe, node: torch.fx.Node, values: Mapping[str, Any],
           dims: Mapping[str, int | None], seq_len: int, dim: int) -> tuple[bool, bool]:
    """(token-wise, draws random numbers) for one node."""
    before = values[node.name]
    env = _probe_inputs(run, node, values, dims, seq_len)
    if env is None:
        return False, False
    mixing = TokenMixing()
    try:
        with mixing:
            result = _quietly(run, node, env)
    except Exception:  # noqa: BLE001 - a node that cannot run resized is not token-wise
        return False, False
    if mixing.mixed or not isinstance(result, torch.Tensor) or result.dim() != before.dim():
        return False, False
    want = [PROBE if d == dim else n for d, n in enumerate(before.shape)]
    if list(result.shape) != want:
        return False, False
    random = bool(mixing.random)
    if random and not (mixing.random <= _DROPOUTS and is_dropout(node, run)):
        return False, False
    return True, random


def is_dropout(node: torch.fx.Node, run: Probe) -> bool:
    if node.op == "call_module":
        return type(run.fetch_attr(node.target)) is torch.nn.Dropout
    target = node.target
    return target in (torch.nn.functional.dropout, aten.dropout.default, torch.dropout)


def sequence_zone(gm: torch.fx.GraphModule, token_wise: Collection[str],
                  seeds: Collection[str], regions: Collection[str] = ()) -> list[str]:
    """The nodes that run on the sequence shard, in graph order: every token-wise node
    (outside the sharded ``regions``) that reads a ``seeds`` node (the region exits whose
    every reader is token-wise: their all-reduce becomes a reduce-scatter) or another
    node of the zone."""
    nodes = {n.name: n for n in gm.graph.nodes}
    exits = {s for s in seeds if s in nodes and nodes[s].users
             and all(u.name in token_wise and u.name not in regions for u in nodes[s].users)}
    zone: list[str] = []
    inside = set(exits)
    for node in gm.graph.nodes:
        if node.name in token_wise and node.name not in regions and node.name not in inside \
                and any(a.name in inside for a in node.all_input_nodes):
            inside.add(node.name)
            zone.append(node.name)
    return [s for s in nodes if s in exits] + zone
