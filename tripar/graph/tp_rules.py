"""How each op carries a sharded dim from its inputs to its output.

One method per family of ops, each returning the output's state (`Shard`,
`Scaled`, a tuple of them, or `REPL` / `PARTIAL` / `EXIT`) or raising `Reject`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx

from tripar.graph.tp_grow import (
    EXIT,
    PARTIAL,
    REPL,
    GrowerBase,
    Grown,
    Reject,
    Scaled,
    Shard,
    norm_dim,
    reshape_groups,
)
from tripar.graph.tp_ops import Linear, arg, flat_args, leaf_index

Node = torch.fx.Node


def _dims(value: Any, nd: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [norm_dim(value, nd)]
    return [norm_dim(d, nd) for d in value]


class Grower(GrowerBase):
    """Region growth with the op rules."""

    def _linear(self, node: Node, g: Grown, lin: Linear) -> Any:
        x = self.nodes[lin.input]
        xs = self._st(g, x)
        others = [a for a in node.all_input_nodes if a is not x and isinstance(self._st(g, a), Shard | Scaled)]
        if others:
            raise Reject(node.name, "a weight or bias of this linear depends on the sharded tensor")
        if not isinstance(xs, Shard) or lin.embedding:
            raise Reject(node.name, "an embedding looks up sharded indices")
        nd = self.vals[x.name].dim()
        if xs.dim != nd - 1:  # a batch-like dim: the linear maps each slice on its own
            return Shard(xs.dim, xs.parts)
        if node.name in self.used:
            raise Reject(node.name, "this linear already belongs to another region")
        self._add_param(g, node.name, lin.weight, lin.in_dim, xs.parts)
        if lin.bias:
            g.row_bias.add(lin.bias)
        g.rows.append(node.name)
        return PARTIAL

    def _size(self, node: Node, g: Grown, name: str, xs: Any) -> Any:
        if not isinstance(xs, Shard):
            return REPL
        nd = self.vals[node.args[0].name].dim()
        if name == "getattr":
            if node.args[1] == "shape":
                return Scaled(tuple(i == xs.dim for i in range(nd)))
            return REPL
        if name == "numel":
            return Scaled(True)
        if name in ("size", "sym_size"):
            d = arg(node, 1, "dim")
            if d is None:
                return Scaled(tuple(i == xs.dim for i in range(nd)))
            return Scaled(norm_dim(d, nd) == xs.dim) if norm_dim(d, nd) == xs.dim else REPL
        return REPL

    def _int_op(self, node: Node, g: Grown, name: str) -> Any:
        val = self.vals[node.name]
        if name == "getitem":
            st, idx = self._st(g, node.args[0]), node.args[1]
            flags = st.flags if isinstance(st, Scaled) else None
            if not isinstance(flags, tuple):
                return REPL
            sub = flags[idx]
            return Scaled(sub) if (any(sub) if isinstance(sub, tuple) else sub) else REPL
        states = [self._st(g, a) for a in node.args]
        if isinstance(val, tuple | list):  # tuple concatenation
            flags: list[bool] = []
            for a, st in zip(node.args, states):
                av = self.vals.get(a.name) if isinstance(a, Node) else a
                f = st.flags if isinstance(st, Scaled) else (False,) * len(av)
                flags.extend(f)
            return Scaled(tuple(flags)) if any(flags) else REPL
        scaled = [isinstance(s, Scaled) and s.flags is True for s in states]
        if sum(scaled) > 1 and name in ("mul", "floordiv", "truediv"):
            raise Reject(node.name, "multiplies two sizes that both shrink with the sharding")
        return Scaled(True) if any(scaled) else REPL

    def _ce(self, node: Node, g: Grown, xs: Any) -> Any:
        x = node.args[0]
        if any(isinstance(self._st(g, a), Shard | Scaled) for a in node.all_input_nodes if a is not x):
            raise Reject(node.name, "cross entropy with sharded targets")
        nd = self.vals[x.name].dim()
        if not isinstance(xs, Shard) or xs.dim != (1 if nd >= 2 else 0) or xs.logp:
            raise Reject(node.name, "cross entropy over logits not sharded on the class dim")
        if len(xs.parts) > 1:
            raise Reject(node.name, "cross entropy over fused logits")
        g.loss = node.name
        return EXIT

    def _getitem(self, node: Node, g: Grown, xs: Any) -> Any:
        idx = node.args[1]
        if isinstance(xs, tuple):  # a split's pieces
            st = xs[idx] if isinstance(idx, int) else None
            return st if isinstance(st, Shard) else REPL
        if not isinstance(xs, Shard):
            if any(isinstance(self._st(g, a), Shard | Scaled) for a in node.all_input_nodes):
                raise Reject(node.name, "indexes with a sharded tensor or size")
            return REPL
        items = list(idx) if isinstance(idx, tuple) else [idx]
        nd = self.vals[node.args[0].name].dim()
        if Ellipsis in items:
            k = items.index(Ellipsis)
            used = sum(1 for it in items if it is not None and it is not Ellipsis)
            items[k:k + 1] = [slice(None)] * (nd - used)
        items += [slice(None)] * (nd - sum(1 for it in items if it is not None))
        i = o = 0
        out_dim = None
        for it in items:
            if it is None:
                o += 1
                continue
            if isinstance(it, Node) and isinstance(self.vals.get(it.name), torch.Tensor):
                raise Reject(node.name, "advanced indexing of a sharded tensor")
            if i == xs.dim:
                if not (isinstance(it, slice) and it == slice(None)):
                    raise Reject(node.name, f"indexes the sharded dim with {it!r}")
                out_dim = o
            if isinstance(it, slice):
                o += 1
            i += 1
        return Shard(out_dim, xs.parts, xs.logp)

    def _view(self, node: Node, g: Grown, name: str, xs: Any) -> Any:
        if name in ("view_as", "reshape_as"):
            raise Reject(node.name, f"{name} of a sharded tensor")
        if not isinstance(xs, Shard):
            if any(isinstance(self._st(g, a), Scaled) for a in node.all_input_nodes):
                raise Reject(node.name, "reshapes a replicated tensor with a size that shrinks with the sharding")
            return REPL
        a = tuple(self.vals[node.args[0].name].shape)
        b = tuple(self.vals[node.name].shape)
        try:
            groups = reshape_groups(a, b)
        except ValueError as e:
            raise Reject(node.name, str(e)) from None
        gi, go = next((gi, go) for gi, go in groups if xs.dim in gi)
        if math.prod(a[k] for k in gi if k < xs.dim) != 1:
            raise Reject(node.name, f"merges the sharded dim {xs.dim} under a larger dim of {a}")
        o = next((k for k in go if b[k] > 1), go[0])
        inner_in = math.prod(a[k] for k in gi if k > xs.dim)
        inner_out = math.prod(b[k] for k in go if k > o)
        parts = []
        for p in xs.parts:
            if (p * inner_in) % inner_out:
                raise Reject(node.name, f"fused part of size {p} does not align with the view {b}")
            parts.append(p * inner_in // inner_out)
        if len(go) > 1 and inner_out > 1 and o < go[-1]:
            g.heads.append(b[o])
        if name in ("view", "reshape", "unsafe_view"):
            self._fix_entries(node, g, self._sized_entries(node, g), 0, o)
        elif name == "unflatten":
            start = norm_dim(arg(node, 1, "dim"), len(a))
            sizes = arg(node, 2, "sizes")
            path = (0, 2) if len(node.args) > 2 else (1, "sizes")
            self._fix_entries(node, g, self._entries(node, g, sizes, path), start, o)
        return Shard(o, tuple(parts), xs.logp)

    def _expand(self, node: Node, g: Grown, xs: Any) -> Any:
        if not isinstance(xs, Shard):
            if any(isinstance(self._st(g, a), Scaled) for a in node.all_input_nodes):
                raise Reject(node.name, "expands a replicated tensor to a size that shrinks with the sharding")
            return REPL
        o = xs.dim + self.vals[node.name].dim() - self.vals[node.args[0].name].dim()
        self._fix_entries(node, g, self._sized_entries(node, g), 0, o)
        return Shard(o, xs.parts)

    def _split(self, node: Node, g: Grown, name: str, xs: Any) -> Any:
        if not isinstance(xs, Shard):
            raise Reject(node.name, f"{name} with a size that shrinks with the sharding")
        outs = self.vals[node.name]
        nd = self.vals[node.args[0].name].dim()
        dim = norm_dim(arg(node, 2, "dim", 0), nd)
        if dim != xs.dim:
            return tuple(Shard(xs.dim, xs.parts) for _ in outs)
        if name in ("tensor_split", "unsafe_split"):
            raise Reject(node.name, f"{name} along the sharded dim")
        sizes = [v.shape[dim] for v in outs]
        bounds, acc = {0}, 0
        for p in xs.parts:
            acc += p
            bounds.add(acc)
        states, start = [], 0
        for s in sizes:
            if start not in bounds or start + s not in bounds:
                raise Reject(node.name, f"splits {sizes} across the fused parts {xs.parts}")
            states.append(Shard(dim, self._parts_in(xs.parts, start, s)))
            start += s
        if name in ("split", "split_with_sizes"):
            spec = arg(node, 1, "split_size")
            key = 1 if len(node.args) > 1 else next(k for k in node.kwargs if k.startswith("split"))
            path = (0, 1) if key == 1 else (1, key)
            if isinstance(spec, list | tuple):
                for k, leaf in enumerate(spec):
                    self._rewrite_leaf(node, g, path + (k,), leaf)
            else:
                self._rewrite_leaf(node, g, path, spec)
        return tuple(states)

    @staticmethod
    def _parts_in(parts: tuple[int, ...], start: int, size: int) -> tuple[int, ...]:
        out, acc = [], 0
        for p in parts:
            if start <= acc < start + size:
                out.append(p)
            acc += p
        return tuple(out)

    def _rewrite_leaf(self, node: Node, g: Grown, path: tuple, leaf: Any) -> None:
        st = self._st(g, leaf)
        if isinstance(st, Scaled) and st.flags is True:
            return
        g.rewrites.add((node.name, leaf_index(node, path)))

    def _matmul(self, node: Node, g: Grown) -> Any:
        a, b = node.args[0], node.args[1]
        av, bv, out = self.vals[a.name], self.vals[b.name], self.vals[node.name]
        if av.dim() < 2 or bv.dim() < 2:
            raise Reject(node.name, "matrix-vector product with a sharded operand")
        nd = out.dim()

        def where(st: Any, v: torch.Tensor, first: bool) -> Any:
            if not isinstance(st, Shard):
                return None
            k_dim = v.dim() - 1 if first else v.dim() - 2
            if st.dim == k_dim:
                return "k"
            if st.dim == v.dim() - 2:
                return nd - 2
            if st.dim == v.dim() - 1:
                return nd - 1
            return st.dim + nd - v.dim()

        sa, sb = self._st(g, a), self._st(g, b)
        targets = [t for t in (where(sa, av, True), where(sb, bv, False)) if t is not None]
        if "k" in targets:
            raise Reject(node.name, "a product of two activations contracts over the sharded dim")
        if len(set(targets)) > 1:
            raise Reject(node.name, f"operands sharded on different output dims {targets}")
        od = targets[0]
        parts = (sa if isinstance(sa, Shard) else sb).parts
        if isinstance(sa, Shard) and isinstance(sb, Shard):
            g.attention = True
        elif od < nd - 2:  # a batch dim: the replicated operand must be sliced alike
            leaf, v, pos = (b, bv, 1) if isinstance(sa, Shard) else (a, av, 0)
            ad = od - (nd - v.dim())
            if ad >= 0 and v.shape[ad] != 1:
                self._need(g, node, leaf_index(node, (0, pos)), leaf, ad, parts)
            g.attention = True
        return Shard(od, parts)

    def _sdpa(self, node: Node, g: Grown) -> Any:
        q, k, v = node.args[0], node.args[1], node.args[2]
        states = [self._st(g, t) for t in (q, k, v)]
        dims = {s.dim for s in states if isinstance(s, Shard)}
        nd = self.vals[q.name].dim()
        if len(dims) != 1 or next(iter(dims)) >= nd - 2:
            raise Reject(node.name, "attention with q, k, v not sharded alike on a head dim")
        d = next(iter(dims))
        parts = next(s for s in states if isinstance(s, Shard)).parts
        for pos, (t, s) in enumerate(zip((q, k, v), states)):
            if not isinstance(s, Shard):
                self._need(g, node, leaf_index(node, (0, pos)), t, d, parts)
        mask = arg(node, 3, "attn_mask")
        if isinstance(mask, Node):
            if isinstance(self._st(g, mask), Shard | Scaled):
                raise Reject(node.name, "a sharded attention mask")
            mv = self.vals[mask.name]
            ad = d - (nd - mv.dim())
            if ad >= 0 and mv.shape[ad] != 1:
                path = (0, 3) if len(node.args) > 3 else (1, "attn_mask")
                self._need(g, node, leaf_index(node, path), mask, ad, parts)
        for leaf in flat_args(node):
            if isinstance(self._st(g, leaf), Scaled):
                raise Reject(node.name, "attention with a size that shrinks with the sharding")
        g.attention = True
        return Shard(d, parts)

    def _reduce(self, node: Node, g: Grown, name: str, xs: Any) -> Any:
        if not isinstance(xs, Shard):
            return self._elementwise(node, g, only_first=False)
        nd = self.vals[node.args[0].name].dim()
        if name == "module:Softmax":
            dims = _dims(self.modules[node.target].dim, nd)
        else:
            dims = _dims(arg(node, 1, "dim"), nd)
        if not dims:
            raise Reject(node.name, f"{name} reduces over every dim, including the sharded one")
        if xs.dim in dims:
            if name == "log_softmax" and len(xs.parts) == 1:
                return Shard(xs.dim, xs.parts, logp=True)
            raise Reject(node.name, f"{name} reduces over the sharded dim {xs.dim}")
        keep = name in ("softmax", "log_softmax", "cumsum", "module:Softmax") or bool(
            arg(node, 2, "keepdim", False)
        )
        d = xs.dim if keep else xs.dim - sum(1 for k in dims if k < xs.dim)
        out = self.vals[node.name]
        st = Shard(d, xs.parts)
        return tuple(st for _ in out) if isinstance(out, tuple | list) else st

    def _norm(self, node: Node, g: Grown, name: str, xs: Any) -> Any:
        if not isinstance(xs, Shard):
            raise Reject(node.name, f"{name} of a replicated tensor with a sharded weight")
        nd = self.vals[node.args[0].name].dim()
        if name in ("layer_norm", "native_layer_norm", "rms_norm"):
            if node.op == "call_module":
                shape = self.modules[node.target].normalized_shape
            else:
                shape = arg(node, 1, "normalized_shape")
            count = 1 if isinstance(shape, int) else len(shape)
            if xs.dim >= nd - count:
                raise Reject(node.name, f"{name} normalizes over the sharded dim {xs.dim}")
            out = self.vals[node.name]
            st = Shard(xs.dim, xs.parts)
            return tuple(st for _ in out) if isinstance(out, tuple | list) else st
        raise Reject(node.name, f"{name} over a sharded tensor")

    def _cat(self, node: Node, g: Grown) -> Any:
        tensors = arg(node, 0, "tensors")
        nd = self.vals[node.name].dim()
        dim = norm_dim(arg(node, 1, "dim", 0), nd)
        states = [self._st(g, t) for t in tensors]
        sharded = {(s.dim, s.parts) for s in states if isinstance(s, Shard)}
        if not sharded:
            return REPL
        if len(sharded) > 1:
            raise Reject(node.name, f"concatenates tensors sharded differently: {sorted(sharded)}")
        d, parts = next(iter(sharded))
        if d == dim:
            raise Reject(node.name, "concatenates along the sharded dim")
        path = (0, 0) if node.args else (1, "tensors")
        for k, (t, s) in enumerate(zip(tensors, states)):
            if not isinstance(s, Shard) and self.vals[t.name].shape[d] != 1:
                self._need(g, node, leaf_index(node, path + (k,)), t, d, parts)
        return Shard(d, parts)

    def _dim_op(self, node: Node, g: Grown, name: str, xs: Shard) -> Any:
        """Ops that move, add or remove dims of a single sharded tensor."""
        nd = self.vals[node.args[0].name].dim()
        out_nd = self.vals[node.name].dim()
        d = xs.dim
        if name in ("transpose", "swapaxes"):
            d0, d1 = norm_dim(arg(node, 1, "dim0"), nd), norm_dim(arg(node, 2, "dim1"), nd)
            d = d1 if d == d0 else d0 if d == d1 else d
        elif name == "t":
            d = 1 - d if nd == 2 else d
        elif name == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], list | tuple) else (
                node.args[1:] or node.kwargs["dims"])
            d = [norm_dim(k, nd) for k in dims].index(d)
        elif name == "movedim":
            src, dst = norm_dim(arg(node, 1, "source"), nd), norm_dim(arg(node, 2, "destination"), nd)
            order = [k for k in range(nd) if k != src]
            order.insert(dst, src)
            d = order.index(d)
        elif name == "unsqueeze":
            k = norm_dim(arg(node, 1, "dim"), out_nd)
            d = d + 1 if k <= d else d
        elif name == "squeeze":
            shape = self.vals[node.args[0].name].shape
            dims = _dims(arg(node, 1, "dim"), nd)
            gone = [k for k in range(nd) if shape[k] == 1 and (dims is None or k in dims)]
            if d in gone:
                raise Reject(node.name, "squeezes the sharded dim")
            d -= sum(1 for k in gone if k < d)
        elif name in ("slice", "narrow"):
            k = norm_dim(arg(node, 1, "dim", 0), nd)
            if k == d and self.vals[node.name].shape[d] != self.vals[node.args[0].name].shape[d]:
                raise Reject(node.name, f"{name} of the sharded dim")
        elif name == "select":
            k = norm_dim(arg(node, 1, "dim"), nd)
            if k == d:
                raise Reject(node.name, "selects along the sharded dim")
            d -= 1 if k < d else 0
        elif name == "flatten":
            return self._view(node, g, name, xs)
        elif name == "repeat_interleave":  # GQA: each kv head serves a block of query heads
            reps, k = arg(node, 1, "repeats"), arg(node, 2, "dim")
            if not isinstance(reps, int) or k is None:
                raise Reject(node.name, "repeat_interleave without an int count and a dim")
            if norm_dim(k, nd) == d:
                return Shard(d, tuple(p * reps for p in xs.parts))
        else:
            raise Reject(node.name, f"op `{name}` is not known to be safe on sharded tensors")
        return Shard(d, xs.parts, xs.logp)


__all__ = ["Grower"]
