"""Build the :class:`ProxyGraph` of an annotated graph from its blocks
(:func:`tripar.graph.blocks.partition_blocks`).

Cuts between consecutive blocks list the activations that cross. Weights
(tied ones are in ``tied_weights``), graph inputs (``late_inputs``) and values
computed only from graph inputs and buffers (``derived_inputs``: masks, position
ids, rotary tables, which a stage recomputes) are not sent p2p and are not cut
tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import operator
from collections import defaultdict
from collections.abc import Sequence

import networkx as nx
import torch
import torch.fx

from tripar.errors import CaptureError
from tripar.graph.annotate import NodeInfo
from tripar.graph.blocks import (
    LOSS_BLOCK,
    BlockPartition,
    partition_blocks,
    structural_key,
    target_text,
)
from tripar.graph.params import canonical_names, param_groups, read_params
from tripar.graph.proxy import Block, Cut, ProxyGraph, TensorInfo, TPRegion
from tripar.graph.selective import select_segments
from tripar.graph.sequence import sequence_zone, token_wise_nodes


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
    texts = [target_text(by_name[n], "").lower() for n in part.nodes[index]]
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
    >>> from tripar.graph.annotate import annotate
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
        selected = select_segments(gm, part.nodes[b], input_bytes[b])
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
            autocast_saved_bytes=(-1 if any(i.autocast_saved_bytes < 0 for i in infos)
                                  else sum(i.autocast_saved_bytes for i in infos)),
            input_bytes=input_bytes[b],
            output_bytes=output_bytes[b],
            signature=_signature(gm, part, b),
            matmuls=tuple(m for i in infos for m in i.matmuls),
            param_names=tuple(p for i in infos for p in i.param_names),
            ops=sum(1 for n in part.nodes[b] if is_operator(nodes[n])),
            selective_nodes=selected.nodes,
            selective_bytes=selected.freed_bytes,
            selective_flops=selected.forward_flops,
            selective_ops=selected.ops,
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
        sequence = _sequence_saved(gm, regions, seq_len, index_of, len(blocks))
        proxy.blocks = [dataclasses.replace(b, sequence_saved_bytes=sequence[b.index])
                        if sequence[b.index] else b for b in blocks]
    return proxy


def _sequence_saved(gm: torch.fx.GraphModule, regions: Sequence[TPRegion], seq_len: int,
                    index_of: dict[str, int], blocks: int) -> list[int]:
    """Per block, the bytes its nodes on the sequence shard save (sequence parallelism with
    every region sharded): the token-wise nodes that read a region's output, and so on,
    and a zone value whose region readers are all column-parallel linears (they keep its
    shard, gathering it again in the backward)."""
    out = [0] * blocks
    if not regions or seq_len < 2:
        return out
    values = {n.name: n.meta.get("val") for n in gm.graph.nodes}
    inside = {n for r in regions for n in r.nodes}
    seeds = [n for r in regions for n in r.row]
    token_wise = token_wise_nodes(gm, values, seq_len=seq_len, skip=inside)
    nodes = {n.name: n for n in gm.graph.nodes}
    column = {n for r in regions for n in r.column}
    for name in sequence_zone(gm, token_wise, seeds, inside):
        if name in inside or name not in index_of:
            continue
        out[index_of[name]] += _info(nodes[name]).saved_bytes
        readers = [u.name for u in nodes[name].users if u.name in inside]
        value = values.get(name)
        if readers and all(u in column for u in readers) and isinstance(value, torch.Tensor):
            home = index_of.get(readers[0], index_of[name])
            out[home] += value.numel() * value.element_size()
    return out


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
    canon = canonical_names(gm)
    readers: dict[str, set[int]] = defaultdict(set)
    for node in gm.graph.nodes:
        if node.name not in index_of:
            continue
        if node.op == "get_attr":
            blocks = {index_of[u.name] for u in node.users if u.name in index_of}
        elif node.op == "call_module":
            blocks = {index_of[node.name]}
        else:
            continue
        for fqn, _ in read_params(gm, node, canon):
            readers[fqn] |= blocks
    return [group for group in param_groups(gm)
            if len(group) > 1 or len(readers.get(group[0], ())) > 1]


def _dominant_dtype(gm: torch.fx.GraphModule) -> str:
    by_dtype: dict[str, int] = defaultdict(int)
    for param in gm.parameters():
        by_dtype[str(param.dtype).removeprefix("torch.")] += param.numel()
    return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else "float32"
