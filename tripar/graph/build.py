"""Group an annotated graph into blocks and build the :class:`ProxyGraph`.

Grouping (:func:`partition_blocks`) uses only the graph and each node's module
FQN, so it runs before annotation too:

1. A *layer* is a child of a repeated container: the FQN prefix ending at the
   first integer component (``blocks.3``, ``transformer.h.3``,
   ``model.layers.2``, ``bert.encoder.layer.1``, ``layer1.0``).
2. Any other module is grouped by its shortest FQN prefix that is not an
   ancestor of a container (``wte``, ``model.embed_tokens``, ``model.norm``,
   ``lm_head``).
3. Nodes outside any block's module (root-level ops, or ops of a container's
   ancestor such as ``GPT2Model`` adding embeddings) join the block open at
   that point of the graph (the most recent one); those before the first block
   join the first block, and those after the last module node form a trailing
   ``loss`` block (the loss, or the final reshape of the output).
4. ``get_attr`` nodes (weights) join the block of their first user.
5. A module that runs again after other blocks (a shared module) starts a new
   block ``name@1``. All blocks before the first layer merge into one
   embedding block. If a value flows from a later block to an earlier one, the
   blocks in between merge, so blocks are contiguous in topological order.

Cuts between consecutive blocks list the activations that cross. Weights
(tied ones are in ``tied_weights``), graph inputs (``late_inputs``) and values
computed only from graph inputs and buffers (``derived_inputs``: masks, position
ids, rotary tables, which a stage recomputes) are not sent p2p and are not cut
tensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import operator
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx
from torch import nn

from tripar.errors import CaptureError
from tripar.graph.annotate import NodeInfo, annotate, node_module
from tripar.graph.capture import capture
from tripar.graph.proxy import Block, Cut, ProxyGraph, TensorInfo

LOSS_BLOCK = "loss"


@dataclass(frozen=True, slots=True)
class BlockPartition:
    """Nodes grouped into blocks, contiguous in topological order."""

    names: tuple[str, ...]
    """Block names in order."""
    prefixes: tuple[str, ...]
    """Module FQN prefix of each block (node targets are named relative to it)."""
    nodes: tuple[tuple[str, ...], ...]
    """FX node names of each block, in graph order."""
    layer: tuple[bool, ...]
    """Whether each block is a child of a repeated container."""

    def node_block(self) -> dict[str, str]:
        """FX node name -> block name."""
        return {n: name for name, nodes in zip(self.names, self.nodes) for n in nodes}


def _container_keys(fqns: set[str]) -> tuple[set[str], set[str]]:
    """(containers, ancestors of containers including themselves)."""
    containers: set[str] = set()
    for fqn in fqns:
        parts = fqn.split(".") if fqn else []
        for i, part in enumerate(parts):
            if part.isdigit():
                containers.add(".".join(parts[:i]))
                break
    ancestors: set[str] = set()
    for container in containers:
        parts = container.split(".") if container else []
        for i in range(len(parts) + 1):
            ancestors.add(".".join(parts[:i]))
    return containers, ancestors


def _block_key(fqn: str, ancestors: set[str]) -> tuple[str, bool] | None:
    if not fqn:
        return None
    parts = fqn.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if parts[i - 1].isdigit():
            return prefix, True
        if prefix not in ancestors:
            return prefix, False
    return None


def partition_blocks(gm: torch.fx.GraphModule) -> BlockPartition:
    """Group the nodes of ``gm`` into blocks (see the module docstring for the rules).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> part = partition_blocks(torch.fx.symbolic_trace(model))
    >>> part.names, part.nodes
    (('0', '1', '2'), (('_0',), ('_1',), ('_2',)))
    """
    nodes = list(gm.graph.nodes)
    fqn = {n.name: node_module(n) for n in nodes if n.op not in ("placeholder", "output",
                                                                   "get_attr")}
    _, ancestors = _container_keys(set(fqn.values()))
    order: list[list[str]] = []  # blocks in order: node lists
    keys: list[tuple[str, bool]] = []
    closed: dict[str, int] = defaultdict(int)
    pending: list[str] = []
    last_keyed = max((i for i, n in enumerate(nodes) if n.name in fqn
                      and _block_key(fqn[n.name], ancestors)), default=-1)
    trailing: list[str] = []
    for i, node in enumerate(nodes):
        if node.name not in fqn:
            continue
        key = _block_key(fqn[node.name], ancestors)
        if key is None:
            if i > last_keyed:
                trailing.append(node.name)
            elif order:
                order[-1].append(node.name)
            else:
                pending.append(node.name)
            continue
        if keys and keys[-1][0] == key[0]:
            order[-1].append(node.name)
            continue
        if keys:
            closed[keys[-1][0]] += 1
        order.append([])
        keys.append(key)
        order[-1].append(node.name)
    if not order:
        if not trailing:
            raise CaptureError("the captured graph has no operations to group into blocks")
        order, keys, trailing = [trailing], [(LOSS_BLOCK, False)], []
    order[0][:0] = pending
    if trailing:
        order.append(trailing)
        keys.append((LOSS_BLOCK, False))
    # names: a key seen again after other blocks gets '@k'
    names, seen = [], defaultdict(int)
    for key, _ in keys:
        names.append(key if seen[key] == 0 else f"{key}@{seen[key]}")
        seen[key] += 1
    prefixes = [key for key, _ in keys]
    is_layer = [layer for _, layer in keys]
    # everything before the first layer is the embedding block
    if any(is_layer):
        first = is_layer.index(True)
        if first > 1:
            merged = [n for block in order[:first] for n in block]
            name = "+".join(names[:first])
            order = [merged] + order[first:]
            names = [name] + names[first:]
            prefixes = [""] + prefixes[first:]
            is_layer = [False] + is_layer[first:]
    order, names, prefixes, is_layer = _make_contiguous(gm, order, names, prefixes, is_layer)
    # weights join the block of their first user
    index_of = {n: b for b, block in enumerate(order) for n in block}
    for node in nodes:
        if node.op == "get_attr" and node.users:
            users = [index_of[u.name] for u in node.users if u.name in index_of]
            if users:
                order[min(users)].append(node.name)
    position = {n.name: i for i, n in enumerate(nodes)}
    return BlockPartition(
        names=tuple(names),
        prefixes=tuple(prefixes),
        nodes=tuple(tuple(sorted(block, key=position.__getitem__)) for block in order),
        layer=tuple(is_layer),
    )


def _make_contiguous(gm: torch.fx.GraphModule, order: list[list[str]], names: list[str],
                     prefixes: list[str], is_layer: list[bool]) -> tuple[list, list, list, list]:
    """Merge blocks until no value flows from a later block to an earlier one."""
    while True:
        index_of = {n: b for b, block in enumerate(order) for n in block}
        bad = None
        for node in gm.graph.nodes:
            if node.name not in index_of:
                continue
            for user in node.users:
                if user.name in index_of and index_of[user.name] < index_of[node.name]:
                    bad = (index_of[user.name], index_of[node.name])
                    break
            if bad:
                break
        if bad is None:
            return order, names, prefixes, is_layer
        lo, hi = bad
        merged = [n for block in order[lo:hi + 1] for n in block]
        order = order[:lo] + [merged] + order[hi + 1:]
        names = names[:lo] + ["+".join(names[lo:hi + 1])] + names[hi + 1:]
        prefixes = prefixes[:lo] + [""] + prefixes[hi + 1:]
        is_layer = is_layer[:lo] + [False] + is_layer[hi + 1:]


# -- structural keys -----------------------------------------------------------------


def _target_text(node: torch.fx.Node, prefix: str) -> str:
    target = node.target
    if node.op in ("call_module", "get_attr"):
        text = str(target)
        if prefix and text.startswith(prefix + "."):
            return "~" + text[len(prefix):]
        return text
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__qualname__', None) or str(target)}"


def _normalise(value: Any, local: dict[str, int], external: dict[str, int]) -> Any:
    if isinstance(value, torch.fx.Node):
        if value.name in local:
            return ("L", local[value.name])
        external.setdefault(value.name, len(external))
        return ("X", external[value.name])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_normalise(v, local, external) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _normalise(v, local, external)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _normalise((value.start, value.stop, value.step), local, external))
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(value)
    return repr(value)


def _module_text(module: nn.Module) -> str:
    tensors = [(n, tuple(t.shape), str(t.dtype), t.requires_grad)
               for n, t in module.named_parameters(recurse=True)]
    tensors += [(n, tuple(t.shape), str(t.dtype)) for n, t in module.named_buffers()]
    return f"{type(module).__qualname__}({module.extra_repr()}){tensors}"


def structural_key(gm: torch.fx.GraphModule, nodes: Sequence[str], prefix: str) -> tuple:
    """What a block computes, independent of its position: ops, targets relative to
    ``prefix``, argument structure, module settings and weight shapes.

    Returns ``(key, external_inputs)`` where ``external_inputs`` names the values the
    block reads from outside, in the order ``key`` refers to them.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    local = {name: i for i, name in enumerate(nodes)}
    external: dict[str, int] = {}
    parts = []
    for name in nodes:
        node = by_name[name]
        extra: Any = None
        if node.op == "call_module":
            extra = _module_text(gm.get_submodule(str(node.target)))
        elif node.op == "get_attr":
            value = gm
            for atom in str(node.target).split("."):
                value = getattr(value, atom)
            if isinstance(value, torch.Tensor):
                extra = (tuple(value.shape), str(value.dtype), value.requires_grad)
            else:
                extra = type(value).__name__
        parts.append((node.op, _target_text(node, prefix),
                      _normalise(node.args, local, external),
                      _normalise(node.kwargs, local, external), extra))
    return tuple(parts), tuple(external)


# -- the proxy graph ------------------------------------------------------------------


def _info(node: torch.fx.Node) -> NodeInfo:
    info = node.meta.get("tripar")
    if info is None:
        raise CaptureError(f"node {node.name} has no annotation; run tripar.graph.annotate first")
    return info


def is_operator(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a tensor operator (``Block.ops``): a call that produces a tensor,
    other than taking an item of a tuple (annotated nodes only).

    >>> gm = torch.fx.symbolic_trace(lambda x: x.relu().split(1)[0] + x.dim())
    >>> from tripar.graph.annotate import annotate
    >>> annotate(gm, (torch.ones(2, 2),))
    >>> [n.name for n in gm.graph.nodes if is_operator(n)]
    ['relu', 'split', 'add']
    """
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    if node.target is operator.getitem:
        return False
    return bool(_info(node).shapes)


def _tensor_info(node: torch.fx.Node) -> TensorInfo:
    info = _info(node)
    shape = info.shapes[0] if len(info.shapes) == 1 else tuple(d for s in info.shapes for d in s)
    dtype = info.dtypes[0] if info.dtypes else ""
    return TensorInfo(node=node.name, shape=shape, dtype=dtype, bytes=info.output_bytes)


def _block_kind(gm: torch.fx.GraphModule, part: BlockPartition, index: int,
                infos: list[NodeInfo], first_layer: int, last_layer: int) -> str:
    name = part.names[index]
    if part.layer[index]:
        return "layer"
    if name == LOSS_BLOCK and index == len(part.names) - 1:
        return "loss" if any(s == () for i in infos for s in i.shapes[:1]) else "other"
    if first_layer >= 0 and index < first_layer:
        return "embedding"
    if any(i.matmuls for i in infos):
        return "head" if (first_layer < 0 or index > last_layer) else "other"
    by_name = {n.name: n for n in gm.graph.nodes}
    texts = [_target_text(by_name[n], "").lower() for n in part.nodes[index]]
    texts += [type(gm.get_submodule(str(by_name[n].target))).__name__.lower()
              for n in part.nodes[index] if by_name[n].op == "call_module"]
    if any("norm" in text for text in texts):
        return "norm"
    if first_layer < 0 and index == 0:
        return "embedding"
    return "other"


def _signature(gm: torch.fx.GraphModule, part: BlockPartition, index: int) -> str:
    key, external = structural_key(gm, part.nodes[index], part.prefixes[index])
    by_name = {n.name: n for n in gm.graph.nodes}
    shapes = tuple((_info(by_name[n]).shapes, _info(by_name[n]).dtypes)
                   for n in part.nodes[index])
    inputs = tuple((_info(by_name[n]).shapes, _info(by_name[n]).dtypes) for n in external)
    return hashlib.sha1(repr((key, shapes, inputs)).encode()).hexdigest()[:12]


def build_proxy_graph(
    gm: torch.fx.GraphModule,
    *,
    batch_size: int,
    seq_len: int,
    model_config: dict | None = None,
    tp_degrees: Sequence[int] = (2, 4, 8),
) -> ProxyGraph:
    """Blocks, cuts, skips, late inputs and tied weights of an annotated graph.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = torch.fx.symbolic_trace(model)
    >>> annotate(gm, (torch.empty(3, 4),))
    >>> pg = build_proxy_graph(gm, batch_size=3, seq_len=1)
    >>> [(b.name, b.params, b.forward_flops) for b in pg.blocks]
    [('0', 40, 192), ('1', 0, 0), ('2', 18, 96)]
    >>> [(c.after, [t.shape for t in c.tensors]) for c in pg.cuts]
    [('0', [(3, 8)]), ('1', [(3, 8)])]
    """
    part = partition_blocks(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    index_of = {n: b for b, block in enumerate(part.nodes) for n in block}
    derived = _derived_inputs_set(gm)
    weights = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    first_layer = part.layer.index(True) if any(part.layer) else -1
    last_layer = len(part.layer) - 1 - part.layer[::-1].index(True) if any(part.layer) else -1

    def consumers(node: torch.fx.Node) -> list[int]:
        return sorted({index_of[u.name] for u in node.users if u.name in index_of})

    # values that cross block boundaries
    crossings: dict[int, list[TensorInfo]] = defaultdict(list)
    edges: dict[tuple[str, str], list[TensorInfo]] = defaultdict(list)
    skips: set[tuple[str, str]] = set()
    late_inputs: list[tuple[str, str]] = []
    derived_inputs: list[tuple[str, str]] = []
    input_bytes = [0] * len(part.names)
    output_bytes = [0] * len(part.names)
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        users = consumers(node)
        if node.op == "placeholder":
            later = [u for u in users if u > 0]
            if later:
                late_inputs.append((node.name, part.names[later[0]]))
            for u in users:
                input_bytes[u] += _info(node).output_bytes
            continue
        home = index_of.get(node.name)
        if home is None or node.name in weights:
            continue
        later = [u for u in users if u > home]
        if not later:
            if any(u.op == "output" for u in node.users):
                output_bytes[home] += _info(node).output_bytes
            continue
        tensor = _tensor_info(node)
        output_bytes[home] += tensor.bytes
        for u in later:
            input_bytes[u] += tensor.bytes
        if node.name in derived:
            derived_inputs.append((node.name, part.names[later[0]]))
            continue
        for cut in range(home, later[-1]):
            crossings[cut].append(tensor)
        for u in later:
            edges[(part.names[home], part.names[u])].append(tensor)
            if u > home + 1:
                skips.add((part.names[home], part.names[u]))

    blocks = []
    for b, name in enumerate(part.names):
        infos = [_info(nodes[n]) for n in part.nodes[b]]
        blocks.append(Block(
            name=name,
            index=b,
            kind=_block_kind(gm, part, b, infos, first_layer, last_layer),
            nodes=part.nodes[b],
            params=sum(i.params for i in infos),
            param_bytes=sum(i.param_bytes for i in infos),
            forward_flops=sum(i.forward_flops for i in infos),
            backward_flops=sum(i.backward_flops for i in infos),
            saved_bytes=sum(i.saved_bytes for i in infos),
            input_bytes=input_bytes[b],
            output_bytes=output_bytes[b],
            signature=_signature(gm, part, b),
            matmuls=tuple(m for i in infos for m in i.matmuls),
            param_names=tuple(p for i in infos for p in i.param_names),
            ops=sum(1 for n in part.nodes[b] if is_operator(nodes[n])),
        ))
    cuts = [Cut(after=part.names[b], tensors=tuple(crossings[b]),
                bytes=sum(t.bytes for t in crossings[b])) for b in range(len(part.names) - 1)]
    graph = nx.DiGraph()
    for block in blocks:
        graph.add_node(block.name, index=block.index, kind=block.kind)
    for (src, dst), tensors in edges.items():
        graph.add_edge(src, dst, bytes=sum(t.bytes for t in tensors), tensors=tuple(tensors))
    tracer = gm.meta.get("tripar_tracer", "fx")
    proxy = ProxyGraph(
        blocks=blocks,
        cuts=cuts,
        graph=graph,
        tracer=tracer,
        tracer_reason=gm.meta.get("tripar_tracer_reason", ""),
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=_dominant_dtype(gm),
        skips=sorted(skips, key=lambda s: (graph.nodes[s[0]]["index"],
                                           graph.nodes[s[1]]["index"])),
        late_inputs=late_inputs,
        tied_weights=_tied_weights(gm, index_of),
        model_config=dict(model_config or {}),
        derived_inputs=derived_inputs,
    )
    if importlib.util.find_spec("tripar.graph.tp_regions") is not None:
        from tripar.graph.tp_regions import find_tp_regions

        regions, unproven = find_tp_regions(gm, part.node_block(), degrees=tuple(tp_degrees))
        proxy.tp_regions = list(regions)
        proxy.unproven = list(unproven)
    return proxy


def _derived_inputs_set(gm: torch.fx.GraphModule) -> set[str]:
    """Nodes computed only from graph inputs, buffers and constants (no trainable weight)."""
    derived: set[str] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        info = _info(node)
        if info.reads_params:
            continue
        if node.op == "get_attr":
            derived.add(node.name)  # a buffer or constant
            continue
        # inputs that are not tensors (a size, a dtype) are metadata, not data
        if all(i.op == "placeholder" or i.name in derived or not _info(i).shapes
               for i in node.all_input_nodes):
            derived.add(node.name)
    return derived


def _tied_weights(gm: torch.fx.GraphModule, index_of: dict[str, int]) -> list[tuple[str, ...]]:
    """Names sharing one parameter, and parameters read by more than one block."""
    names: dict[int, list[str]] = defaultdict(list)
    params: dict[int, nn.Parameter] = {}
    for fqn, param in gm.named_parameters(remove_duplicate=False):
        names[id(param)].append(fqn)
        params[id(param)] = param
    readers: dict[int, set[int]] = defaultdict(set)
    for node in gm.graph.nodes:
        if node.name not in index_of:
            continue
        if node.op == "get_attr":
            value: Any = gm
            for atom in str(node.target).split("."):
                value = getattr(value, atom)
            found = [value] if isinstance(value, nn.Parameter) else []
            blocks = {index_of[u.name] for u in node.users if u.name in index_of}
        elif node.op == "call_module":
            found = list(gm.get_submodule(str(node.target)).parameters())
            blocks = {index_of[node.name]}
        else:
            continue
        for param in found:
            readers[id(param)] |= blocks
    groups = []
    for key, fqns in names.items():
        if len(fqns) > 1 or len(readers.get(key, ())) > 1:
            groups.append(tuple(fqns))
    return groups


def _dominant_dtype(gm: torch.fx.GraphModule) -> str:
    by_dtype: dict[str, int] = defaultdict(int)
    for param in gm.parameters():
        by_dtype[str(param.dtype).removeprefix("torch.")] += param.numel()
    return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else "float32"


def _infer_sizes(example_inputs: Sequence[Any], example_kwargs: dict) -> tuple[int, int]:
    tensors = [t for t in list(example_inputs) + list(example_kwargs.values())
               if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not tensors:
        return 1, 1
    first = tensors[0]
    return int(first.shape[0]), int(first.shape[1]) if first.dim() >= 2 else 1


def analyze(
    model: nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict | None = None,
    *,
    leaf_modules: Sequence[type | str] = (),
    method: str = "auto",
    model_config: dict | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    tp_degrees: Sequence[int] = (2, 4, 8),
) -> ProxyGraph:
    """capture -> annotate -> build: the proxy graph of ``model`` for the example batch.

    ``batch_size`` and ``seq_len`` default to the first two dims of the first
    tensor input (``seq_len`` 1 when it has one dim).

    >>> import torch
    >>> with torch.device("meta"):
    ...     model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    >>> pg = analyze(model, (torch.empty(2, 4, device="meta"),))
    >>> pg.tracer, [b.name for b in pg.blocks], pg.batch_size
    ('fx', ['0', '1'], 2)
    """
    kwargs = dict(example_kwargs or {})
    gm = capture(model, example_inputs, kwargs, leaf_modules=leaf_modules, method=method)
    annotate(gm, example_inputs, kwargs)
    inferred_batch, inferred_seq = _infer_sizes(example_inputs, kwargs)
    return build_proxy_graph(
        gm,
        batch_size=inferred_batch if batch_size is None else batch_size,
        seq_len=inferred_seq if seq_len is None else seq_len,
        model_config=model_config,
        tp_degrees=tp_degrees,
    )
