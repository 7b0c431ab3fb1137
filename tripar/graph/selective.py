"""Selective recomputation: the parts of a block that are cheap to recompute and costly
to keep (Korthikanti et al.'s attention core), found from the annotated graph.

A *segment* is a connected set of a block's nodes that read no parameter and produce
tensors (weights are what make a product costly; what is left is element-wise work and
products of two activations, such as ``q @ k^T`` and ``softmax @ v``). Run under
checkpointing, a segment keeps only its inputs: it frees what its nodes save for the
backward less the bytes of its inputs (which the checkpoint holds), and its backward
first re-runs its forward FLOPs. A segment is *selected* when it frees bytes and its
forward costs at most ``CHEAP`` of the FLOPs per freed byte that recomputing the whole
block costs. Without a fused attention kernel this selects the score, softmax and
dropout path (``5 a s^2 b`` bytes of a layer's ``34 s b h + 5 a s^2 b``); a fused kernel
saves no ``s^2`` term, and its segment, which holds the kernel's FLOPs, is not cheap.
A GELU frees nothing (the next product saves its output), a residual add or dropout
keeps more than it frees.

Everything is read from ``node.meta["tripar"]`` (:func:`tripar.graph.annotate.annotate`):
FLOPs and saved bytes as measured, no operator or module names.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx

CHEAP = 0.5
"""A segment is selected when its forward FLOPs per freed byte are at most this share of
the whole block's (what full recomputation of the block pays per byte it frees)."""

_CALLS = ("call_function", "call_method", "call_module")


@dataclass(frozen=True, slots=True)
class Selection:
    """The selected segments of one block, together."""

    nodes: tuple[str, ...]
    """FX names of the nodes recomputed, in graph order."""
    freed_bytes: int
    """Bytes per annotated batch that recomputing them frees (saved less inputs kept)."""
    forward_flops: int
    """Forward FLOPs the recomputation re-runs."""
    ops: int
    """Tensor operators re-run."""


def _in_place(node: torch.fx.Node) -> bool:
    if node.target is operator.setitem:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = getattr(node.target, "__name__", str(node.target))
    return node.op in ("call_function", "call_method") and name.endswith("_") \
        and not name.endswith("__")


def _reads_weights(node: torch.fx.Node) -> bool:
    """Whether ``node`` reads a parameter: itself (a module call) or through a weight it
    takes as an argument (a ``get_attr`` node of a parameter)."""
    if node.meta["tripar"].reads_params:
        return True
    return any(arg.op == "get_attr" and getattr(arg.meta.get("tripar"), "reads_params", False)
               for arg in node.all_input_nodes)


def _candidate(node: torch.fx.Node) -> bool:
    info = node.meta.get("tripar")
    return (node.op in _CALLS and info is not None and bool(info.shapes)
            and not _reads_weights(node) and not _in_place(node))


def connected_groups(nodes: Sequence[torch.fx.Node]) -> list[list[torch.fx.Node]]:
    """Weakly connected components of ``nodes`` under their data edges, in graph order."""
    parent = {n.name: n.name for n in nodes}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.name in parent:
                parent[root(arg.name)] = root(node.name)
    groups: dict[str, list[torch.fx.Node]] = {}
    for node in nodes:
        groups.setdefault(root(node.name), []).append(node)
    return list(groups.values())


def segment_cost(members: Sequence[torch.fx.Node]) -> tuple[int, int]:
    """(freed bytes, forward FLOPs) of recomputing ``members`` as one checkpointed segment:
    what their nodes save, less the bytes of the activations they read from outside
    (weights and buffers excluded), which the checkpoint keeps."""
    inside = {n.name for n in members}
    saved = sum(n.meta["tripar"].saved_bytes for n in members)
    kept = 0
    seen: set[str] = set()
    for node in members:
        for arg in node.all_input_nodes:
            if arg.name in inside or arg.name in seen or arg.op == "get_attr":
                continue
            seen.add(arg.name)
            info = arg.meta.get("tripar")
            kept += info.output_bytes if info is not None else 0
    return saved - kept, sum(n.meta["tripar"].forward_flops for n in members)


def select_segments(gm: torch.fx.GraphModule, block_nodes: Sequence[str],
                    input_bytes: int) -> Selection:
    """The selected segments of the block made of ``block_nodes`` (FX names, annotated
    graph ``gm``); ``input_bytes`` is what the block keeps when recomputed whole.

    >>> from tripar.graph import capture_model
    >>> from tripar.models import load_model
    >>> loaded = load_model("gpt:layers=1,hidden=32,heads=8,vocab=64,seq=8,attention=eager")
    >>> graph = capture_model(loaded.model, loaded.example_inputs).graph
    >>> layer = graph.blocks[1]
    >>> [n for n in layer.selective_nodes if not n.startswith(("view", "transpose", "get"))]
    ['split', 'matmul', 'mul', 'ones', 'triu', 'masked_fill', 'softmax', 'dropout_1', 'matmul_1', 'contiguous']
    >>> layer.selective_bytes == 8 * 8 * 8 * 4 + 8 * 8  # probabilities (a s^2 b fp32), mask
    True
    """
    names = set(block_nodes)
    members = [n for n in gm.graph.nodes if n.name in names]
    block_saved = sum(n.meta["tripar"].saved_bytes for n in members if "tripar" in n.meta)
    block_flops = sum(n.meta["tripar"].forward_flops for n in members if "tripar" in n.meta)
    full_freed = block_saved - input_bytes
    if full_freed <= 0 or block_flops <= 0:
        return Selection((), 0, 0, 0)
    per_byte = block_flops / full_freed
    chosen: list[torch.fx.Node] = []
    freed = flops = 0
    for segment in connected_groups([n for n in members if _candidate(n)]):
        seg_freed, seg_flops = segment_cost(segment)
        if seg_freed > 0 and seg_flops <= CHEAP * per_byte * seg_freed:
            chosen.extend(segment)
            freed += seg_freed
            flops += seg_flops
    order = {n.name: i for i, n in enumerate(members)}
    chosen.sort(key=lambda n: order[n.name])
    ops = sum(1 for n in chosen if n.target is not operator.getitem)
    return Selection(tuple(n.name for n in chosen), freed, flops, ops)
