"""Split one stage's backward into B (input gradients) and W (weight gradients only).

Zero-bubble schedules run a stage's backward in two actions: ``B`` computes the
gradient of the stage inputs (the next stage back waits on it), ``W`` the gradient
of the stage's parameters later, in a bubble. ``backward_input`` is B,
``backward_weight`` is W; together they do the work of one backward, each
operation once.

The autograd graph of a stage, seen from its outputs, falls into two parts:

- the *activation path*: nodes from which a stage input is reachable. B runs
  exactly these (``torch.autograd.grad`` w.r.t. the inputs).
- the *weight side*: the other nodes from which a parameter is reachable (the
  parameters' ``AccumulateGrad``, ``t()`` of a weight, a bias' reduction...).

A *frontier* node is an activation-path node with an edge into the weight side: a
linear layer's ``addmm`` sends ``dx`` down the activation path and ``dW``, ``db`` to
the weight side. B registers a pre-hook on every frontier node and keeps the
gradient flowing into it. W then starts the autograd engine at the frontier nodes
with those gradients, asking only for the parameters: the engine recomputes each
frontier node's weight-side outputs (autograd functions compute just the outputs
that are asked for, so ``addmm`` makes ``dW``, ``db`` and not ``dx`` again) and
runs the weight side. Outputs that depend on no input at all (stage 0's embedding)
are weight side from the start: W backpropagates them whole.

W runs one engine call per *group*: a connected piece of the weight side with the
frontier nodes that feed it (one linear layer's ``addmm`` with its weight and bias,
one layer norm...). A single call for all groups would also run the activation path
between two frontier nodes, which is B's work again. Groups share no weight-side
node, so every parameter's ``AccumulateGrad`` (and its post-accumulate hooks, which
``DataParallel`` counts) runs once per W, as in one backward. Inside a group the
engine may still pass through activation-path nodes between two of its frontier
nodes (one parameter used at two depths, e.g. a layer applied twice); each frontier
node's input is pinned to what B saw by a pre-hook, so the gradients stay exact and
only that stretch is computed twice. ``WeightGradients.repeated`` counts such groups.

Order. Nodes and groups are kept in dicts and lists filled by a breadth-first walk
from the outputs, never in sets, so every tensor-parallel rank (same code, same
graph) runs its groups, and any collective inside them, in the same order.

Memory. Between B and W the stage's graph below the frontier stays alive (B runs
with ``retain_graph=True``, as it must: W needs the frontier nodes' saved tensors),
plus one gradient per frontier node. The outputs are not kept, so the part of the
graph above the topmost frontier node goes when the caller drops them. W frees each
group's saved tensors as it runs it (all at its end when a group is ``repeated``) and
releases everything it holds when it ends.

Cost. FLOPs: B + W equal one backward. Time: W makes one engine call per group, and
each call walks the graph below its frontier nodes to set up, so B + W carry a fixed
overhead per group on top of one backward (0.15 ms for a one-layer graph to 0.5 ms
for a 64-layer one per call, measured on a busy 2-core CPU);
``torch.distributed.pipelining`` splits the same way and pays the same.

Hooks. A tensor pre-hook on a frontier node's input runs in B and again in W (the
pinning pre-hook runs after it, so W's value is B's), a node post-hook on a frontier
node runs twice; hooks on parameters and on weight-side tensors run once, in W.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

__all__ = ["WeightGradients", "backward_input", "backward_weight"]


@dataclass(slots=True, eq=False)
class _Group:
    """One connected piece of the weight side and the frontier nodes feeding it."""

    frontier: list[Node] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)
    roots: list[tuple[GradientEdge, torch.Tensor]] = field(default_factory=list)
    """Stage outputs whose node is on the weight side, with their gradients."""
    repeated: bool = False
    """Two frontier nodes of the group are linked by the activation path."""


@dataclass(slots=True, eq=False)
class WeightGradients:
    """What B leaves for W: the groups and the gradients captured at frontier nodes."""

    groups: list[_Group]
    captured: dict[Node, tuple[torch.Tensor | None, ...]] = field(default_factory=dict)
    done: bool = False

    @property
    def pending(self) -> bool:
        """W still has work to do (False for a stage without trainable parameters)."""
        return not self.done and bool(self.groups)

    @property
    def repeated(self) -> int:
        """Groups whose W passes through activation-path nodes again (see the module doc)."""
        return sum(g.repeated for g in self.groups)

    @property
    def frontier_nodes(self) -> int:
        return sum(len(g.frontier) for g in self.groups)

    def release(self) -> None:
        """Drop the graph nodes and gradients (W calls this; so may an aborted step)."""
        self.groups, self.captured, self.done = [], {}, True


def backward_input(
    outputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor | None],
    inputs: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
) -> tuple[tuple[torch.Tensor | None, ...], WeightGradients]:
    """B: the gradients of ``inputs`` (None where an input got none), and what W needs.

    ``outputs`` are the stage's outputs that require grad, ``output_grads`` their
    gradients (None for a scalar loss: 1). ``params`` are the stage's trainable
    parameters; ``backward_weight`` later accumulates their gradients in ``.grad``.
    Parameter gradients are not touched here.

    >>> lin = torch.nn.Linear(3, 2)
    >>> x = torch.randn(4, 3, requires_grad=True)
    >>> (dx,), work = backward_input([lin(x).sum()], [None], [x], list(lin.parameters()))
    >>> lin.weight.grad is None, work.frontier_nodes
    (True, 1)
    >>> backward_weight(work)
    >>> torch.allclose(lin.weight.grad, x.sum(0).expand(2, 3)), lin.bias.grad.tolist()
    (True, [4.0, 4.0])
    >>> torch.allclose(dx, lin.weight.sum(0).expand(4, 3))
    True
    """
    roots: list[tuple[Node, GradientEdge, torch.Tensor]] = []
    for out, grad in zip(outputs, output_grads, strict=True):
        if not out.requires_grad:
            continue
        edge = get_gradient_edge(out)
        roots.append((edge.node, edge, torch.ones_like(out) if grad is None else grad))
    wanted = [t for t in inputs if t.requires_grad]
    trainable = [p for p in params if p.requires_grad]
    if not wanted:  # nothing on the activation path (a first stage): W is the whole backward
        group = _Group(params=trainable, roots=[(edge, grad) for _, edge, grad in roots])
        return (None,) * len(inputs), WeightGradients([group] if roots and trainable else [])
    graph = _Graph([node for node, _, _ in roots])
    active = graph.ancestors([graph.node_of(t) for t in wanted], stop=None)
    param_nodes = {graph.node_of(p): p for p in trainable}
    param_nodes.pop(None, None)
    groups, weight_side = graph.weight_groups(active, param_nodes)
    by_node = {node: group for group in groups for node in group.frontier}
    for node, edge, grad in roots:
        if node not in active and node in weight_side:
            weight_side[node].roots.append((edge, grad))
    work = WeightGradients([g for g in groups if g.params])
    in_grads: tuple[torch.Tensor | None, ...] = (None,) * len(wanted)
    live = [(edge, grad) for node, edge, grad in roots if node in active]
    if live:
        handles = [node.register_prehook(_keep(work.captured, node)) for node in by_node]
        try:
            in_grads = torch.autograd.grad([e for e, _ in live], wanted, [g for _, g in live],
                                           retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
    missing = [node.name() for node in by_node if node not in work.captured]
    assert not missing, f"B did not run frontier nodes {missing} of the activation path"
    grads = iter(in_grads)
    return tuple(next(grads) if t.requires_grad else None for t in inputs), work


def backward_weight(work: WeightGradients) -> None:
    """W: accumulate the parameters' gradients in ``.grad`` from what B captured, then
    release the graph and the gradients ``work`` holds. Running it twice is an error."""
    if work.done:
        raise RuntimeError("backward_weight ran twice for one backward_input")
    # a group's call may pass through another group's frontier nodes only when some group
    # is ``repeated``; otherwise each call can free the saved tensors of what it ran
    retain = work.repeated > 0
    try:
        for group in work.groups:
            edges: list[GradientEdge] = []
            grads: list[torch.Tensor] = []
            handles = []
            for node in group.frontier:
                seen = work.captured[node]
                handles.append(node.register_prehook(_pin(seen)))
                for i, g in enumerate(seen):
                    if g is not None:
                        edges.append(GradientEdge(node, i))
                        grads.append(g)
            for edge, g in group.roots:
                edges.append(edge)
                grads.append(g)
            try:
                if edges:
                    torch.autograd.backward(edges, grads, retain_graph=retain,
                                            inputs=group.params)
            finally:
                for h in handles:
                    h.remove()
    finally:
        work.release()


# ---- graph analysis ---------------------------------------------------------------------------

def _keep(store: dict, node: Node):
    def hook(grads: tuple) -> None:
        store[node] = tuple(grads)
    return hook


def _pin(seen: tuple):
    def hook(_grads: tuple) -> tuple:
        return seen
    return hook


class _Graph:
    """The autograd graph below some root nodes, with its reverse edges (walk order kept)."""

    def __init__(self, roots: Sequence[Node]) -> None:
        self.parents: dict[Node, list[Node]] = {}
        self.order: dict[Node, int] = {}
        self.leaves: dict[int, Node] = {}
        """id of a leaf tensor -> its ``AccumulateGrad`` node (found without ``view_as``)."""
        queue = []
        for node in roots:
            if node not in self.order:
                self.order[node] = len(self.order)
                self.parents[node] = []
                queue.append(node)
        i = 0
        while i < len(queue):
            node = queue[i]
            i += 1
            edges = node.next_functions
            if not edges:
                leaf = getattr(node, "variable", None)
                if leaf is not None:
                    self.leaves[id(leaf)] = node
            for child, _ in edges:
                if child is None:
                    continue
                if child not in self.order:
                    self.order[child] = len(self.order)
                    self.parents[child] = []
                    queue.append(child)
                self.parents[child].append(node)

    def node_of(self, t: torch.Tensor) -> Node | None:
        """The node ``t``'s gradient flows into, if it is in the graph."""
        return t.grad_fn if t.grad_fn is not None else self.leaves.get(id(t))

    def ancestors(self, seeds: Sequence[Node | None], stop: dict | None) -> dict[Node, None]:
        """``seeds`` in the graph and every node above them (from which one is reachable)."""
        found: dict[Node, None] = {}
        queue = [n for n in seeds if n is not None and n in self.order]
        for n in queue:
            found[n] = None
        i = 0
        while i < len(queue):
            for parent in self.parents[queue[i]]:
                if parent not in found and (stop is None or parent not in stop):
                    found[parent] = None
                    queue.append(parent)
            i += 1
        return found

    def weight_groups(self, active: dict[Node, None], param_nodes: dict[Node, torch.Tensor]
                      ) -> tuple[list[_Group], dict[Node, _Group]]:
        """Group the weight side (nodes above a parameter, off the activation path) into
        connected pieces, each with its frontier nodes and parameters, in walk order.
        Also returns each weight-side node's group."""
        owner: dict[Node, Node] = {}  # union-find over weight-side and frontier nodes

        def find(n: Node) -> Node:
            while owner[n] is not n:
                owner[n] = owner[owner[n]]
                n = owner[n]
            return n

        def union(a: Node, b: Node) -> None:
            ra, rb = find(a), find(b)
            if ra is not rb:
                if self.order[ra] > self.order[rb]:
                    ra, rb = rb, ra
                owner[rb] = ra

        seeds = sorted((n for n in param_nodes if n in self.order), key=self.order.__getitem__)
        side = self.ancestors(seeds, stop=active)
        frontier: dict[Node, None] = {}
        for node in side:
            owner.setdefault(node, node)
        for node in side:
            for parent in self.parents[node]:
                if parent in active:
                    frontier[parent] = None
                    owner.setdefault(parent, parent)
                union(parent, node)
        groups: dict[Node, _Group] = {}
        weight_side: dict[Node, _Group] = {}
        members = sorted([*side, *frontier], key=self.order.__getitem__)
        for node in members:
            group = groups.setdefault(find(node), _Group())
            if node in frontier:
                group.frontier.append(node)
            else:
                weight_side[node] = group
                if node in param_nodes:
                    group.params.append(param_nodes[node])
        ordered = sorted(groups.items(), key=lambda kv: self.order[kv[0]])
        for _, group in ordered:
            group.repeated = self._linked(group.frontier, active)
        return [g for _, g in ordered], weight_side

    def _linked(self, frontier: list[Node], active: dict[Node, None]) -> bool:
        """Whether one of ``frontier`` reaches another through the activation path."""
        if len(frontier) < 2:
            return False
        targets = dict.fromkeys(frontier)
        for start in frontier:
            seen: dict[Node, None] = {}
            queue = [c for c, _ in start.next_functions if c is not None and c in active]
            while queue:
                node = queue.pop()
                if node in targets:
                    return True
                if node in seen:
                    continue
                seen[node] = None
                queue.extend(c for c, _ in node.next_functions if c is not None and c in active)
        return False
