"""Merak's sub-pipelined tensor parallelism: a stage runs each microbatch as ``k`` parts
whose collectives overlap the other parts' compute.

:func:`sub_pipeline` rewrites a stage's graph into one that runs ``k`` copies of it on
slices of the microbatch (``tripar.graph.batchwise`` proves which nodes may run on a
slice), interleaved by *levels*: a level ends at each tensor-parallel collective, so in
the forward

    level 0 of part 0, start g of part 0, level 0 of part 1, start g of part 1,
    wait g of part 0, level 1 of part 0, start g of part 0, wait g of part 1, ...

Megatron's *g* (`ReduceFromTP`, the all-reduce after a row-parallel layer) becomes an
asynchronous all-reduce (`ReduceStarted`) and a wait (`finish`) placed just before the
first reader of its result. Megatron's *f* (`CopyToTP`: identity forward, all-reduce of
the gradient backward) becomes `GradReduceStarted`, whose backward starts the all-reduce
and returns at once, behind one `joint_wait` for the parts of that *f*.

The backward's order follows from the forward's: PyTorch's autograd engine runs, of the
nodes ready, the one made last in the forward. Each part's *f* is made just before that
part's first reader, so the backward runs part 1's share of a level, part 1's *f*
(starting its all-reduce), part 0's share of the level while it runs, part 0's *f*, and
waits at the `joint_wait` before the gradients reach the level below: one part's
collectives stay exposed per level, forward and backward, as the cost model's
``c + x + (k - 1) max(c, x)`` says (`tripar.partitioner.cost.overlap`).

Under sequence parallelism a region's entry all-gather (`GatherStarted`) is started for
each part behind a `joint_wait` on the parts' inputs, and finished where the part first
reads it (`SequenceLinearsFinished`, `GatherToFinished`), whose backward starts the
reduce-scatter of the gradient for that wait; the exit's reduce-scatter is started too
(`ReduceScatterStarted`). The exit's backward all-gather stays synchronous: the linear
before it reads the gradient at once (it was made just before the exit), and a forward
order that let the engine run other work first would give up the forward's overlap. A
vocabulary-parallel loss runs per part as it is, and a recomputed segment runs per part
(its own collectives inside it stay synchronous).

The parts are concatenated back where a node mixes samples (a *join*: the loss over the
microbatch runs on the whole) and at the stage's outputs, so a stage still receives and
sends whole microbatches and one process's loss is unchanged; a node after a join that
runs per part reads its slice of the join's value. Each part draws its own dropout masks.

A microbatch of one sample is split along its sequence (``BatchSplit.along``): the same
rewrite, with attention a join (it runs once on the whole sequence, so causal attention
is exact) and the projections, norms and MLPs around it in parts.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from tripar.codegen.collectives import (
    ALONG,
    CopyToTP,
    GatherFromTP,
    GatherToTP,
    ReduceFromTP,
    ReduceScatterFromTP,
    SequenceLinears,
    TPCollective,
    all_gather_along,
    reduce_scatter_along,
    sequence_linears,
)
from tripar.codegen.recompute import Recomputed, regraphed
from tripar.errors import PlanError
from tripar.graph.batchwise import BatchSplit
from tripar.graph.sequence import sequence_dim

__all__ = ["GradReduceStarted", "ReduceScatterStarted", "ReduceStarted", "finish",
           "joint_wait", "pending", "stage_inputs", "sub_pipeline"]


def _dist() -> Any:
    import torch.distributed as dist

    return dist


# ---- the collectives, started and finished ---------------------------------------------


def pending() -> list:
    """The handles of collectives started and not yet waited for (one list per use)."""
    return []


class _ReduceStarted(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, handles: list) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        handles.append(_dist().all_reduce(out, group=group, async_op=True))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None, None


class _ReduceScatterStarted(torch.autograd.Function):
    """Sequence parallelism's exit, started: this rank's 1/t along dim 0 of the sum (the
    caller moves the sequence dim first); backward all-gathers the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, handles: list) -> torch.Tensor:
        dist = _dist()
        ctx.group = group
        pieces = [p.contiguous() for p in x.chunk(dist.get_world_size(group), 0)]
        out = torch.empty_like(pieces[0])
        handles.append(dist.reduce_scatter(out, pieces, group=group, async_op=True))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return all_gather_along(grad, 0, ctx.group), None, None


class _GradReduceStarted(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, handles: list) -> torch.Tensor:
        ctx.group, ctx.handles, ctx.dtype = group, handles, x.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        # in x's dtype: autograd would copy a result still arriving to it
        out = grad.to(ctx.dtype, memory_format=torch.contiguous_format, copy=True)
        ctx.handles.append(_dist().all_reduce(out, group=ctx.group, async_op=True))
        return out, None, None


class _JointWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, handles: list, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.handles = handles
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        _wait_all(ctx.handles)
        return (None, *grads)


def _wait_all(handles: list) -> None:
    while handles:
        handles.pop(0).wait()


def finish(x: torch.Tensor, handles: list) -> torch.Tensor:
    """``x`` once the collectives in ``handles`` (started on it) are done."""
    _wait_all(handles)
    return x


def joint_wait(handles: list, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``xs`` unchanged; in the backward, their gradients wait for ``handles`` (the
    all-reduces the parts' `GradReduceStarted` started)."""
    return _JointWait.apply(handles, *xs)


class ReduceStarted(TPCollective):
    """Megatron's g, started: the all-reduce runs while the graph goes on; `finish` waits
    (identity backward)."""

    def forward(self, x: torch.Tensor, handles: list) -> torch.Tensor:
        return _ReduceStarted.apply(x, self.group, handles)

    def meta_forward(self, x: torch.Tensor, handles: list) -> torch.Tensor:
        return x.clone()


class ReduceScatterStarted(TPCollective):
    """Sequence parallelism's exit (`ReduceScatterFromTP`) along ``dim``, started;
    `finish` waits."""

    def forward(self, x: torch.Tensor, dim: int, handles: list) -> torch.Tensor:
        out = _ReduceScatterStarted.apply(x.movedim(dim, 0), self.group, handles)
        return out.movedim(0, dim)

    def meta_forward(self, x: torch.Tensor, dim: int, handles: list) -> torch.Tensor:
        n = x.shape[dim] // self.t
        return x.narrow(dim, self.rank * n, n).clone()


class GatherStarted(TPCollective):
    """A region entry's all-gather along ``dim`` (sequence parallelism), started: returns
    the list the ranks' shards arrive in; the entry's finishing module waits."""

    def forward(self, x: torch.Tensor, dim: int, handles: list) -> list[torch.Tensor]:
        dist = _dist()
        x = x.detach().contiguous()
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(self.group))]
        handles.append(dist.all_gather(pieces, x, group=self.group, async_op=True))
        return pieces

    def meta_forward(self, x: torch.Tensor, dim: int, handles: list) -> list[torch.Tensor]:
        return [x.clone() for _ in range(self.t)]


class _Gathered(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pieces: list, dim: int, group: Any, bwd: str,
                grad_handles: list) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.bwd, ctx.grad_handles = dim, group, bwd, grad_handles
        ctx.dtype = x.dtype
        return torch.cat(pieces, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if ctx.bwd == "reduce_scatter":  # started; the entry's joint_wait waits
            # in x's dtype: autograd would copy a result still arriving to it
            out = reduce_scatter_along(grad.to(ctx.dtype), ctx.dim, ctx.group,
                                       ctx.grad_handles)
            return out, None, None, None, None, None
        return ALONG[ctx.bwd](grad, ctx.dim, ctx.group), None, None, None, None, None


class GatherToFinished(TPCollective):
    """Sequence parallelism's region entry (`GatherToTP`) once its started all-gather is
    done: the whole sequence; backward starts the reduce-scatter of the gradient into
    ``grad_handles`` (the entry's `joint_wait` waits)."""

    backward_kind = "reduce_scatter"

    def forward(self, x: torch.Tensor, dim: int, pieces: list, handles: list,
                grad_handles: list) -> torch.Tensor:
        _wait_all(handles)
        return _Gathered.apply(x, pieces, dim, self.group, self.backward_kind, grad_handles)

    def meta_forward(self, x: torch.Tensor, dim: int, pieces: list, handles: list,
                     grad_handles: list) -> torch.Tensor:
        return torch.cat([x] * self.t, dim)


class GatherFromFinished(GatherToFinished):
    """`GatherFromTP` once its started all-gather is done; backward keeps this rank's
    slice of the gradient."""

    backward_kind = "slice"


class SequenceLinearsFinished(TPCollective):
    """`SequenceLinears` once its started all-gather is done: the column-parallel linears
    of the whole sequence, keeping only the shard for the backward, which starts the
    reduce-scatter of the input's gradient into ``grad_handles``."""

    def forward(self, x: torch.Tensor, dim: int, pieces: list, handles: list,
                grad_handles: list, *weights: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:
        _wait_all(handles)
        return sequence_linears(x, dim, self.group, *weights, gathered=pieces,
                                grad_handles=grad_handles)

    def meta_forward(self, x: torch.Tensor, dim: int, pieces: list, handles: list,
                     grad_handles: list, *weights: torch.Tensor | None
                     ) -> tuple[torch.Tensor, ...]:
        return SequenceLinears.meta_forward(self, x, dim, *weights)


class GradReduceStarted(TPCollective):
    """Megatron's f, started: identity forward; the backward starts the all-reduce of the
    gradient into ``handles`` and returns (a `joint_wait` waits)."""

    def forward(self, x: torch.Tensor, handles: list) -> torch.Tensor:
        return _GradReduceStarted.apply(x, self.group, handles)

    def meta_forward(self, x: torch.Tensor, handles: list) -> torch.Tensor:
        return x.clone()


# ---- the rewrite ------------------------------------------------------------------------

_STARTED: dict[type, type[TPCollective]] = {ReduceFromTP: ReduceStarted,
                                            ReduceScatterFromTP: ReduceScatterStarted}
"""The forward collectives started asynchronously, and what they become."""
_ENTRIES: dict[type, type[TPCollective]] = {SequenceLinears: SequenceLinearsFinished,
                                            GatherToTP: GatherToFinished,
                                            GatherFromTP: GatherFromFinished}
"""Region entries whose all-gather is started (`GatherStarted`), and what finishes them."""


class _Unsplit(Exception):
    """The stage cannot run in parts; the message says why."""


def sub_pipeline(gm: torch.fx.GraphModule, k: int, split: BatchSplit,
                 values: Mapping[str, Any], *, where: str = "the stage"
                 ) -> tuple[torch.fx.GraphModule, str]:
    """``gm`` rewritten to run each microbatch as ``k`` parts (see the module docstring),
    and ``""``; or ``gm`` unchanged and why it runs whole. ``split`` and ``values`` are
    :func:`~tripar.graph.batchwise.batch_split` and the node values of ``gm`` before
    recomputation wrapped its segments (the names are the same)."""
    if k < 2:
        return gm, ""
    if not split.inputs:
        return gm, split.why_not or "no input carries the batch"
    if split.size % k:
        raise PlanError(f"{where}: tp_overlap={k} does not divide the microbatch's "
                        f"{split.size} {split.unit}; pick a tp_overlap that divides it")
    try:
        graph, added = _Rewrite(gm, k, split, values).graph()
    except _Unsplit as why:
        return gm, str(why)
    if not added:
        return gm, "no tensor-parallel collective runs on the parts"
    out = regraphed(gm, graph, added)
    out.meta["tp_overlap"] = k
    return out, ""


class _Rewrite:
    def __init__(self, gm: torch.fx.GraphModule, k: int, split: BatchSplit,
                 values: Mapping[str, Any]) -> None:
        self.gm, self.k, self.split, self.values = gm, k, split, values
        self.nodes = list(gm.graph.nodes)
        self.part: dict[str, bool] = {}
        self.uniform: set[str] = set()
        self.joined: set[str] = set()
        self.late: set[str] = set()  # whole, from uniform values: computed when first read
        self.kind: dict[str, str] = {}
        self.level: dict[str, int] = {}
        self._classify()

    # -- which nodes run per part --------------------------------------------------------
    def _members(self, node: torch.fx.Node) -> list[str]:
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            if isinstance(module, Recomputed):
                return [n.name for n in module.body.graph.nodes
                        if n.op in ("call_function", "call_method", "call_module")]
        return [node.name]

    def _classify(self) -> None:
        split = self.split
        for node in self.nodes:
            name = node.name
            if node.op == "placeholder":
                self.part[name] = name in split.inputs
                continue
            if node.op in ("get_attr", "output"):
                self.part[name] = False
                continue
            reads = [a for a in node.all_input_nodes]
            members = self._members(node)
            split_again = any(a.name in self.joined for a in reads) and all(
                m in split.parts for m in members)  # the parts come back after a join
            if not any(self.part[a.name] for a in reads) and not split_again:
                self.part[name] = False
                if any(a.name in self.joined for a in reads):
                    self.joined.add(name)
                elif any(a.name in self.uniform or a.name in self.late for a in reads):
                    self.late.add(name)
                continue
            if all(m in split.parts for m in members):
                self.part[name] = True
                module = (self.gm.get_submodule(str(node.target))
                          if node.op == "call_module" else None)
                if type(module) in _STARTED:
                    self.kind[name] = "g"
                elif type(module) in _ENTRIES:
                    self.kind[name] = "e"
                elif type(module) is CopyToTP:
                    self.kind[name] = "f"
            elif members == [name] and name in split.uniform:
                self.part[name] = False
                self.uniform.add(name)
            else:
                self.part[name] = False
                self.joined.add(name)
        for node in self.nodes:
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            level = 0
            for a in node.all_input_nodes:
                bump = a.name in self.kind or (a.name in self.joined and self.part[node.name])
                level = max(level, self.level.get(a.name, 0) + int(bump))
            self.level[node.name] = level

    # -- emission -------------------------------------------------------------------------
    def graph(self) -> tuple[torch.fx.Graph, dict[str, nn.Module]]:
        g = torch.fx.Graph()
        g._codegen = copy.deepcopy(self.gm.graph._codegen)
        self.g = g
        self.whole: dict[str, torch.fx.Node] = {}
        self.parts: dict[tuple[str, int], torch.fx.Node] = {}
        self.started: dict[tuple[str, int], tuple[torch.fx.Node, torch.fx.Node]] = {}
        self.entered: dict[tuple[str, int], tuple[torch.fx.Node, ...]] = {}
        self.cats: dict[str, torch.fx.Node] = {}
        self.deferred: dict[tuple[str, int], tuple[str, torch.fx.Node, torch.fx.Node]] = {}
        self.slices: dict[tuple[str, int], torch.fx.Node] = {}
        added: dict[str, nn.Module] = {}
        self.added = added

        for node in self.nodes:  # inputs, weights, and what reads no part
            if node.op == "placeholder" or node.op == "get_attr":
                self.whole[node.name] = g.node_copy(node)
        for name, dim in self.split.inputs.items():
            chunks = g.call_function(torch.chunk, (self.whole[name], self.k, dim))
            for p in range(self.k):
                self.parts[(name, p)] = g.call_function(operator.getitem, (chunks, p))
        for node in self.nodes:
            if node.op in ("placeholder", "get_attr", "output") or self.part[node.name]:
                continue
            if node.name in self.joined or node.name in self.uniform or node.name in self.late:
                continue
            self.whole[node.name] = g.node_copy(node, self._whole_arg)

        levels = max(self.level.values(), default=0)
        for level in range(levels + 1):
            mine = [n for n in self.nodes if self.level.get(n.name) == level]
            for p in range(self.k):
                for node in mine:
                    if not self.part[node.name] or self.kind.get(node.name) in ("f", "e"):
                        continue
                    arg = lambda a, p=p, n=node: self._part_arg(a, p, n)  # noqa: E731
                    if self.kind.get(node.name) == "g":
                        old = type(self.gm.get_submodule(str(node.target)))
                        module = self._started(node, _STARTED[old], added)
                        handles = g.call_function(pending)
                        args = torch.fx.map_arg(node.args, arg)
                        out = g.call_module(module, (*args, handles), node.kwargs)
                        self.started[(node.name, p)] = (out, handles)
                    else:
                        self.parts[(node.name, p)] = self._copy(node, arg)
            for node in mine:
                if node.name in self.joined:
                    self.whole[node.name] = g.node_copy(node, self._whole_arg)
            for node in mine:
                if self.kind.get(node.name) == "e":
                    self._enter(node)
                if self.kind.get(node.name) != "f":
                    continue
                module = self._started(node, GradReduceStarted, added)
                handles = g.call_function(pending)
                xs = [self._part_arg(node.args[0], p) for p in range(self.k)]
                waited = g.call_function(joint_wait, (handles, *xs))
                for p in range(self.k):  # each part's f is made just before its first reader
                    self.deferred[(node.name, p)] = (module, waited, handles)
        (output,) = [n for n in self.nodes if n.op == "output"]
        g.output(torch.fx.map_arg(output.args[0], self._whole_arg), type_expr=output.type)
        g.lint()
        return g, added

    def _enter(self, node: torch.fx.Node) -> None:
        """A region entry under sequence parallelism, for every part: one `joint_wait` on
        the parts' inputs (the backward's reduce-scatters of their gradients, started by
        the finishing modules, are waited for there), then each part's all-gather
        started; each part's finishing module is made where that part first reads it."""
        g = self.g
        grad_handles = g.call_function(pending)
        xs = [self._part_arg(node.args[0], p, node) for p in range(self.k)]
        waited = g.call_function(joint_wait, (grad_handles, *xs))
        module = self._started(node, GatherStarted, self.added)
        for p in range(self.k):
            x = g.call_function(operator.getitem, (waited, p))
            handles = g.call_function(pending)
            pieces = g.call_module(module, (x, node.args[1], handles))
            self.entered[(node.name, p)] = (node, x, pieces, handles, grad_handles)

    def _copy(self, node: torch.fx.Node, arg: Any) -> torch.fx.Node:
        """A part's copy of ``node``; a batch baked into its shape becomes the part's."""
        new = self.g.node_copy(node, arg)
        if node.name in self.split.scaled:
            at, times = self.split.scaled[node.name]
            shape = list(new.args[1])
            shape[at] = times * (self.split.size // self.k)
            new.args = (new.args[0], shape, *new.args[2:])
        return new

    def _finished(self, node: torch.fx.Node) -> str:
        old = self.gm.get_submodule(str(node.target))
        name = f"{str(node.target).replace('.', '_')}_finished"
        if name not in self.added:
            self.added[name] = _ENTRIES[type(old)](old.group, old.t, old.rank)
        return name

    def _started(self, node: torch.fx.Node, kind: type[TPCollective],
                 added: dict[str, nn.Module]) -> str:
        name = f"{str(node.target).replace('.', '_')}_started"
        if name not in added:
            old = self.gm.get_submodule(str(node.target))
            added[name] = kind(old.group, old.t, old.rank)
        return name

    def _part_arg(self, a: torch.fx.Node, p: int, reader: torch.fx.Node | None = None
                  ) -> torch.fx.Node:
        """Argument ``a`` for part ``p`` of ``reader``."""
        if self.part[a.name]:
            if (a.name, p) in self.entered:  # the entry's gather is done: finish it
                node, x, pieces, handles, grad_handles = self.entered.pop((a.name, p))
                name = self._finished(node)
                rest = torch.fx.map_arg(node.args[2:], lambda b: self._part_arg(b, p, node))
                self.parts[(a.name, p)] = self.g.call_module(
                    name, (x, node.args[1], pieces, handles, grad_handles, *rest),
                    node.kwargs)
            if (a.name, p) in self.started:
                out, handles = self.started.pop((a.name, p))
                self.parts[(a.name, p)] = self.g.call_function(finish, (out, handles))
            if (a.name, p) in self.deferred:  # f of part p, made where part p first reads it
                module, waited, handles = self.deferred.pop((a.name, p))
                x = self.g.call_function(operator.getitem, (waited, p))
                self.parts[(a.name, p)] = self.g.call_module(module, (x, handles))
            return self.parts[(a.name, p)]
        if reader is not None and a.name in self._sliced(reader):
            if (a.name, p) not in self.slices:
                dim = sequence_dim(self.values.get(a.name), self.split.size)
                n = self.split.size // self.k
                self.slices[(a.name, p)] = self.g.call_function(
                    torch.narrow, (self._ensure(a), dim, p * n, n))
            return self.slices[(a.name, p)]
        return self._ensure(a)

    def _sliced(self, node: torch.fx.Node) -> frozenset[str]:
        """The whole values a part of ``node`` reads sliced (a recomputed segment: those
        of its members)."""
        return frozenset().union(*(self.split.slices.get(m, ()) for m in self._members(node)))

    def _ensure(self, a: torch.fx.Node) -> torch.fx.Node:
        """The whole value ``a``; a uniform one (from the first part) or one computed from
        it is emitted where first read."""
        if a.name not in self.whole:
            if a.name in self.uniform:
                self.whole[a.name] = self.g.node_copy(a, lambda b: self._part_arg(b, 0))
            else:
                self.whole[a.name] = self.g.node_copy(a, self._whole_arg)
        return self.whole[a.name]

    def _whole_arg(self, a: torch.fx.Node) -> torch.fx.Node:
        """Argument ``a`` of a node that runs on the whole microbatch."""
        if not self.part[a.name]:
            return self._ensure(a)
        if a.name in self.split.inputs:
            return self.whole[a.name]
        if a.name not in self.cats:
            dim = self.split.parts.get(a.name)
            if dim is None and not isinstance(self.values.get(a.name), torch.Tensor):
                if a.name not in self.whole:  # T of x.size(), for a whole-sequence mask
                    self.whole[a.name] = self.g.node_copy(a, self._whole_arg)
                return self.whole[a.name]
            if dim is None:
                raise _Unsplit(f"{a.name} runs per part but its value cannot be put back "
                               "together (not a tensor with one batch dim)")
            pieces = [self._part_arg(a, p) for p in range(self.k)]
            self.cats[a.name] = self.g.call_function(torch.cat, (pieces, dim))
        return self.cats[a.name]


def stage_inputs(specs: Sequence[Any], graph_inputs: Sequence[Any]) -> list[Any]:
    """Example values for a stage's placeholders: meta tensors for what it receives, then
    its own graph inputs."""
    return [s.empty(torch.device("meta")) for s in specs] + list(graph_inputs)
