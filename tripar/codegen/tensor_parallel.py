"""The tensor-parallel rewrite: one rank's program for the regions a plan shards.

`tp_rewrite` applies each `TPRegion` record to a copy of the captured graph, as
`tripar.graph.tp_prove.region_program` does for one region, and adds the
collectives (`tripar.codegen.collectives`):

- sharded weights become this rank's slices (fused QKV per part, `tp_shard`), under
  their original names, so a tied embedding and head stay one parameter;
- Megatron's f (`copy_to_tp`) goes on every replicated value that enters a region and
  may carry a gradient: the input of the column-parallel linears (q, k and v share one),
  and any other replicated tensor a sharded op reads;
- a row-parallel linear loses its bias, its partial sum is all-reduced (g), and the bias
  is added once after the all-reduce;
- a vocab-parallel embedding looks up the ids in this rank's rows (the others give
  zeros) and is all-reduced; a cross entropy over vocab-sharded logits becomes
  `vocab_parallel_cross_entropy`; sharded values the graph returns are all-gathered;
- every shape constant in ``rewrites`` is divided by t; every operand in ``narrows`` is
  sliced per rank (`scatter_to_tp`, whose backward all-gathers);
- a random op (dropout) on a sharded value draws from the tracker's tensor-parallel
  stream (`tp_rng.ForkedRNG`): different masks per rank; replicated dropout keeps the
  default stream, the same on every rank.

The result is checked by shape propagation on meta tensors (`tp_verify`) before it is
returned. A region the rewrite cannot apply is refused with a `RewriteError` that names
the node and the reason; nothing is computed silently wrong.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.operator_schemas import normalize_function

from tripar.codegen.collectives import (
    CopyToTP,
    GatherFromTP,
    ReduceFromTP,
    ScatterToTP,
    VocabParallelCrossEntropy,
    vocab_parallel_embedding,
)
from tripar.codegen.sequence_parallel import apply_sequence_parallel
from tripar.codegen.tp_rng import ForkedRNG, RNGTracker, method_caller, tp_rng_tracker
from tripar.codegen.tp_shard import check_divisible, region_shards, take_shard
from tripar.codegen.tp_verify import RewriteError, check_shapes, propagate
from tripar.graph import canonical_names
from tripar.graph.proxy import TPRegion
from tripar.graph.tp_ops import (
    CE,
    NLL,
    arg,
    fetch_attr,
    flat_args,
    linear_info,
    op_name,
    param_ref,
    set_flat_arg,
)

__all__ = ["RewriteError", "rewrite_with_values", "tp_rewrite"]

KINDS = frozenset(("mlp", "attention", "embedding", "lm_head"))
RANDOM = frozenset(
    "dropout alpha_dropout feature_alpha_dropout feature_dropout native_dropout dropout1d dropout2d "
    "dropout3d bernoulli rand_like randn_like randint_like rand randn randint normal uniform "
    "multinomial rrelu".split()
)
_REF_OPS = frozenset("t numpy_T transpose permute detach alias to contiguous getattr".split())
_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def _where(region: TPRegion) -> str:
    return f"{region.kind} region at node {region.nodes[0] if region.nodes else '?'}"


def _is_float(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _has_tensor(v: Any) -> bool:
    from torch.utils._pytree import tree_flatten

    return any(isinstance(x, torch.Tensor) for x in tree_flatten(v)[0])


class _Rewriter:
    """Mutable state of one rewrite (the copy being changed and what was added)."""

    def __init__(self, gm: torch.fx.GraphModule, vals: Mapping[str, Any], regions: Sequence[TPRegion], *,
                 t: int, rank: int, group: Any, rng: RNGTracker | None) -> None:
        self.gm, self.graph, self.vals = gm, gm.graph, vals
        self.t, self.rank, self.group, self.rng = t, rank, group, rng
        self.modules = dict(gm.named_modules())
        self.canon = _canonical(gm, {f for r in regions for f, _ in r.shards})
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.created: set[str] = set()
        self.comm: dict[str, str] = {}
        self.shards: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.grad = self._may_need_grad()
        self.finals: dict[str, str] = {}
        """Row/embedding node -> the node carrying its all-reduced value."""

    # ---- helpers -------------------------------------------------------------------------
    def _may_need_grad(self) -> set[str]:
        out: set[str] = set()
        for n in self.graph.nodes:
            v = self.vals.get(n.name)
            if n.op == "placeholder":
                if _is_float(v):
                    out.add(n.name)
            elif n.op == "get_attr":
                p = fetch_attr(self.gm, n.target)
                if isinstance(p, nn.Parameter) and p.requires_grad:
                    out.add(n.name)
            elif n.op == "call_module":
                mod = self.modules[n.target]
                if any(p.requires_grad for p in mod.parameters()) or any(a.name in out for a in n.all_input_nodes):
                    out.add(n.name)
            elif n.op in ("call_function", "call_method") and op_name(n, self.modules) != "detach":
                if any(a.name in out for a in n.all_input_nodes):
                    out.add(n.name)
        return out

    def _comm(self, kind: str) -> str:
        """The name of the shared collective module of ``kind`` (added on first use)."""
        if kind not in self.comm:
            cls = {"copy": CopyToTP, "reduce": ReduceFromTP, "scatter": ScatterToTP,
                   "gather": GatherFromTP, "cross_entropy": VocabParallelCrossEntropy}[kind]
            name, i = f"tp_{kind}", 0
            while hasattr(self.gm, name):
                i += 1
                name = f"tp_{kind}_{i}"
            self.gm.add_submodule(name, cls(self.group, self.t, self.rank))
            self.comm[kind] = name
        return self.comm[kind]

    def _new(self, op: str, target: Any, args: tuple, kwargs: dict | None = None) -> torch.fx.Node:
        node = self.graph.create_node(op, target, args, kwargs or {})
        self.created.add(node.name)
        return node

    def _sharded_ref(self, node: torch.fx.Node) -> str | None:
        ref = param_ref(node, self.canon)
        return ref[0] if ref and ref[0] in self.shards else None

    # ---- checks --------------------------------------------------------------------------
    def check(self, regions: Sequence[TPRegion]) -> dict[str, str]:
        """Static refusals; returns node -> region description for every region node."""
        owner: dict[str, str] = {}
        for r in regions:
            where = _where(r)
            if r.kind not in KINDS:
                raise RewriteError(f"{where}: unknown region kind {r.kind!r} (known: {sorted(KINDS)})")
            if self.t not in r.degrees:
                raise RewriteError(f"{where}: tensor-parallel degree t={self.t} was not proven for this "
                                   f"region (proven degrees: {list(r.degrees)}); pick one of those or leave "
                                   "the region replicated")
            for name in r.nodes:
                if name not in self.nodes:
                    raise RewriteError(f"{where}: node {name} is not in the graph (a region of another graph?)")
                if name in owner:
                    raise RewriteError(f"{where}: node {name} also belongs to the {owner[name]}")
                owner[name] = where
        self.shards = region_shards(regions)
        self._check_param_uses(owner)
        for r in regions:
            self._check_region(r, owner)
        return owner

    def _check_param_uses(self, owner: dict[str, str]) -> None:
        """Every reader of a sharded weight must be in a region (a tied weight sharded for the
        LM head but read replicated by the embedding would be wrong)."""
        for n in self.graph.nodes:
            if n.op == "call_module":
                mod = self.modules[n.target]
                held = [self.canon.get(f"{n.target}.{k}", "") for k, _ in mod.named_parameters()]
                fqns = [f for f in held if f in self.shards]
                readers = [n] if fqns else []
            elif n.op == "get_attr" and self.canon.get(n.target) in self.shards:
                fqns, readers, todo = [self.canon[n.target]], [], list(n.users)
                while todo:  # through transposes and detaches of the weight to its consumers
                    u = todo.pop()
                    if op_name(u, self.modules) in _REF_OPS and param_ref(u, self.canon):
                        todo.extend(u.users)
                    else:
                        readers.append(u)
            else:
                continue
            for u in readers:
                if u.name not in owner and op_name(u, self.modules) != "output":
                    raise RewriteError(f"node {u.name} reads the sharded parameter {fqns[0]} but belongs to no "
                                       "sharded region: shard every region using that (tied) weight, or none")

    def _check_region(self, r: TPRegion, owner: dict[str, str]) -> None:
        where = _where(r)
        ends = set(r.row) | set(r.outputs) | ({r.loss} if r.loss else set())
        members = set(r.nodes)
        for name in r.nodes:
            node = self.nodes[name]
            if name not in ends:
                outside = [u.name for u in node.users if u.name not in members]
                if outside and _has_tensor(self.vals.get(name)):
                    raise RewriteError(f"{where}: node {name} holds a sharded value but is also read outside "
                                       f"the region by {outside}; only row-parallel outputs, the loss and "
                                       "graph outputs may leave a region")
            if node.op == "call_module" and name not in r.column + r.row:
                mod = self.modules[node.target]
                if isinstance(mod, nn.modules.dropout._DropoutNd):
                    continue
                if any(p.requires_grad for p in mod.parameters()):
                    raise RewriteError(f"{where}: node {name} calls module {node.target} "
                                       f"({type(mod).__name__}) whose replicated parameters would get "
                                       "partial gradients inside the sharded region; capture it with its "
                                       "ops inlined (not as a leaf module)")
        for name in r.column:
            lin = linear_info(self.nodes[name], self.modules, self.canon)
            if lin is None or lin.embedding:
                raise RewriteError(f"{where}: column-parallel node {name} is not a linear with a parameter weight")
            if self.shards.get(lin.weight, (None,))[0] != lin.out_dim:
                raise RewriteError(f"{where}: column-parallel node {name}: weight {lin.weight} is not sharded "
                                   f"on its output dim {lin.out_dim}")
        for name in r.row:
            lin = linear_info(self.nodes[name], self.modules, self.canon)
            if lin is None:
                raise RewriteError(f"{where}: row-parallel node {name} is not a linear or embedding")
            dim = 0 if lin.embedding else lin.in_dim
            if self.shards.get(lin.weight, (None,))[0] != dim:
                raise RewriteError(f"{where}: row-parallel node {name}: weight {lin.weight} is not sharded "
                                   f"on dim {dim}")
            if lin.embedding != (r.kind == "embedding"):
                raise RewriteError(f"{where}: node {name} is {'an embedding' if lin.embedding else 'a linear'}"
                                   f" but the region kind is {r.kind}")
        if r.outputs and any(p for _, p in r.parts):
            raise RewriteError(f"{where}: graph outputs {list(r.outputs)} are sharded per fused part; "
                               "gathering them needs a per-part gather, which the rewrite does not do")

    # ---- parameters ----------------------------------------------------------------------
    def shard_params(self) -> None:
        paths: dict[str, list[str]] = {}
        for name, canon in self.canon.items():
            paths.setdefault(canon, []).append(name)
        for fqn, (dim, parts) in self.shards.items():
            param = fetch_attr(self.gm, fqn)
            check_divisible(fqn, param.shape[dim], dim, parts, self.t)
            with torch.no_grad():
                piece = take_shard(param.detach(), dim, parts, self.t, self.rank).clone()
            new = nn.Parameter(piece, requires_grad=param.requires_grad)
            for path in paths.get(fqn, [fqn]):
                owner, _, leaf = path.rpartition(".")
                mod = self.gm.get_submodule(owner)
                setattr(mod, leaf, new)
                if isinstance(mod, nn.Linear) and leaf == "weight":
                    mod.out_features, mod.in_features = new.shape
                elif isinstance(mod, nn.Embedding) and leaf == "weight":
                    mod.num_embeddings = new.shape[0]

    # ---- regions -------------------------------------------------------------------------
    def region(self, r: TPRegion) -> None:
        for name in r.row:
            if r.kind == "embedding":
                self._embedding(r, self.nodes[name])
            else:
                self._row(r, self.nodes[name])
        if r.loss:
            self._loss(r, self.nodes[r.loss])
        self._narrows(r)
        self._rewrites(r)
        self._entries(r)

    def _narrows(self, r: TPRegion) -> None:
        for name, idx, dim in r.narrows:
            node = self.nodes[name]
            leaf = flat_args(node)[idx]
            if not isinstance(leaf, torch.fx.Node):
                raise RewriteError(f"{_where(r)}: narrow of node {name} argument {idx}: {leaf!r} is not a tensor")
            with self.graph.inserting_before(node):
                piece = self._new("call_module", self._comm("scatter"), (leaf, dim))
            set_flat_arg(node, idx, piece)

    def _rewrites(self, r: TPRegion) -> None:
        for name, idx in r.rewrites:
            node = self.nodes[name]
            leaf = flat_args(node)[idx]
            if isinstance(leaf, torch.fx.Node):
                with self.graph.inserting_before(node):
                    set_flat_arg(node, idx, self._new("call_function", operator.floordiv, (leaf, self.t)))
            elif isinstance(leaf, int) and not isinstance(leaf, bool):
                if leaf % self.t:
                    raise RewriteError(f"{_where(r)}: node {name}: size {leaf} (argument {idx}) is not "
                                       f"divisible by t={self.t}")
                set_flat_arg(node, idx, leaf // self.t)
            else:
                raise RewriteError(f"{_where(r)}: node {name}: argument {idx} ({leaf!r}) is not a size")

    def _entries(self, r: TPRegion) -> None:
        """Megatron's f on every replicated value entering the region that may need a gradient."""
        members = set(r.nodes)
        copies: dict[str, torch.fx.Node] = {}
        for name in r.nodes:
            node = self.nodes[name]
            if node.graph is not self.graph or node.op == "output":
                continue  # replaced (row linears, embeddings, the loss)
            for a in list(node.all_input_nodes):
                if (a.name in members or a.name in self.created or a.name not in self.grad
                        or not _is_float(self.vals.get(a.name)) or self._sharded_ref(a)):
                    continue
                if a.name not in copies:
                    with self.graph.inserting_after(a):
                        copies[a.name] = self._new("call_module", self._comm("copy"), (a,))
                node.replace_input_with(a, copies[a.name])

    def _bias_after(self, y: torch.fx.Node, old: torch.fx.Node, bias: torch.fx.Node | None) -> None:
        with self.graph.inserting_after(y):
            g = self._new("call_module", self._comm("reduce"), (y,))
        out = g
        if bias is not None:
            with self.graph.inserting_after(g):
                out = self._new("call_function", operator.add, (g, bias))
        old.replace_all_uses_with(out, delete_user_cb=lambda u: u is not g)
        self.finals[old.name] = out.name

    def _row(self, r: TPRegion, node: torch.fx.Node) -> None:
        name = op_name(node, self.modules)
        if node.op == "call_module":
            mod = self.modules[node.target]
            with self.graph.inserting_before(node):
                w = self._new("get_attr", f"{node.target}.weight", ())
                bias = self._new("get_attr", f"{node.target}.bias", ()) if mod.bias is not None else None
                y = self._new("call_function", F.linear, (node.args[0], w))
            self._bias_after(y, node, bias)
            self.graph.erase_node(node)
            return
        if name == "linear":
            bias = arg(node, 2, "bias")
            if len(node.args) > 2:
                node.args = node.args[:2]
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
        elif name == "addmm":
            if arg(node, 3, "beta", 1) != 1 or arg(node, 4, "alpha", 1) != 1:
                raise RewriteError(f"{_where(r)}: row-parallel node {node.name}: addmm with beta/alpha "
                                   "other than 1 is not supported")
            bias = node.args[0]
            aten = isinstance(node.target, torch._ops.OpOverload)
            node.target = torch.ops.aten.mm.default if aten else torch.mm
            node.args, node.kwargs = (node.args[1], node.args[2]), {}
        elif name in ("mm", "matmul"):
            bias = None
        else:
            raise RewriteError(f"{_where(r)}: row-parallel node {node.name} ({name}) is not a linear the "
                               "rewrite knows (linear, addmm, mm, matmul, nn.Linear)")
        self._bias_after(node, node, bias if isinstance(bias, torch.fx.Node) else None)

    def _embedding(self, r: TPRegion, node: torch.fx.Node) -> None:
        where = f"{_where(r)}: embedding node {node.name}"
        if node.op == "call_module":
            mod = self.modules[node.target]
            opts = {"max_norm": mod.max_norm, "scale_grad_by_freq": mod.scale_grad_by_freq, "sparse": mod.sparse}
            ids, pad = node.args[0], mod.padding_idx
            with self.graph.inserting_before(node):
                w = self._new("get_attr", f"{node.target}.weight", ())
        else:
            norm = normalize_function(node.target, tuple(node.args), dict(node.kwargs),
                                      normalize_to_only_use_kwargs=True)
            if norm is None:
                raise RewriteError(f"{where}: its arguments could not be read")
            kw = norm.kwargs
            aten = isinstance(node.target, torch._ops.OpOverload)
            ids, w = (kw["indices"], kw["weight"]) if aten else (kw["input"], kw["weight"])
            pad = kw.get("padding_idx", -1 if aten else None)
            pad = None if aten and pad == -1 else pad
            opts = {k: kw.get(k) for k in ("max_norm", "scale_grad_by_freq", "sparse")}
        bad = {k: v for k, v in opts.items() if v not in (None, False)}
        if bad:
            raise RewriteError(f"{where}: options {bad} are not supported by the vocab-parallel embedding")
        lin = linear_info(node, self.modules, self.canon)
        vocab = self._rows(lin.weight)
        if pad is not None and pad < 0:
            pad += vocab
        with self.graph.inserting_before(node):
            y = self._new("call_function", vocab_parallel_embedding,
                          (ids, w, self.rank * (vocab // self.t), pad))
        self._bias_after(y, node, None)
        self.graph.erase_node(node)

    def _rows(self, fqn: str) -> int:
        dim, parts = self.shards[fqn]
        return fetch_attr(self.gm, fqn).shape[dim] * self.t

    def _loss(self, r: TPRegion, node: torch.fx.Node) -> None:
        where = f"{_where(r)}: loss node {node.name}"
        name = op_name(node, self.modules)
        if name in NLL:
            raise RewriteError(f"{where}: an NLL loss over vocab-parallel log-probabilities (log_softmax "
                               "then nll_loss) is not supported by the rewrite; compute the loss with "
                               "F.cross_entropy on the logits")
        if node.op == "call_module" and isinstance(self.modules[node.target], nn.CrossEntropyLoss):
            mod = self.modules[node.target]
            logits, target = node.args[0], node.args[1]
            kw = {"weight": mod.weight, "label_smoothing": mod.label_smoothing,
                  "ignore_index": mod.ignore_index, "reduction": mod.reduction}
        elif name in CE and node.op == "call_function":
            norm = normalize_function(node.target, tuple(node.args), dict(node.kwargs),
                                      normalize_to_only_use_kwargs=True)
            if norm is None:
                raise RewriteError(f"{where}: its arguments could not be read")
            kw = dict(norm.kwargs)
            logits, target = kw.pop("input", kw.pop("self", None)), kw["target"]
            if kw.get("size_average") is not None or kw.get("reduce") is not None:
                raise RewriteError(f"{where}: the legacy size_average/reduce arguments are not supported")
        else:
            raise RewriteError(f"{where}: {name} is not a cross entropy the rewrite knows")
        if kw.get("weight") is not None or kw.get("label_smoothing", 0.0) not in (0, 0.0):
            raise RewriteError(f"{where}: class weights and label smoothing are not supported by the "
                               "vocab-parallel cross entropy")
        tv = self.vals.get(target.name) if isinstance(target, torch.fx.Node) else None
        if not isinstance(tv, torch.Tensor) or tv.is_floating_point():
            raise RewriteError(f"{where}: targets must be class indices (got {getattr(tv, 'dtype', tv)}), "
                               "not probabilities")
        reduction = kw.get("reduction", "mean")
        reduction = _REDUCTIONS.get(reduction, reduction) if isinstance(reduction, int) else reduction
        with self.graph.inserting_before(node):
            new = self._new("call_module", self._comm("cross_entropy"),
                            (logits, target, int(kw.get("ignore_index", -100)), reduction))
        node.replace_all_uses_with(new)
        self.finals[node.name] = new.name
        self.graph.erase_node(node)

    # ---- after a first shape propagation -------------------------------------------------
    def finish(self, regions: Sequence[TPRegion], shapes: dict[str, Any]) -> None:
        for r in regions:
            members = set(r.nodes)
            for name in r.outputs:
                self._gather(r, self.nodes[name], shapes, members)
            for name in r.nodes:
                node = self.nodes[name]
                if node.graph is self.graph and node.op != "output" and self._is_random(node):
                    before, after = self.vals.get(name), shapes.get(name)
                    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) \
                            and before.shape != after.shape:
                        self._fork(node)

    def _gather(self, r: TPRegion, node: torch.fx.Node, shapes: dict[str, Any], members: set) -> None:
        before, after = self.vals.get(node.name), shapes.get(node.name)
        if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
            raise RewriteError(f"{_where(r)}: graph output {node.name} is not a tensor; cannot gather it")
        dims = [d for d in range(before.dim()) if before.shape[d] != after.shape[d]]
        if len(dims) != 1:
            raise RewriteError(f"{_where(r)}: graph output {node.name} has shape {tuple(after.shape)} here "
                               f"and {tuple(before.shape)} unsharded: not sharded on a single dim")
        with self.graph.inserting_after(node):
            g = self._new("call_module", self._comm("gather"), (node, dims[0]))
        node.replace_all_uses_with(g, delete_user_cb=lambda u: u is not g and u.name not in members)
        self.finals[node.name] = g.name

    def _is_random(self, node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.modules.get(node.target), nn.modules.dropout._DropoutNd) \
                and self.modules[node.target].p > 0
        name = op_name(node, self.modules)
        if name == "scaled_dot_product_attention":
            p = arg(node, 4, "dropout_p", 0.0)
            return isinstance(p, torch.fx.Node) or p > 0
        if name in RANDOM and "dropout" in name:
            p = arg(node, 1, "p", 0.5)
            return isinstance(p, torch.fx.Node) or p > 0
        return name in RANDOM

    def _fork(self, node: torch.fx.Node) -> None:
        if self.rng is None:
            self.rng = tp_rng_tracker(torch.initial_seed() % (1 << 62), self.rank)
        if node.op == "call_module":
            fn: Any = self.modules[node.target]
        elif node.op == "call_method":
            fn = method_caller(node.target)
        else:
            fn = node.target
        name, i = f"tp_rng_{node.name}", 0
        while hasattr(self.gm, name):
            i += 1
            name = f"tp_rng_{node.name}_{i}"
        self.gm.add_submodule(name, ForkedRNG(fn, self.rng))
        node.op, node.target = "call_module", name


def _canonical(gm: torch.fx.GraphModule, preferred: set[str]) -> dict[str, str]:
    """Attribute path -> one name per distinct parameter: the name the regions use when
    one of a tied parameter's names is theirs, else the first."""
    canon = canonical_names(gm)
    groups: dict[str, list[str]] = {}
    for path, first in canon.items():
        groups.setdefault(first, []).append(path)
    for paths in groups.values():
        pick = next((p for p in paths if p in preferred), paths[0])
        for p in paths:
            canon[p] = pick
    return canon


def tp_rewrite(gm: torch.fx.GraphModule, regions: Sequence[TPRegion],
               **options: Any) -> torch.fx.GraphModule:
    """Tensor-parallel rank ``rank`` of ``t``'s copy of ``gm`` with ``regions`` sharded.

    Keywords (those of :func:`rewrite_with_values`): ``t`` and ``rank`` (required),
    ``group``, ``example_inputs``, ``rng``, ``values``. ``group`` is the tensor-parallel
    process group (None: the default group), used only when the result runs.
    ``example_inputs`` (one per placeholder, real or meta) are needed when the graph's
    nodes carry no recorded shapes. ``rng`` supplies the tensor-parallel random stream
    for dropout in sharded regions (default: one seeded from ``torch.initial_seed()`` and
    ``rank``). ``values`` are ``gm``'s node values on these inputs from an earlier
    propagation (``propagate`` or ``split.propagate_values``), reused instead of
    propagating ``gm`` again. The parameters of the result are this rank's slices of
    ``gm``'s (meta stays meta; load real ones with `shard_parameters`). ``gm`` is not
    changed. Raises `RewriteError` naming the node and the reason when a region cannot be
    applied.

    >>> import torch.fx
    >>> from torch import nn
    >>> from tripar.graph.tp_regions import find_tp_regions
    >>> mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    >>> gm = torch.fx.symbolic_trace(mlp)
    >>> regions, _ = find_tp_regions(gm, {}, degrees=(2,), example_inputs=[torch.ones(4, 8)])
    >>> local = tp_rewrite(gm, regions, t=2, rank=1, example_inputs=[torch.ones(4, 8)])
    >>> [tuple(p.shape) for p in local.parameters()]
    [(16, 8), (16,), (8, 16), (8,)]
    >>> [n.target if n.op == "call_module" else n.name for n in local.graph.nodes][1:-1]
    ['tp_copy', '0', '1', '_2_weight', '_2_bias', 'linear', 'tp_reduce', 'add']
    """
    return rewrite_with_values(gm, regions, **options)[0]


def rewrite_with_values(
    gm: torch.fx.GraphModule,
    regions: Sequence[TPRegion],
    *,
    t: int,
    rank: int,
    group: Any = None,
    example_inputs: Sequence[Any] | None = None,
    rng: RNGTracker | None = None,
    values: Mapping[str, Any] | None = None,
    sequence_parallel: bool = False,
) -> tuple[torch.fx.GraphModule, dict[str, Any] | None]:
    """:func:`tp_rewrite` (whose docstring describes the arguments), and the rewritten
    graph's node values (fake tensors) from the propagation that verified it (None when
    nothing was rewritten): the stage split reads its shapes from them instead of
    propagating the graph once more. ``sequence_parallel``: the token-wise parts between
    the regions then run on sequence shards (``sequence_parallel.apply_sequence_parallel``;
    the sequence is dim 1 of the first graph input)."""
    if isinstance(t, bool) or not isinstance(t, int) or t < 1 or not 0 <= rank < t:
        raise RewriteError(f"tensor-parallel rank {rank} must lie in [0, t) with t={t} >= 1")
    regions = tuple(regions)
    new = copy.deepcopy(gm)
    if t == 1 or not regions:
        return new, None
    vals = values if values is not None else propagate(gm, example_inputs,
                                                       what="the original graph")
    rw = _Rewriter(new, vals, regions, t=t, rank=rank, group=group, rng=rng)
    owner = rw.check(regions)
    rw.shard_params()
    for r in regions:
        rw.region(r)
    new.graph.lint()
    new.recompile()
    shapes = propagate(new, example_inputs)
    rw.finish(regions, shapes)
    new.graph.lint()
    new.recompile()
    shapes = propagate(new, example_inputs)
    weights = {n.name: "sharded weight" for n in new.graph.nodes if rw._sharded_ref(n)}
    check_shapes(vals, shapes, {**owner, **weights}, t)
    for old, final in rw.finals.items():
        before, after = vals.get(old), shapes.get(final)
        if isinstance(before, torch.Tensor) and (not isinstance(after, torch.Tensor) or after.shape != before.shape):
            raise RewriteError(f"node {old}: its reduced value {final} has shape "
                               f"{getattr(after, 'shape', after)}, expected {tuple(before.shape)}")
    zone: list[str] = []
    if sequence_parallel:
        new, shapes, zone = apply_sequence_parallel(
            new, shapes, regions=set(owner), t=t, rank=rank, group=group,
            seq_len=_seq_len(gm, vals), example_inputs=example_inputs)
    new.meta["tripar_tp"] = {"t": t, "rank": rank, "regions": len(regions), "sequence": len(zone)}
    return new, shapes


def _seq_len(gm: torch.fx.GraphModule, vals: Mapping[str, Any]) -> int:
    """The sequence length: dim 1 of the first graph input with two dims or more."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = vals.get(node.name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[1])
    raise RewriteError("sequence parallelism needs a graph input with a sequence dim (dim 1 of "
                       "a tensor of two dims or more); this graph has none: use sp=False")
