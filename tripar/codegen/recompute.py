"""Stage-aware recomputation: a stage's recomputed blocks run under activation checkpointing.

A plan's ``StagePlan.recompute`` names the blocks of a stage whose activations are
dropped after the forward and recomputed in the backward (Merak's stage-aware
recomputation; the partitioner chooses them and the cost model counts what they save:
a recomputed block keeps only its input, ``saved_bytes - input_bytes`` less per
microbatch, and re-runs its forward in the backward). :func:`apply_recompute` makes a
stage module do so: the nodes of each recomputed block (by default; one segment per
maximal run of consecutive recomputed blocks with ``merge_runs=True``) move into a
segment GraphModule called through ``torch.utils.checkpoint.checkpoint(...,
use_reentrant=False)``, which keeps the segment's inputs, saves nothing inside it,
replays the default RNG state when it recomputes (dropout masks match) and works
under ``torch.no_grad`` (where the segment simply runs).

One segment per block is the default because it is what the cost model assumes: the
backward re-materialises one block at a time (``max_R (act_b - in_b)`` in
``tripar.partitioner.partition``). A merged run keeps fewer inputs but re-materialises
the whole run at once.

Parameters stay shared and keep their names. The result is a new GraphModule whose
children are the input module's own children (the same objects, in the same order),
whose root-level parameters and buffers are the input's, plus one parameter-free
``_recompute_<k>`` module per segment. A segment reads the weights through the shared
children (root-level tensors are passed to it as arguments), and the segment module is
held outside the module tree, so ``named_parameters``, ``named_modules`` (bar the
segment wrappers), ``named_buffers`` and ``state_dict`` of the result are exactly the
input's: the local names a stage's ``StageProgram.params`` maps to FQNs stay valid, and
a parameter swapped in an owner's ``_parameters`` later (ties across the stages of a
rank) is seen by the segments too.

Which block a stage node belongs to comes from the captured graph's block table
(``block_nodes``, or the proxy graph's ``{b.name: b.nodes}``): the split and the
tensor-parallel rewrite keep node names. A node the rewrite added (a collective, the
row-parallel bias add) is not in the table; it joins the block of the next known node
of the stage, the rule ``tripar.codegen.build`` splits by. A region's random stream
(``ForkedRNG``'s tracker) is saved in the forward and restored for the recomputation,
as Megatron's ``CheckpointFunction`` does.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from tripar.codegen.split import StageProgram
from tripar.codegen.tp_rng import ForkedRNG
from tripar.errors import PlanError
from tripar.graph import connected_groups

__all__ = ["Recomputed", "apply_recompute", "node_blocks", "regraphed", "segments"]

_COMPUTE = ("call_function", "call_method", "call_module")
_SEGMENT = "\0segment:"  # a unit key no node name can take


class Recomputed(nn.Module):
    """Runs ``body`` (a segment of a stage graph) under non-reentrant activation
    checkpointing when gradients are enabled, and plainly under ``torch.no_grad``.

    ``body`` is not registered as a child: its weights belong to the stage module that
    calls it (shared children), so the stage's parameter and state-dict names do not
    change. ``trackers`` are the tensor-parallel random streams the segment draws from;
    their states are saved at the forward and restored for the recomputation."""

    def __init__(self, body: torch.fx.GraphModule, blocks: Sequence[str],
                 trackers: Sequence[Any] = ()) -> None:
        super().__init__()
        object.__setattr__(self, "body", body)
        self.blocks = tuple(blocks)
        self.trackers = tuple(trackers)

    def forward(self, *args: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.body(*args)
        if self.trackers:
            return checkpoint(self.body, *args, use_reentrant=False,
                              context_fn=self._contexts)
        return checkpoint(self.body, *args, use_reentrant=False)

    def _contexts(self) -> tuple[contextlib.AbstractContextManager, Any]:
        saved = [t.get_states() for t in self.trackers]  # called at the forward
        return contextlib.nullcontext(), _replayed(self.trackers, saved)

    def extra_repr(self) -> str:
        return f"blocks={list(self.blocks)}"


@contextlib.contextmanager
def _replayed(trackers: Sequence[Any], saved: Sequence[dict]) -> Iterator[None]:
    """The trackers' streams as they were at the forward, for the recomputation; the
    streams continue where they were afterwards."""
    current = [t.get_states() for t in trackers]
    for tracker, states in zip(trackers, saved):
        tracker.set_states(states)
    try:
        yield
    finally:
        for tracker, states in zip(trackers, current):
            tracker.set_states(states)


# ---- which block each node is in ------------------------------------------------------


def node_blocks(module: torch.fx.GraphModule, blocks: Mapping[str, Sequence[str]]
                ) -> dict[str, str]:
    """Compute node name -> block, for the nodes of ``module`` (a stage of the graph
    ``blocks`` was made from, maybe tensor-parallel rewritten). A node not in ``blocks``
    joins the block of the next node that is (the last known block when none follows).

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()))
    >>> node_blocks(gm, {"a": ["_0"], "b": ["_1"]})
    {'_0': 'a', '_1': 'b'}
    """
    block_of = {n: b for b, nodes in blocks.items() for n in nodes}
    out: dict[str, str] = {}
    pending: list[str] = []
    last: str | None = None
    for node in module.graph.nodes:
        if node.op not in _COMPUTE:
            continue
        block = block_of.get(node.name)
        if block is None:
            pending.append(node.name)
            continue
        out.update((name, block) for name in pending)
        out[node.name] = block
        pending, last = [], block
    if last is not None:
        out.update((name, last) for name in pending)
    return out


def segments(held: Sequence[str], recompute: Sequence[str], *, merge_runs: bool = False
             ) -> list[tuple[str, ...]]:
    """The checkpointed segments, as block tuples in stage order: one per recomputed
    block, or one per maximal run of consecutive recomputed blocks (``merge_runs``).

    >>> segments(["a", "b", "c", "d"], ["b", "c"], merge_runs=True)
    [('b', 'c')]
    >>> segments(["a", "b", "c", "d"], ["d", "b"])
    [('b',), ('d',)]
    """
    wanted = set(recompute)
    out: list[tuple[str, ...]] = []
    run: list[str] = []
    for block in held:
        if block in wanted and merge_runs:
            run.append(block)
            continue
        if run:
            out.append(tuple(run))
            run = []
        if block in wanted:
            out.append((block,))
    if run:
        out.append(tuple(run))
    return out


# ---- the pass -------------------------------------------------------------------------


def apply_recompute(
    stage: StageProgram | torch.fx.GraphModule,
    recompute: Sequence[str],
    *,
    blocks: Mapping[str, Sequence[str]],
    module: torch.fx.GraphModule | None = None,
    held: Sequence[str] | None = None,
    merge_runs: bool = False,
    selective: Sequence[str] = (),
) -> torch.fx.GraphModule:
    """``module`` (default: the stage's) with the nodes of the blocks named in
    ``recompute`` run under activation checkpointing; the same function, the same
    parameters (shared, under the same names), less memory held for the backward.

    ``stage`` is a ``StageProgram`` (its ``blocks`` are what it holds; pass the module
    with its own weights, from ``materialize_stage``, as ``module`` when the program
    does not carry it) or a stage GraphModule with ``held`` (its blocks, in order).
    ``blocks`` is the captured graph's block table (block -> node names). ``selective``
    names nodes recomputed on their own (selective recomputation, below the block): each
    connected group of them present in the stage, outside the blocks recomputed whole,
    becomes one more segment. Recomputing nothing returns ``module`` itself; a block the stage does not hold is a PlanError.
    The input module is not changed.

    >>> import torch
    >>> from tripar.codegen.split import split_stages
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> gm = torch.fx.symbolic_trace(net)
    >>> (st,) = split_stages(gm, [["_0", "_1", "_2"]], [torch.randn(3, 4)],
    ...                      stage_blocks=[["0", "1", "2"]]).stages
    >>> table = {"0": ["_0"], "1": ["_1"], "2": ["_2"]}
    >>> rec = apply_recompute(st, ["0", "1"], blocks=table, merge_runs=True)
    >>> [name for name, _ in rec.named_children()]
    ['0', '1', '2', '_recompute_0']
    >>> x = torch.randn(3, 4)
    >>> torch.equal(rec(x)[0], st.module(x)[0]), rec.get_parameter("0.weight") is net[0].weight
    (True, True)
    """
    if isinstance(stage, StageProgram):
        gm = module if module is not None else stage.module
        held = tuple(stage.blocks if held is None else held)
        where = f"stage {stage.index}"
    else:
        gm = module if module is not None else stage
        if held is None:
            raise PlanError("apply_recompute of a bare module needs held= (the blocks the "
                            "stage holds, in order); or pass its StageProgram")
        held = tuple(held)
        where = "the stage"
    recompute = tuple(recompute)
    if not recompute and not selective:
        return gm
    missing = [b for b in recompute if b not in held]
    if missing:
        raise PlanError(f"{where} recomputes block(s) {missing}, which it does not hold (it "
                        f"holds {_short(held)}); a stage recomputes only its own blocks: fix "
                        "the plan's StagePlan.recompute")
    unknown = [b for b in recompute if b not in blocks]
    if unknown:
        raise PlanError(f"{where} recomputes block(s) {unknown}, which the block table does "
                        "not have; pass the table of the graph the stage was split from")
    block_of = node_blocks(gm, blocks)
    nodes = list(gm.graph.nodes)
    groups: list[tuple[tuple[str, ...], list[torch.fx.Node]]] = []
    for seg_blocks in segments(held, recompute, merge_runs=merge_runs):
        members = [n for n in nodes if n.op in _COMPUTE and block_of.get(n.name) in seg_blocks]
        if members:
            groups.append((seg_blocks, members))
    whole = set(recompute)
    wanted = set(selective)
    picked = [n for n in nodes if n.name in wanted and n.op in _COMPUTE
              and block_of.get(n.name) not in whole]
    for members in connected_groups(picked):
        groups.append(((block_of.get(members[0].name, "?"),), members))
    if not groups:
        return gm
    return _rewrite(gm, groups, where)


def _short(names: Sequence[str]) -> str:
    names = list(names)
    return str(names) if len(names) <= 6 else f"{names[:3]}...{names[-2:]} ({len(names)})"


def _root_attr(node: torch.fx.Node) -> bool:
    """A get_attr of a tensor held by the root module itself (passed to segments)."""
    return node.op == "get_attr" and "." not in str(node.target)


def _mutates(node: torch.fx.Node) -> bool:
    if node.target is operator.setitem:
        return True
    name = getattr(node.target, "__name__", str(node.target))
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    return node.op in ("call_function", "call_method") and name.endswith("_") \
        and not name.endswith("__")


def _rewrite(gm: torch.fx.GraphModule,
             groups: Sequence[tuple[tuple[str, ...], list[torch.fx.Node]]],
             where: str) -> torch.fx.GraphModule:
    nodes = list(gm.graph.nodes)
    index = {n.name: i for i, n in enumerate(nodes)}
    segment_of = {n.name: k for k, (_, members) in enumerate(groups) for n in members}
    plans = []
    for seg_blocks, members in groups:
        inside = {n.name for n in members}
        inputs: dict[str, torch.fx.Node] = {}
        for n in members:
            for arg in n.all_input_nodes:
                if arg.name in inside or (arg.op == "get_attr" and not _root_attr(arg)):
                    continue
                inputs.setdefault(arg.name, arg)
            if _mutates(n) and n.args and isinstance(n.args[0], torch.fx.Node) \
                    and n.args[0].name not in inside:
                raise PlanError(f"{where} cannot recompute block(s) {list(seg_blocks)}: node "
                                f"{n.name} changes its input {n.args[0].name} in place, so a "
                                "recomputation would read the changed value; leave the block "
                                "out of StagePlan.recompute")
        outputs = [n for n in members if any(u.name not in inside for u in n.users)]
        ordered = sorted(inputs.values(), key=lambda n: index[n.name])
        plans.append((seg_blocks, members, ordered, outputs))

    # units: outer nodes and whole segments, in a topological order that keeps the
    # original one wherever the data flow allows
    unit_of = {n.name: (_SEGMENT + str(segment_of[n.name]) if n.name in segment_of
                        else n.name) for n in nodes}
    deps: dict[str, set[str]] = {}
    first: dict[str, int] = {}
    for n in nodes:
        unit = unit_of[n.name]
        first.setdefault(unit, index[n.name])
        found = deps.setdefault(unit, set())
        for arg in n.all_input_nodes:
            if arg.op == "get_attr" and unit != arg.name and not _root_attr(arg) \
                    and n.name in segment_of:
                continue  # the segment reads this weight itself
            if unit_of[arg.name] != unit:
                found.add(unit_of[arg.name])
    users: dict[str, set[str]] = {u: set() for u in deps}
    for unit, found in deps.items():
        for dep in found:
            users[dep].add(unit)
    waiting = {u: len(d) for u, d in deps.items()}
    ready = [(first[u], u) for u, c in waiting.items() if c == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, unit = heapq.heappop(ready)
        order.append(unit)
        for user in users[unit]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (first[user], user))
    if len(order) != len(deps):
        stuck = sorted(set(deps) - set(order), key=first.__getitem__)
        raise PlanError(f"{where}: the recomputed blocks' nodes are interleaved with other "
                        f"nodes that both read them and feed them (around {stuck[:4]}), so "
                        "they cannot run as one segment; leave those blocks out of "
                        "StagePlan.recompute")

    by_name = {n.name: n for n in nodes}
    graph = torch.fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    env: dict[str, torch.fx.Node] = {}
    wrappers: dict[str, Recomputed] = {}
    for unit in order:
        if not unit.startswith(_SEGMENT):
            node = by_name[unit]
            if node.op == "output":
                graph.output(torch.fx.map_arg(node.args[0], lambda a: env[a.name]),
                             type_expr=node.type)
            else:
                env[unit] = graph.node_copy(node, lambda a: env[a.name])
            continue
        k = int(unit.removeprefix(_SEGMENT))
        seg_blocks, members, inputs, outputs = plans[k]
        name = f"_recompute_{k}"
        wrappers[name] = Recomputed(_segment_module(gm, members, inputs, outputs, k),
                                    seg_blocks, _trackers(gm, members))
        call = graph.call_module(name, tuple(env[a.name] for a in inputs))
        for i, out in enumerate(outputs):
            env[out.name] = graph.create_node("call_function", operator.getitem, (call, i),
                                              name=out.name)
            env[out.name].meta = dict(out.meta)
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op not in ("get_attr",))
    graph.lint()
    return regraphed(gm, graph, wrappers)


def _segment_module(gm: torch.fx.GraphModule, members: Sequence[torch.fx.Node],
                    inputs: Sequence[torch.fx.Node], outputs: Sequence[torch.fx.Node],
                    k: int) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for arg in inputs:
        env[arg.name] = graph.placeholder(arg.name)
        env[arg.name].meta = dict(arg.meta)
    tops: set[str] = set()

    def fetch(arg: torch.fx.Node) -> torch.fx.Node:
        if arg.name not in env:  # a weight of a shared child, read by the segment itself
            assert arg.op == "get_attr", arg
            env[arg.name] = graph.node_copy(arg)
            tops.add(str(arg.target).split(".")[0])
        return env[arg.name]

    for node in members:
        for arg in node.all_input_nodes:
            fetch(arg)
        env[node.name] = graph.node_copy(node, lambda a: env[a.name])
        if node.op == "call_module":
            tops.add(str(node.target).split(".")[0])
    graph.output(tuple(env[n.name] for n in outputs))
    graph.lint()
    body = torch.fx.GraphModule(nn.Module(), torch.fx.Graph(), class_name=f"Recompute{k}")
    for top in sorted(tops):
        body._modules[top] = gm._modules[top]
    body.graph = graph
    return body


def _trackers(gm: torch.fx.GraphModule, members: Sequence[torch.fx.Node]) -> list[Any]:
    found: dict[int, Any] = {}
    for node in members:
        if node.op == "call_module":
            sub = gm.get_submodule(str(node.target))
            for mod in sub.modules():
                if isinstance(mod, ForkedRNG):
                    found.setdefault(id(mod.tracker), mod.tracker)
    return list(found.values())


def regraphed(gm: torch.fx.GraphModule, graph: torch.fx.Graph,
              wrappers: Mapping[str, nn.Module]) -> torch.fx.GraphModule:
    """A GraphModule running ``graph`` over ``gm``'s own children, parameters and buffers
    (shared, in their order), with the parameter-free ``wrappers`` (segments, started
    collectives) after them."""
    out = torch.fx.GraphModule(nn.Module(), torch.fx.Graph(), class_name=type(gm).__name__)
    for name, child in gm._modules.items():
        out._modules[name] = child
    for name, param in gm._parameters.items():
        out._parameters[name] = param
    for name, buffer in gm._buffers.items():
        out._buffers[name] = buffer
    out._non_persistent_buffers_set = set(gm._non_persistent_buffers_set)
    for node in graph.find_nodes(op="get_attr"):
        target = str(node.target)
        if "." not in target and not hasattr(out, target):
            setattr(out, target, getattr(gm, target))  # a plain constant of the root
    for name, wrapper in wrappers.items():
        if name in out._modules:
            raise PlanError(f"the stage module already has a child named {name!r}; "
                            "a rewrite (recompute, tp_overlap) was applied twice")
        out._modules[name] = wrapper
    out.graph = graph
    out.meta = dict(getattr(gm, "meta", {}))
    out.training = gm.training  # the children keep their own modes
    return out
