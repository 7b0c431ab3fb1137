"""Sequence parallelism (Megatron, Korthikanti et al. 2022): the token-wise parts between
tensor-parallel regions run on a sequence shard.

:func:`apply_sequence_parallel` rewrites a graph that ``tensor_parallel`` has already
rewritten, for tensor-parallel rank ``rank`` of ``t``:

- the zone: the token-wise nodes (``tripar.graph.sequence``) that read a region's exit,
  and those that read them, and so on (norms, dropouts, residual adds, biases);
- a region exit whose every reader is in the zone reduce-scatters along the sequence
  instead of all-reducing (`ReduceScatterFromTP`);
- a region entry (`CopyToTP`) of a zone value all-gathers along the sequence instead
  (`GatherToTP`, whose backward reduce-scatters the partial gradients);
- any other reader of a zone value gets it all-gathered (`GatherFromTP`: the reader
  computes the same on every rank, so backward keeps this rank's slice), and a zone
  node reading a replicated activation reads this rank's slice of it (`ScatterToTP`);
- a replicated operand a zone node broadcasts over the shard (a norm's weight, a
  row-parallel bias, a token-type embedding) gets a partial gradient on each rank (its
  shard's tokens): it is read through `CopyToTP`, whose backward sums the partial
  gradients over the group. A module called with parameters is called functionally
  (`SequenceParallelCall`, each weight through `copy_to_tp`) so that its weights keep
  their names; a parameter read inside and outside the zone gets both its (summed)
  gradients;
- a dropout in the zone draws its whole mask from the default stream (the same on every
  rank) and keeps this rank's slice (`SequenceDropout`): the mask one process draws.

The result is checked by shape propagation: every zone node has its value with the
sequence dim divided by t, every other node its value before.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from tripar.codegen.collectives import (
    CopyToTP,
    GatherFromTP,
    GatherToTP,
    ReduceFromTP,
    ReduceScatterFromTP,
    ScatterToTP,
    SequenceLinears,
    TPCollective,
    copy_to_tp,
)
from tripar.codegen.tp_rng import ForkedRNG, method_caller
from tripar.codegen.tp_verify import RewriteError, propagate
from tripar.graph.sequence import sequence_zone, token_wise_nodes

__all__ = ["SequenceDropout", "SequenceParallelCall", "apply_sequence_parallel"]


class SequenceDropout(TPCollective):
    """A dropout on a sequence shard along ``dim``: the mask is drawn for the whole
    sequence (``fn`` on ones) and this rank's slice multiplies the shard, so every rank
    draws what one process draws, and the default stream advances alike on all of them."""

    def __init__(self, group: Any, t: int, rank: int, fn: Callable[..., Any] | None = None,
                 dim: int = 1) -> None:
        super().__init__(group, t, rank)
        self.fn, self.dim = fn, dim  # a module becomes a child, a function an attribute

    def __deepcopy__(self, memo: dict) -> SequenceDropout:
        fn = copy.deepcopy(self.fn, memo) if isinstance(self.fn, nn.Module) else self.fn
        new = SequenceDropout(self.group, self.t, self.rank, fn, self.dim)
        new.train(self.training)
        return new

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        n = x.shape[self.dim]
        whole = list(x.shape)
        whole[self.dim] = n * self.t
        mask = self.fn(torch.ones(whole, dtype=x.dtype, device=x.device), *args, **kwargs)
        return x * mask.narrow(self.dim, self.rank * n, n).contiguous()

    def meta_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x.clone()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dim={self.dim}"


class SequenceShape(TPCollective):
    """A stand-in for the whole of a sequence-sharded value for readers that take only its
    metadata (``x.size()``, ``x.device``): its shape along ``dim`` times t, its dtype and
    device, one element of memory and no communication."""

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        whole = list(x.shape)
        whole[dim] *= self.t
        return x.detach().new_zeros(1).as_strided(whole, [0] * len(whole))

    def meta_forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([x] * self.t, dim)


class SequenceParallelCall(TPCollective):
    """Calls a module on a sequence shard with its parameters given as arguments (read
    from the graph, so they keep their names), each through `copy_to_tp`: the partial
    gradients of the ranks' shards are summed. ``template`` is the module without its
    weights (a meta copy, kept out of the module tree)."""

    def __init__(self, group: Any, t: int, rank: int, template: nn.Module | None = None,
                 names: Sequence[str] = ()) -> None:
        super().__init__(group, t, rank)
        object.__setattr__(self, "template", template)
        self.names = tuple(names)

    def __deepcopy__(self, memo: dict) -> SequenceParallelCall:
        new = SequenceParallelCall(self.group, self.t, self.rank, self.template, self.names)
        new.train(self.training)
        return new

    def _call(self, args: tuple, copy_fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        n = len(self.names)
        inputs, params = args[:len(args) - n], args[len(args) - n:]
        weights = {name: copy_fn(p) for name, p in zip(self.names, params)}
        self.template.train(self.training)
        return torch.func.functional_call(self.template, weights, inputs)

    def forward(self, *args: Any) -> Any:
        return self._call(args, lambda p: copy_to_tp(p, self.group))

    def meta_forward(self, *args: Any) -> Any:
        return self._call(args, lambda p: p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, module={type(self.template).__name__}"


def _weightless(module: nn.Module) -> nn.Module:
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


class _Pass:
    """The state of one rewrite."""

    def __init__(self, gm: torch.fx.GraphModule, values: Mapping[str, Any], *, t: int, rank: int,
                 group: Any, seq_len: int) -> None:
        self.gm, self.graph, self.values = gm, gm.graph, values
        self.t, self.rank, self.group, self.seq = t, rank, group, seq_len
        self.modules = dict(gm.named_modules())
        self.shared: dict[type, str] = {}

    def module_name(self, cls: type, *args: Any) -> str:
        """A new (or, without ``args``, the shared) module of ``cls`` on the group."""
        if not args and cls in self.shared:
            return self.shared[cls]
        base = {GatherToTP: "sp_gather", ReduceScatterFromTP: "sp_reduce_scatter",
                ScatterToTP: "sp_scatter", GatherFromTP: "sp_gather_out", CopyToTP: "sp_copy",
                SequenceDropout: "sp_dropout", SequenceParallelCall: "sp_call",
                SequenceLinears: "sp_linears", SequenceShape: "sp_shape"}[cls]
        name, i = base, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        self.gm.add_submodule(name, cls(self.group, self.t, self.rank, *args))
        if not args:
            self.shared[cls] = name
        return name

    def target_cls(self, node: torch.fx.Node) -> type | None:
        if node.op != "call_module":
            return None
        return type(self.modules.get(node.target))

    def param_of(self, node: torch.fx.Node) -> bool:
        if node.op != "get_attr":
            return False
        try:
            value = self.gm.get_parameter(str(node.target))
        except AttributeError:
            return False
        return value.requires_grad

    def module_params(self, node: torch.fx.Node) -> list[str]:
        mod = self.modules[node.target]
        return [name for name, _ in mod.named_parameters()]


def _skipped(gm: torch.fx.GraphModule, regions: Collection[str]) -> set[str]:
    """Nodes that never run on the shard: region nodes, collectives, random ops of the
    regions' stream, and calls of modules that hold buffers (not callable with their
    weights alone)."""
    modules = dict(gm.named_modules())
    out = set(regions)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, TPCollective | ForkedRNG) \
                    or any(True for _ in mod.buffers()):
                out.add(node.name)
    return out


def apply_sequence_parallel(
    gm: torch.fx.GraphModule, values: Mapping[str, Any], *, regions: Collection[str], t: int,
    rank: int, group: Any = None, seq_len: int, example_inputs: Sequence[Any] | None = None,
) -> tuple[torch.fx.GraphModule, dict[str, Any], list[str]]:
    """Rewrite ``gm`` (changed in place; a tensor-parallel program whose node values are
    ``values``) to run its token-wise parts on sequence shards; ``regions`` are the nodes
    of its sharded regions. Returns the graph, its new node values and the zone (the
    nodes that run on the shard). Raises RewriteError when ``seq_len`` is not divisible
    by ``t``."""
    if seq_len % t:
        raise RewriteError(f"sequence parallelism splits the sequence of {seq_len} tokens over "
                           f"t={t} ranks, which does not divide it: use a sequence length "
                           f"divisible by {t}, or sp=False")
    sp = _Pass(gm, values, t=t, rank=rank, group=group, seq_len=seq_len)
    skip = _skipped(gm, regions)
    token_wise = token_wise_nodes(gm, values, seq_len=seq_len, skip=skip)
    seeds = [n.name for n in gm.graph.nodes if sp.target_cls(n) is ReduceFromTP]
    zone_list = sequence_zone(gm, token_wise, seeds, skip)
    zone = set(zone_list)
    if not zone:
        return gm, dict(values), []
    nodes = {n.name: n for n in gm.graph.nodes}
    dims = {name: token_wise.dims.get(name) for name in zone}
    exits = [s for s in zone_list if sp.target_cls(nodes[s]) is ReduceFromTP]
    for name in exits:
        node = nodes[name]
        node.target = sp.module_name(ReduceScatterFromTP)
        node.args = (node.args[0], dims[name])
    for name in zone_list:
        node = nodes[name]
        if name in exits:
            continue
        for a in list(node.all_input_nodes):
            if a.name in zone:
                continue
            value = values.get(a.name)
            if a.op != "get_attr" and (d := token_wise.dims.get(a.name)) is not None:
                with sp.graph.inserting_before(node):
                    s = sp.graph.call_module(sp.module_name(ScatterToTP), (a, d))
                node.replace_input_with(a, s)
            elif isinstance(value, torch.Tensor) and value.is_floating_point():
                # a replicated operand broadcast over the shard (a weight, a bias): each
                # rank's gradient covers its tokens only, so the gradients are summed
                with sp.graph.inserting_before(node):
                    c = sp.graph.call_module(sp.module_name(CopyToTP), (a,))
                node.replace_input_with(a, c)
        if name in token_wise.dropout:
            _dropout(sp, node, dims[name])
        elif node.op == "call_module" and sp.module_params(node):
            _functional(sp, node)
    for name in zone_list:
        node = nodes[name]
        for user in list(node.users):
            if user.name in zone or user.graph is not sp.graph:
                continue
            if sp.target_cls(user) is CopyToTP and user.args[0] is node:
                user.target = sp.module_name(GatherToTP)
                user.args = (node, dims[name])
                _fuse_linears(sp, user)
                continue
            metadata = not isinstance(values.get(user.name), torch.Tensor) and not any(
                isinstance(v, torch.Tensor) for v in _leaves(values.get(user.name)))
            cls = SequenceShape if metadata else GatherFromTP
            with sp.graph.inserting_before(user):
                g = sp.graph.call_module(sp.module_name(cls), (node, dims[name]))
            user.replace_input_with(node, g)
    gm.graph.lint()
    gm.recompile()
    shapes = propagate(gm, example_inputs)
    _check(values, shapes, zone, dims, t)
    return gm, shapes, zone_list


def _leaves(value: Any) -> list[Any]:
    return torch.utils._pytree.tree_leaves(value)


def _linear_of(sp: _Pass, node: torch.fx.Node, x: torch.fx.Node) -> tuple[str, str | None] | None:
    """(weight, bias) attribute paths when ``node`` is a plain linear of ``x`` by parameters."""
    if node.op == "call_module" and type(sp.modules.get(node.target)) is nn.Linear:
        if node.args != (x,) or node.kwargs:
            return None
        mod = sp.modules[node.target]
        return f"{node.target}.weight", f"{node.target}.bias" if mod.bias is not None else None
    if node.op == "call_function" and node.target in (F.linear, torch.ops.aten.linear.default):
        args = list(node.args) + [node.kwargs.get("bias")] * (3 - len(node.args))
        extra = set(node.kwargs) - {"bias"}
        w, b = args[1], args[2]
        if args[0] is not x or extra or not (isinstance(w, torch.fx.Node) and sp.param_of(w)):
            return None
        if b is not None and not (isinstance(b, torch.fx.Node) and sp.param_of(b)):
            return None
        return str(w.target), str(b.target) if b is not None else None
    return None


def _fuse_linears(sp: _Pass, gather: torch.fx.Node) -> None:
    """When every reader of a region entry's gathered value is a column-parallel linear,
    one `SequenceLinears` replaces the gather: the shard, not the gathered sequence, is
    kept for the backward. The readers keep their names (as items of its result)."""
    users = [u for u in sp.graph.nodes if u in gather.users]
    found = [_linear_of(sp, u, gather) for u in users]
    if not users or any(f is None for f in found):
        return
    x, dim = gather.args
    with sp.graph.inserting_before(users[0]):
        weights = []
        for w, b in found:
            weights.append(sp.graph.get_attr(w))
            weights.append(sp.graph.get_attr(b) if b is not None else None)
        fused = sp.graph.call_module(sp.module_name(SequenceLinears), (x, dim, *weights))
    for i, u in enumerate(users):
        u.op, u.target, u.args, u.kwargs = "call_function", operator.getitem, (fused, i), {}
    sp.graph.erase_node(gather)


def _dropout(sp: _Pass, node: torch.fx.Node, dim: int) -> None:
    if node.op == "call_module":
        fn: Any = sp.modules[node.target]
    elif node.op == "call_method":
        fn = method_caller(str(node.target))
    else:
        fn = node.target
    node.op, node.target = "call_module", sp.module_name(SequenceDropout, fn, dim)


def _functional(sp: _Pass, node: torch.fx.Node) -> None:
    """Call a module with parameters as `SequenceParallelCall`, its weights read by
    ``get_attr`` nodes under their own names."""
    if node.kwargs:
        raise RewriteError(f"node {node.name}: a module called with keyword arguments cannot run "
                           "on a sequence shard")
    mod = sp.modules[node.target]
    names = sp.module_params(node)
    with sp.graph.inserting_before(node):
        weights = [sp.graph.get_attr(f"{node.target}.{name}") for name in names]
    node.args = (*node.args, *weights)
    node.target = sp.module_name(SequenceParallelCall, _weightless(mod), names)


def _check(before: Mapping[str, Any], after: Mapping[str, Any], zone: set[str],
           dims: Mapping[str, int | None], t: int) -> None:
    for name, old in before.items():
        new = after.get(name)
        if not isinstance(old, torch.Tensor) or name not in after:
            continue
        want = list(old.shape)
        if name in zone:
            want[dims[name]] //= t
        if not isinstance(new, torch.Tensor) or list(new.shape) != want:
            where = "on the sequence shard" if name in zone else "outside the sequence shard"
            raise RewriteError(f"node {name} ({where}) has shape {tuple(getattr(new, 'shape', ()))} "
                               f"after the sequence-parallel rewrite; expected {tuple(want)}")
