"""Grow a tensor-parallel region forward from column-parallel linears.

Every tensor a region computes is tracked with the one dim it is sharded on
(`Shard`); sizes read from sharded tensors are tracked as `Scaled` ints. Each
op either maps the sharded dim to its output (elementwise ops, views,
transposes, splits, batched matmuls, attention), ends the region (a linear
contracting over the sharded dim: row-parallel, partial sums; a cross entropy
over sharded logits; the graph output), or rejects the region with a reason (a
LayerNorm or softmax over the sharded dim, an unknown op). Shape constants the
sharding invalidates are collected as rewrites; replicated operands as partner
linears to shard too (k and v next to q, the up projection next to the gate) or,
failing that, as narrows.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from tripar.graph.params import canonical_names
from tripar.graph.tp_ops import (
    CE,
    INT_OPS,
    MATMULS,
    NARY,
    NLL,
    NOOPS,
    NORMS,
    REDUCE,
    SDPA,
    SPLITS,
    UNARY,
    VIEWS,
    Linear,
    arg,
    flat_args,
    is_int_like,
    leaf_index,
    op_name,
)

Node = torch.fx.Node


@dataclass(frozen=True, slots=True)
class Shard:
    """A tensor sharded along ``dim``; ``parts`` are the fused pieces it is made of."""

    dim: int
    parts: tuple[int, ...]
    logp: bool = False
    """Log-probabilities over the sharded (vocabulary) dim: only an NLL may consume them."""


@dataclass(frozen=True, slots=True)
class Scaled:
    """An int (or tuple of ints) read from sharded shapes; True where it shrinks with t."""

    flags: Any


REPL, PARTIAL, EXIT = "repl", "partial", "exit"


class Reject(Exception):
    """The region cannot be sharded; ``reason`` says why."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"{node}: {reason}")
        self.node = node
        self.reason = f"node {node}: {reason}"


class Partner(Exception):
    """A replicated operand comes from linears that should be column-parallel too."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.names = names


@dataclass
class Grown:
    """What one successful growth found."""

    columns: list[str]
    rows: list[str] = field(default_factory=list)
    states: dict[str, Any] = field(default_factory=dict)
    extra: set[str] = field(default_factory=set)
    rewrites: set[tuple[str, int]] = field(default_factory=set)
    narrows: dict[tuple[str, int], int] = field(default_factory=dict)
    shards: dict[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    row_bias: set[str] = field(default_factory=set)
    heads: list[int] = field(default_factory=list)
    attention: bool = False
    loss: str = ""
    outputs: list[str] = field(default_factory=list)


_TRANSPARENT = VIEWS | UNARY | NARY | SPLITS | REDUCE | MATMULS | SDPA | frozenset(
    "transpose permute t unsqueeze squeeze expand getitem cat slice select narrow movedim swapaxes "
    "repeat_interleave".split()
)


def norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Match dims of two shapes with equal products into groups of equal size.

    >>> reshape_groups((2, 16, 64), (2, 16, 4, 16))
    [([0], [0]), ([1], [1]), ([2], [2, 3])]
    """
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                gj.append(j)
                pb *= b[j]
                j += 1
            else:
                raise ValueError(f"cannot view {a} as {b}")
        groups.append((gi, gj))
    if groups:
        groups[-1][0].extend(range(i, len(a)))
        groups[-1][1].extend(range(j, len(b)))
    return groups


class GrowerBase:
    """Region growth over one graph: the driver and the operand helpers. The op rules
    are in ``tp_rules.Grower``; ``grow(columns, used)`` is the entry point."""

    def __init__(self, gm: torch.fx.GraphModule, vals: dict[str, Any], linears: dict[str, Linear]) -> None:
        self.gm = gm
        self.vals = vals
        self.linears = linears
        self.modules = dict(gm.named_modules())
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.index = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        self.names = {n.name: op_name(n, self.modules) for n in gm.graph.nodes}
        self.params = canonical_names(gm)
        self.used: set[str] = set()

    # ----------------------------------------------------------------- driver
    def grow(self, columns: list[str], used: set[str]) -> Grown:
        g = Grown(columns=list(columns))
        self.used = used
        heap = []
        for c in columns:
            lin = self.linears[c]
            parts = self._lookahead_parts(c)
            self._add_param(g, c, lin.weight, lin.out_dim, parts)
            if lin.bias:
                self._add_param(g, c, lin.bias, 0, parts)
            heapq.heappush(heap, (self.index[c], c))
        done: set[str] = set()
        while heap:
            _, name = heapq.heappop(heap)
            if name in done:
                continue
            done.add(name)
            node = self.nodes[name]
            if name in g.columns:
                lin = self.linears[name]
                if isinstance(g.states.get(lin.input), Shard | Scaled):
                    raise Reject(name, "the input of a column-parallel linear is itself sharded")
                val = self.vals.get(name)
                st: Any = Shard(val.dim() - 1, self._lookahead_parts(name))
            else:
                st = self._transfer(node, g)
            g.states[name] = st
            if self._live(st):
                for user in node.users:
                    heapq.heappush(heap, (self.index[user.name], user.name))
        return g

    @staticmethod
    def _live(st: Any) -> bool:
        if isinstance(st, Shard):
            return True
        if isinstance(st, tuple):
            return any(isinstance(s, Shard) for s in st)
        if isinstance(st, Scaled):
            f = st.flags
            return any(f) if isinstance(f, tuple) else bool(f)
        return False

    def _lookahead_parts(self, c: str) -> tuple[int, ...]:
        """Sizes of the pieces a fused output is split into (q, k, v), else one piece."""
        size = self.vals[c].shape[-1]
        todo, seen = [self.nodes[c]], set()
        while todo:
            node = todo.pop()
            for user in node.users:
                if user.name in seen or user.args[0] is not node:
                    continue
                seen.add(user.name)
                name, val = self.names[user.name], self.vals.get(user.name)
                if name in UNARY or (name in VIEWS and isinstance(val, torch.Tensor) and val.shape[-1] == size):
                    todo.append(user)
                elif name in SPLITS and isinstance(val, tuple | list):
                    nd = self.vals[node.name].dim()
                    if norm_dim(arg(user, 2, "dim", 0), nd) == nd - 1:
                        sizes = tuple(v.shape[-1] for v in val)
                        if sum(sizes) == size:
                            return sizes
        return (size,)

    def _add_param(self, g: Grown, node: str, fqn: str, dim: int, parts: tuple[int, ...]) -> None:
        old = g.shards.get(fqn)
        if old is not None and old != (dim, parts):
            raise Reject(node, f"parameter {fqn} would be sharded two ways: {old} and {(dim, parts)}")
        g.shards[fqn] = (dim, parts)

    def _st(self, g: Grown, a: Any) -> Any:
        return g.states.get(a.name) if isinstance(a, Node) else None

    def _tensor(self, a: Any) -> bool:
        return isinstance(a, Node) and isinstance(self.vals.get(a.name), torch.Tensor)

    # ------------------------------------------------------------- operands
    def _need(self, g: Grown, node: Node, idx: int, leaf: Node, dim: int, parts: tuple[int, ...]) -> None:
        """A replicated operand must be sharded along ``dim`` to meet a sharded one."""
        if leaf.op == "get_attr" and leaf.target in self.params:
            self._add_param(g, node.name, self.params[leaf.target], dim, parts)
            return
        cands = [c for c in self._walk_back(leaf) if c not in self.used and c not in g.columns]
        if cands:
            raise Partner(cands)
        if len(parts) > 1:
            raise Reject(node.name, f"replicated operand {leaf.name} meets a fused sharded tensor")
        g.narrows[(node.name, idx)] = dim

    def _walk_back(self, start: Node) -> list[str]:
        found, todo, seen = [], [start], set()
        while todo and len(seen) < 256:
            m = todo.pop()
            if m.name in seen:
                continue
            seen.add(m.name)
            lin = self.linears.get(m.name)
            if lin is not None:
                if not lin.embedding:
                    found.append(m.name)
                continue
            if m.op not in ("call_function", "call_method") or self.names[m.name] not in _TRANSPARENT:
                continue
            todo.extend(a for a in m.all_input_nodes if self._tensor(a))
        return sorted(found, key=self.index.__getitem__)

    def _elementwise(self, node: Node, g: Grown, only_first: bool) -> Any:
        out = self.vals[node.name]
        if isinstance(out, tuple | list):  # native_dropout: (output, mask)
            st = self._st(g, node.args[0])
            return tuple(st for _ in out) if isinstance(st, Shard) else REPL
        leaves = flat_args(node)
        sharded, repl = [], []
        for i, leaf in enumerate(leaves[:1] if only_first else leaves):
            st = self._st(g, leaf)
            if isinstance(st, Scaled) and self._live(st):
                raise Reject(node.name, "uses a size that shrinks with the sharding")
            if not self._tensor(leaf):
                continue
            if isinstance(st, Shard):
                sharded.append((st.dim + out.dim() - self.vals[leaf.name].dim(), st.parts, st.logp))
            else:
                repl.append((i, leaf))
        if not sharded:
            return REPL
        if len(set(sharded)) > 1:
            raise Reject(node.name, f"operands are sharded differently: {sorted(set(sharded))}")
        od, parts, logp = sharded[0]
        if logp and not only_first:
            raise Reject(node.name, "combines log-probabilities sharded over the vocabulary")
        for i, leaf in repl:
            v = self.vals[leaf.name]
            ad = od - (out.dim() - v.dim())
            if ad >= 0 and v.shape[ad] != 1:
                self._need(g, node, i, leaf, ad, parts)
        return Shard(od, parts, logp)

    # ---------------------------------------------------------------- sizes
    def _entries(self, node: Node, g: Grown, sizes: Any, path: tuple) -> list[tuple]:
        """(address or None, leaf, scaled) for each entry of a size argument."""
        if isinstance(sizes, list | tuple):
            out = []
            for k, leaf in enumerate(sizes):
                st = self._st(g, leaf)
                scaled = isinstance(st, Scaled) and bool(st.flags)
                out.append(((node.name, leaf_index(node, path + (k,))), leaf, scaled))
            return out
        if isinstance(sizes, Node):
            st = self._st(g, sizes)
            val = self.vals.get(sizes.name)
            if isinstance(sizes, Node) and self.names[sizes.name] == "add" and isinstance(val, tuple):
                a, b = sizes.args[0], sizes.args[1]
                return self._entries(sizes, g, a, (0, 0)) + self._entries(sizes, g, b, (0, 1))
            if isinstance(val, tuple | torch.Size):
                flags = st.flags if isinstance(st, Scaled) else (False,) * len(val)
                return [(None, v, bool(f)) for v, f in zip(val, flags)]
        raise Reject(node.name, f"cannot read the size argument {sizes!r}")

    def _size_arg(self, node: Node) -> tuple[Any, tuple]:
        args = node.args
        if len(args) == 2 and (isinstance(args[1], list | tuple) or isinstance(args[1], Node)):
            return args[1], (0, 1)
        if len(args) < 2 and "size" in node.kwargs:
            return node.kwargs["size"], (1, "size")
        if len(args) < 2 and "shape" in node.kwargs:
            return node.kwargs["shape"], (1, "shape")
        return list(args[1:]), None

    def _sized_entries(self, node: Node, g: Grown, first: int = 1) -> list[tuple]:
        sizes, path = self._size_arg(node)
        if path is None:  # varargs: x.view(a, b, c)
            return [((node.name, leaf_index(node, (0, first + k))), leaf,
                     isinstance(self._st(g, leaf), Scaled) and bool(self._st(g, leaf).flags))
                    for k, leaf in enumerate(sizes)]
        return self._entries(node, g, sizes, path)

    def _fix_entries(self, node: Node, g: Grown, entries: list[tuple], offset: int, sharded: int) -> None:
        """Entry ``sharded`` (output dim, after ``offset``) must shrink by t; others must not."""
        for k, (addr, leaf, scaled) in enumerate(entries):
            if k + offset == sharded:
                if (is_int_like(leaf) and leaf == -1) or scaled:
                    continue
                if addr is None:
                    raise Reject(node.name, f"size entry {k} ({leaf}) is computed elsewhere and cannot be rewritten")
                g.rewrites.add(addr)
                if addr[0] != node.name:
                    g.extra.add(addr[0])
            elif scaled:
                raise Reject(node.name, f"size entry {k} shrinks with the sharding but dim {k + offset} is not sharded")

    # ------------------------------------------------------------- transfer
    def _transfer(self, node: Node, g: Grown) -> Any:
        name = self.names[node.name]
        if node.op == "output":
            for leaf in flat_args(node):
                if isinstance(self._st(g, leaf), Shard):
                    g.outputs.append(leaf.name)
            return EXIT
        if name in NOOPS:
            return REPL
        if self.vals.get(node.name) is None and name not in NOOPS:
            raise Reject(node.name, "its shape is unknown (meta shape propagation failed there)")
        x = node.args[0] if node.args else None
        xs = self._st(g, x)
        lin = self.linears.get(node.name)
        if lin is not None:
            return self._linear(node, g, lin)
        if name in ("size", "sym_size", "getattr", "dim", "numel", "ndimension", "stride"):
            return self._size(node, g, name, xs)
        if self._int_valued(node):
            return self._int_op(node, g, name)
        if name in CE:
            return self._ce(node, g, xs)
        if name in NLL:
            if isinstance(xs, Shard) and xs.logp and xs.dim == (1 if self.vals[x.name].dim() >= 2 else 0):
                g.loss = node.name
                return EXIT
            raise Reject(node.name, "an NLL loss over a tensor that is not sharded log-probabilities")
        if isinstance(xs, Shard) and xs.logp and name not in UNARY | VIEWS:
            raise Reject(node.name, f"{name} on log-probabilities sharded over the vocabulary")
        if name == "getitem":
            return self._getitem(node, g, xs)
        if name in UNARY:
            return self._elementwise(node, g, only_first=True)
        if name in NARY:
            return self._elementwise(node, g, only_first=False)
        if name in VIEWS:
            return self._view(node, g, name, xs)
        if name == "expand":
            return self._expand(node, g, xs)
        if name in SPLITS:
            return self._split(node, g, name, xs)
        if name in MATMULS:
            return self._matmul(node, g)
        if name in SDPA:
            return self._sdpa(node, g)
        if name in REDUCE or name == "module:Softmax":
            return self._reduce(node, g, name, xs)
        if name in NORMS:
            return self._norm(node, g, name, xs)
        if name == "cat":
            return self._cat(node, g)
        if isinstance(xs, Shard) and all(
            not isinstance(self._st(g, a), Shard | Scaled) for a in node.all_input_nodes if a is not x
        ):
            return self._dim_op(node, g, name, xs)
        raise Reject(node.name, f"op `{name}` is not known to be safe on sharded tensors")

    def _int_valued(self, node: Node) -> bool:
        """Arithmetic on sizes (``B * T``, ``x.size()[:-1] + (n,)``), not on tensors."""
        if node.op != "call_function" or node.target not in INT_OPS:
            return False
        val = self.vals.get(node.name)
        if isinstance(val, tuple | list | torch.Size):
            return all(is_int_like(v) for v in val)
        return is_int_like(val)
