"""Find tensor-parallel regions in a captured graph, from structure and shapes alone.

Every linear whose weight is a parameter is tried, in graph order, as a
column-parallel seed (weight sharded on its output features). The sharded dim
is carried forward op by op (`tp_rules`); a replicated operand that meets a
sharded one pulls in the linears it comes from (k and v next to q, the up
projection next to a SwiGLU gate, the other thirds of a fused QKV are already
there), and the region ends where linears contract over the sharded dim
(row-parallel: partial sums, all-reduced), at a cross entropy over sharded
logits, or at the graph output. What is found:

- ``mlp``: column -> elementwise -> row, gated MLPs included.
  Forward all-reduce after the row linear, backward all-reduce of the input
  gradient before the columns (Megatron g/f). ``comm_bytes``: the row output.
- ``attention``: q, k, v column-parallel (a fused QKV sliced per part), heads and
  kv heads divided, output projection row-parallel. Same collectives.
- ``embedding``: an embedding indexed by a graph input, sharded on the vocabulary;
  forward all-reduce of its output, no backward collective.
- ``lm_head``: a column-parallel linear whose logits reach a cross entropy or the
  graph output. With a vocab-parallel cross entropy the logits stay sharded and
  the forward collective is the all-reduce of each token's max logit, sum of
  exponentials and target logit: ``comm_bytes`` = 3 x tokens x 4 bytes (fp32).
  Logits also returned by the model are listed in ``outputs`` (to all-gather if
  used). Without a loss the logits are all-gathered (``all_gather``, full bytes).

A region counts at degree t only after `tp_prove.prove` ran its sharded program
on meta tensors. The rest stays replicated and comes back as `Unproven`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx

from tripar.graph.params import tied_groups
from tripar.graph.proxy import TPRegion, Unproven
from tripar.graph.tp_grow import EXIT, PARTIAL, Grown, Partner, Reject, Shard
from tripar.graph.tp_ops import VIEWS, Linear, find_linears, op_name
from tripar.graph.tp_prove import prove
from tripar.graph.tp_rules import Grower
from tripar.graph.values import meta_values

_ID_OPS = VIEWS | frozenset("to alias contiguous clone detach long int unsqueeze expand".split())


def _bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


def _from_input(node: torch.fx.Node, modules: dict) -> bool:
    """Whether ``node`` is a graph input, up to views and dtype casts (token ids)."""
    while node.op != "placeholder":
        if node.op not in ("call_function", "call_method") or op_name(node, modules) not in _ID_OPS:
            return False
        node = node.args[0]
        if not isinstance(node, torch.fx.Node):
            return False
    return True


def find_tp_regions(
    gm: torch.fx.GraphModule,
    node_block: dict[str, str],
    *,
    degrees: Sequence[int] = (2, 4, 8),
    example_inputs: Sequence[Any] | None = None,
) -> tuple[list[TPRegion], list[Unproven]]:
    """Tensor-parallel regions of ``gm`` proven at some of ``degrees``, and the rest.

    ``node_block`` maps node names to block names (module FQNs). ``example_inputs``
    is needed only when the graph's nodes carry no recorded shapes.

    >>> import torch.fx
    >>> from torch import nn
    >>> mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    >>> gm = torch.fx.symbolic_trace(mlp)
    >>> regions, unproven = find_tp_regions(gm, {}, degrees=(2, 3), example_inputs=[torch.ones(4, 8)])
    >>> [(r.kind, r.shards, r.degrees) for r in regions]
    [('mlp', (('0.weight', 0), ('0.bias', 0), ('2.weight', 1)), (2,))]
    >>> unproven[0].reason
    't=3: 0.weight has 32 along dim 0, not divisible by 3'
    """
    vals = meta_values(gm, example_inputs)
    modules = dict(gm.named_modules())
    linears = find_linears(gm, modules)
    params = {name: torch.empty(p.shape, dtype=p.dtype, device="meta") for name, p in gm.named_parameters()}
    tied = {group[0]: group for group in tied_groups(gm)}
    grower = Grower(gm, vals, linears)
    regions: list[TPRegion] = []
    candidates: list[TPRegion] = []  # every recorded region, proven or not (for numbering)
    unproven: list[Unproven] = []
    used: set[str] = set()
    attempted: set[str] = set()
    cache: set[tuple] = set()
    for name, lin in linears.items():
        if lin.embedding or name in used or name in attempted:
            continue
        block = node_block.get(name, "")
        cols = [name]
        try:
            for _ in range(64):
                try:
                    grown = grower.grow(cols, used)
                    break
                except Partner as p:
                    cols += [c for c in p.names if c not in cols]
            else:
                raise Reject(name, "too many linears had to join the region")
            region, expected = _record(grown, grower, block, tied)
        except Reject as r:
            attempted.update(cols)
            unproven.append(Unproven(block, tuple(cols), r.reason))
            continue
        candidates.append(region)
        ok = _prove_all(gm, region, degrees, vals, params, expected, unproven, cache, grower)
        if ok:
            regions.append(replace(region, degrees=ok))
            used.update(region.column + region.row)
        else:
            attempted.update(cols)
    # token embeddings (ids from a graph input), and every other lookup of a weight that a
    # region or a token embedding shards (t5's and bart's decoder embedding reads the shared
    # weight with ids shifted from the labels): a sharded weight has no replicated reader
    shared = {fqn for r in regions for fqn, _ in r.shards}
    shared |= {lin.weight for name, lin in linears.items()
               if lin.embedding and _from_input(grower.nodes[lin.input], modules)}
    for name, lin in linears.items():
        if lin.embedding and name not in used and (
                lin.weight in shared or _from_input(grower.nodes[lin.input], modules)):
            region = _embedding(lin, vals, node_block.get(name, ""), tied)
            candidates.append(region)
            ok = _prove_all(gm, region, degrees, vals, params, None, unproven, cache, grower)
            if ok:
                regions.append(replace(region, degrees=ok))
    regions = _whole_readers(regions, linears, unproven)
    number = _numbers(candidates, grower.index)
    regions = [replace(r, index=number[(r.block, r.kind, r.nodes)]) for r in regions]
    regions.sort(key=lambda r: grower.index[r.nodes[0]])
    return regions, unproven


def _whole_readers(regions: list[TPRegion], linears: dict[str, Linear],
                   unproven: list[Unproven]) -> list[TPRegion]:
    """``regions`` without those sharding a weight that a node outside every region also
    reads (bart's LM head adds a bias no region shards, so its tied embeddings stay
    replicated too): each weight is sharded by all of its readers or by none."""
    while True:
        covered = {n for r in regions for n in r.nodes}
        outside = {}
        for name, lin in linears.items():
            if name not in covered:
                outside.setdefault(lin.weight, name)
        dropped = [(r, fqn) for r in regions for fqn, _ in r.shards if fqn in outside]
        if not dropped:
            return regions
        for r, fqn in dropped:
            unproven.append(Unproven(r.block, r.nodes, f"its weight {fqn} is also read by node "
                                     f"{outside[fqn]}, which no region shards", kind=r.kind))
        gone = {id(r) for r, _ in dropped}
        regions = [r for r in regions if id(r) not in gone]


def _numbers(candidates: Sequence[TPRegion], position: dict[str, int]
             ) -> dict[tuple[str, str, tuple[str, ...]], int]:
    """Each candidate's ``index``: its rank among the candidates of its (block, kind) by
    graph position. Unproven candidates count too, so a proof failing at one degree does
    not renumber the regions after it (the planner and codegen prove different degrees
    and must agree on names)."""
    out: dict[tuple[str, str, tuple[str, ...]], int] = {}
    seen: dict[tuple[str, str], int] = {}
    for r in sorted(candidates, key=lambda r: (position[r.nodes[0]], r.nodes)):
        key = (r.block, r.kind, r.nodes)
        if key not in out:
            out[key] = seen.get((r.block, r.kind), 0)
            seen[(r.block, r.kind)] = out[key] + 1
    return out


def _signature(region: TPRegion, grower: Grower, expected: dict | None) -> tuple:
    """Equal for regions of identical structure, shapes and sharding (repeated layers),
    which therefore share one proof."""
    pos = {n: i for i, n in enumerate(region.nodes)}
    vals = grower.vals

    def ext(a: torch.fx.Node) -> tuple:
        if a.name in pos:
            return ("r", pos[a.name])
        v = vals.get(a.name)
        return (a.op, tuple(v.shape) if isinstance(v, torch.Tensor) else repr(v))

    items = []
    for name in region.nodes:
        n = grower.nodes[name]
        target = repr(grower.modules[n.target]) if n.op == "call_module" else str(n.target)
        args = torch.fx.node.map_arg((n.args, n.kwargs), ext)
        items.append((n.op, target, repr(args), (expected or {}).get(name)))
    return (
        region.kind, tuple(items),
        tuple((tuple(grower.gm.get_parameter(f).shape), d) for f, d in region.shards),
        tuple(p for _, p in region.parts), tuple((pos[n], i) for n, i in region.rewrites),
        tuple((pos[n], i, d) for n, i, d in region.narrows), tuple(pos[r] for r in region.row),
        pos.get(region.loss), region.heads, region.kv_heads,
    )


def _prove_all(gm, region, degrees, vals, params, expected, unproven, cache, grower) -> tuple[int, ...]:
    ok = []
    sig = _signature(region, grower, expected)
    for t in degrees:
        if (sig, t) in cache:
            ok.append(t)
            continue
        want = None
        if expected is not None:
            want = {n: tuple(s // t if i == d else s for i, s in enumerate(shape)) if d >= 0 else shape
                    for n, (shape, d) in expected.items()}
        reason = prove(gm, region, t, vals, params, want)
        if reason is None:
            ok.append(t)
            cache.add((sig, t))
        else:
            unproven.append(Unproven(region.block, region.nodes, reason, kind=region.kind, degree=t))
    return tuple(ok)


def _tied_of(shards: tuple[tuple[str, int], ...], tied: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(n for fqn, _ in shards for n in tied.get(fqn, ()))


def _embedding(lin: Linear, vals: dict, block: str, tied: dict) -> TPRegion:
    shards = ((lin.weight, 0),)
    return TPRegion(
        kind="embedding", block=block, nodes=(lin.node,), shards=shards,
        forward_collective="all_reduce", backward_collective="none",
        comm_bytes=_bytes(vals[lin.node]), degrees=(), row=(lin.node,), tied=_tied_of(shards, tied),
    )


def _record(g: Grown, grower: Grower, block: str, tied: dict) -> tuple[TPRegion, dict]:
    """The region record of a grown set, and each node's (unsharded shape, sharded dim)."""
    vals, index = grower.vals, grower.index
    first = g.columns[0]
    if not (g.rows or g.loss or g.outputs):
        raise Reject(first, "the sharded values are never reduced or returned")
    if g.rows and (g.loss or g.outputs):
        raise Reject(first, "the region ends both in row-parallel linears and at the output")
    if not g.rows and g.narrows:
        raise Reject(first, "a column-parallel output would be gathered after slicing replicated "
                            f"activations ({sorted(n for n, _ in g.narrows)}): not a head")
    for name in g.extra:  # a rewritten constant computed outside the region
        outside = [u.name for u in grower.nodes[name].users if u.name not in g.states]
        if outside:
            raise Reject(name, f"its size constant must shrink but it is also used by {outside}")
    nodes = sorted((set(g.states) | g.extra) - {"output"}, key=index.__getitem__)
    if g.rows:
        kind = "attention" if g.attention else "mlp"
        comm = sum(_bytes(vals[r]) for r in g.rows)
        fwd = "all_reduce"
    elif g.loss:
        kind, fwd = "lm_head", "all_reduce"
        logits = vals[grower.nodes[g.loss].args[0].name]
        classes = logits.shape[1] if logits.dim() >= 2 else logits.shape[0]
        comm = 3 * (logits.numel() // classes) * 4
    else:
        kind, fwd = "lm_head", "all_gather"
        comm = sum(_bytes(vals[o]) for o in g.outputs)
    heads = max(g.heads) if kind == "attention" and g.heads else 0
    kv = min(g.heads) if heads else 0
    shards = tuple((fqn, d) for fqn, (d, _) in g.shards.items())
    parts = tuple((fqn, p) for fqn, (_, p) in g.shards.items() if len(p) > 1)
    expected = {}
    for name in nodes:
        st, v = g.states.get(name), vals.get(name)
        if not isinstance(v, torch.Tensor):
            continue
        if isinstance(st, Shard):
            expected[name] = (tuple(v.shape), st.dim)
        elif st in (PARTIAL, EXIT):
            expected[name] = (tuple(v.shape), -1)
    region = TPRegion(
        kind=kind, block=block, nodes=tuple(nodes), shards=shards,
        forward_collective=fwd, backward_collective="all_reduce", comm_bytes=int(comm), degrees=(),
        heads=heads, kv_heads=kv,
        column=tuple(sorted(g.columns, key=index.__getitem__)), row=tuple(g.rows),
        rewrites=tuple(sorted(g.rewrites, key=lambda a: (index[a[0]], a[1]))),
        narrows=tuple(sorted(((n, i, d) for (n, i), d in g.narrows.items()), key=lambda a: (index[a[0]], a[1]))),
        parts=parts, outputs=tuple(g.outputs), loss=g.loss, tied=_tied_of(shards, tied),
    )
    return region, expected


__all__ = ["find_tp_regions"]
