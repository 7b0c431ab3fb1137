"""Group the nodes of a captured graph into blocks, and say what a block computes.

Grouping (:func:`partition_blocks`) uses only the graph and each node's module
FQN (:func:`node_module`), so it runs before annotation too:

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

:func:`structural_key` describes what a block computes independently of its
position; blocks with equal keys (and equal input shapes) are repeats of one
another: annotate measures one of them, and the proxy graph gives them one
signature.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from tripar.errors import CaptureError


def node_module(node: torch.fx.Node) -> str:
    """FQN of the innermost module ``node`` was traced in (``""`` at the root).

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    >>> [node_module(n) for n in gm.graph.nodes]
    ['', '0', '']
    """
    stack = node.meta.get("nn_module_stack")
    if stack:
        fqn = list(stack.values())[-1][0]
        return _clean_fqn(str(fqn))
    if node.op == "call_module":
        return str(node.target)
    return ""


def _clean_fqn(fqn: str) -> str:
    """Export may spell paths as ``L['self'].blocks[0].attn``; make that ``blocks.0.attn``."""
    if "[" not in fqn and not fqn.startswith("L"):
        return fqn
    text = fqn.replace("L['self']", "").replace("['", ".").replace("']", "")
    text = text.replace("[", ".").replace("]", "")
    return text.strip(".")


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


# -- what a block computes -----------------------------------------------------------


def target_text(node: torch.fx.Node, prefix: str) -> str:
    """The node's target as text: a module or attribute path under ``prefix`` as ``~.rest``,
    a function as ``module.qualname``."""
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
        parts.append((node.op, target_text(node, prefix),
                      _normalise(node.args, local, external),
                      _normalise(node.kwargs, local, external), extra))
    return tuple(parts), tuple(external)
