"""Build the per-rank program of a tensor-parallel region, and prove it by shape propagation.

`region_program` turns a `TPRegion` record into a small GraphModule holding only
the region's nodes, with exactly the changes the record lists: sharded
parameters enter as this rank's slices, the shape constants in ``rewrites`` are
divided by t, the operands in ``narrows`` are sliced, and a vocab-parallel
embedding masks the ids it does not own. `prove` runs that program on fake
tensors (`tripar.graph.values`) and checks every node's shape, and that each row-parallel output (a
partial sum) has the unsharded shape the all-reduce restores. Codegen applies
the same record; tests run the program on real weights, one rank at a time,
and sum the partial outputs.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from tripar.graph.params import canonical_names
from tripar.graph.proxy import TPRegion
from tripar.graph.tp_ops import fetch_attr, flat_args, linear_info, set_flat_arg
from tripar.graph.values import FakeInterpreter


class ShapeError(Exception):
    """A rewrite cannot be applied at this degree (a size not divisible by t)."""


def take_shard(x: torch.Tensor, dim: int, parts: tuple[int, ...], t: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s slice of ``x`` along ``dim``: piece ``rank`` of t of every part.

    >>> take_shard(torch.arange(12), 0, (6, 6), 3, 1)
    tensor([2, 3, 8, 9])
    """
    parts = parts or (x.shape[dim],)
    pieces, start = [], 0
    for p in parts:
        n = p // t
        pieces.append(x.narrow(dim, start + rank * n, n))
        start += p
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def vocab_parallel_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    """Look up the rows ``[start, start + len(weight))`` this rank owns; zeros elsewhere.
    Summing the results of all ranks (the forward all-reduce) gives the full lookup.

    >>> w = torch.arange(8.0).view(4, 2)
    >>> vocab_parallel_embedding(torch.tensor([0, 3]), w[2:], 2)
    tensor([[0., 0.],
            [6., 7.]])
    """
    local = ids - start
    outside = (local < 0) | (local >= weight.shape[0])
    out = F.embedding(local.masked_fill(outside, 0), weight)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


@dataclass(frozen=True, slots=True)
class ProgramInput:
    """One input of a region program: an outside node's value or a parameter."""

    node: str
    """The outside node feeding the region ('' for a parameter of a call_module linear)."""
    param: str = ""
    """Canonical FQN when this input is a parameter."""
    dim: int = -1
    """The parameter's sharded dim, -1 when replicated."""
    parts: tuple[int, ...] = ()
    row_bias: bool = False
    """A row-parallel bias: only rank 0 adds it, so that the partial sums add up."""


@dataclass
class RegionProgram:
    """A region as a stand-alone GraphModule for one rank."""

    module: torch.fx.GraphModule
    inputs: tuple[ProgramInput, ...]
    outputs: tuple[str, ...]
    """Region nodes whose values the program returns (rows, loss, graph outputs)."""
    node_map: dict[str, str]
    """Region node -> program node."""
    t: int
    rank: int

    def make_inputs(self, values: Mapping[str, Any], params: Mapping[str, torch.Tensor]) -> list[Any]:
        """The program's arguments from outside node values and full (unsharded) parameters."""
        out = []
        for inp in self.inputs:
            if not inp.param:
                out.append(values[inp.node])
                continue
            x = params[inp.param]
            if inp.dim >= 0:
                x = take_shard(x, inp.dim, inp.parts, self.t, self.rank)
            if inp.row_bias and self.rank != 0:
                x = torch.zeros_like(x)
            out.append(x)
        return out


def _row_biases(gm: torch.fx.GraphModule, region: TPRegion, modules: dict, canon: dict) -> set[str]:
    nodes = {n.name: n for n in gm.graph.nodes}
    out = set()
    for name in region.row:
        lin = linear_info(nodes[name], modules, canon)
        if lin is not None and lin.bias and not lin.embedding:
            out.add(lin.bias)
    return out


def region_program(gm: torch.fx.GraphModule, region: TPRegion, *, t: int, rank: int = 0) -> RegionProgram:
    """Rank ``rank``'s program for ``region`` at degree ``t`` (raises ShapeError when a
    rewritten size is not divisible by t)."""
    modules = dict(gm.named_modules())
    canon = canonical_names(gm)
    shard = dict(region.shards)
    parts = dict(region.parts)
    row_bias = _row_biases(gm, region, modules, canon)
    rewrites: dict[str, list[int]] = {}
    for node, idx in region.rewrites:
        rewrites.setdefault(node, []).append(idx)
    narrows: dict[str, list[tuple[int, int]]] = {}
    for node, idx, dim in region.narrows:
        narrows.setdefault(node, []).append((idx, dim))
    members = set(region.nodes)
    g = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    inputs: list[ProgramInput] = []
    params: dict[str, torch.fx.Node] = {}
    root: dict[str, Any] = {}

    def param(fqn: str, source: str) -> torch.fx.Node:
        if fqn not in params:
            dim = shard.get(fqn, -1)
            params[fqn] = g.placeholder(f"p_{len(inputs)}")
            inputs.append(ProgramInput(source, fqn, dim, parts.get(fqn, ()), fqn in row_bias))
        return params[fqn]

    def outside(n: torch.fx.Node) -> torch.fx.Node:
        if n.op == "get_attr" and n.target in canon:
            return param(canon[n.target], n.name)
        ph = g.placeholder(f"x_{len(inputs)}")
        inputs.append(ProgramInput(n.name))
        return ph

    for node in gm.graph.nodes:
        if node.name not in members:
            continue
        for inp in node.all_input_nodes:
            if inp.name not in members and inp.name not in env:
                env[inp.name] = outside(inp)
        lin = linear_info(node, modules, canon)
        if lin is not None and lin.embedding and region.kind == "embedding":
            w = param(lin.weight, "")
            rows = fetch_attr(gm, lin.weight).shape[0]
            new = g.call_function(vocab_parallel_embedding, (env[lin.input], w, rank * (rows // t)))
        elif node.op == "call_module" and lin is not None:
            w = param(lin.weight, "")
            if lin.embedding:
                new = g.call_function(F.embedding, (env[lin.input], w))
            else:
                b = param(lin.bias, "") if lin.bias else None
                new = g.call_function(F.linear, (env[lin.input], w, b))
        else:
            new = g.node_copy(node, lambda a: env[a.name])
            if node.op == "call_module":
                root[node.target] = modules[node.target]
        for idx, dim in narrows.get(node.name, ()):
            with g.inserting_before(new):
                piece = g.call_function(take_shard, (flat_args(new)[idx], dim, (), t, rank))
            set_flat_arg(new, idx, piece)
        for idx in rewrites.get(node.name, ()):
            leaf = flat_args(new)[idx]
            if isinstance(leaf, torch.fx.Node):
                with g.inserting_before(new):
                    set_flat_arg(new, idx, g.call_function(operator.floordiv, (leaf, t)))
            elif isinstance(leaf, int):
                if leaf % t:
                    raise ShapeError(f"node {node.name}: size {leaf} is not divisible by t={t}")
                set_flat_arg(new, idx, leaf // t)
            else:
                raise ShapeError(f"node {node.name}: argument {idx} ({leaf!r}) is not a size")
        env[node.name] = new
    outs = list(dict.fromkeys(list(region.row) + ([region.loss] if region.loss else []) + list(region.outputs)))
    g.output(tuple(env[o] for o in outs))
    module = torch.fx.GraphModule(root or torch.nn.Module(), g)
    return RegionProgram(module, tuple(inputs), tuple(outs), {k: v.name for k, v in env.items() if k in members},
                         t, rank)


class _ShardedRun(FakeInterpreter):
    """Runs a region's program on fake tensors and records each node's output shape
    (what the proof checks), not its value."""

    def __init__(self, module: torch.fx.GraphModule) -> None:
        super().__init__(module)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def record(self, node: torch.fx.Node, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            self.shapes[node.name] = tuple(value.shape)


def prove(
    gm: torch.fx.GraphModule,
    region: TPRegion,
    t: int,
    values: Mapping[str, Any],
    params: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]] | None = None,
) -> str | None:
    """None when ``region`` is proven at degree ``t``, else the reason it is not.

    ``values`` and ``params`` hold the unsharded meta values of outside nodes and
    parameters; ``expected`` the sharded shape each region node must have.
    """
    if region.heads and region.heads % t:
        return f"t={t}: {region.heads} attention heads are not divisible by {t}"
    if region.kv_heads and region.kv_heads % t:
        return f"t={t}: {region.kv_heads} key/value heads are not divisible by {t}"
    for fqn, dim in region.shards:
        size = params[fqn].shape[dim]
        for p in dict(region.parts).get(fqn, (size,)):
            if p % t:
                return f"t={t}: {fqn} has {p} along dim {dim}, not divisible by {t}"
    try:
        prog = region_program(gm, region, t=t, rank=0)
    except ShapeError as e:
        return f"t={t}: {e}"
    run = _ShardedRun(prog.module)
    try:
        with torch.no_grad():
            run.propagate(*prog.make_inputs(values, params))
    except Exception as e:  # noqa: BLE001 - any failure disproves the region
        where = next((n for n in prog.node_map if prog.node_map[n] not in run.shapes), "?")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"t={t}: sharded shape propagation failed near node {where}: {first}"
    for name in region.row + ((region.loss,) if region.loss else ()):
        got, want = run.shapes.get(prog.node_map[name]), tuple(values[name].shape)
        if got != want:
            return f"t={t}: partial output {name} has shape {got}, expected the unsharded {want}"
    for name, want in (expected or {}).items():
        got = run.shapes.get(prog.node_map.get(name, ""))
        if got is not None and got != tuple(want):
            return f"t={t}: node {name} has sharded shape {got}, expected {tuple(want)}"
    return None
