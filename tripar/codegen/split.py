"""Split a captured graph into pipeline stages: one GraphModule per (virtual) stage.

The splitter is policy-free (like ``torch/fx/passes/split_module.py``): the
caller says which FX nodes each stage computes, in pipeline order, and
:func:`split_stages` builds the stage programs. Wiring rules:

- A stage's inputs are, in this order, the tensors received from the stage
  before it (``StageProgram.received``, in original graph order of their
  producers), then the graph inputs it reads itself
  (``StageProgram.graph_inputs``, in the original placeholder order). Graph
  inputs consumed late (labels, attention masks) go straight to the stage that
  reads them; they never travel through the pipeline.
- A stage's outputs (``StageProgram.sent``) are every activation a later stage
  needs, so a value that skips stages is forwarded by the stages in between.
  The last stage returns what the original graph returns (the loss).
- Values computed only from graph inputs, buffers and constants (masks,
  position ids, rotary tables; ``derived``) and non-tensor values (sizes) are
  recomputed by each stage that reads them, never sent.
- Weights (``get_attr`` targets and the modules of ``call_module`` nodes) are
  held by every stage that uses them. A parameter held by more than one stage
  (a tied embedding and LM head) is a *replica*: its gradients must be summed
  across those stages (``StageSplit.tied``).

The stage modules reference the weights of the graph they were split from;
:mod:`tripar.codegen.weights` gives a stage its own tensors.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from tripar.codegen.stage import StageProgram, StageSplit, TensorSpec, TiedGroup
from tripar.errors import PlanError
from tripar.graph import (
    baked_devices,
    canonical_names,
    node_values,
    param_groups,
    partition_blocks,
    read_params,
)

# ---- helpers --------------------------------------------------------------------------


def _spec(name: str, value: Any) -> TensorSpec:
    if not isinstance(value, torch.Tensor):
        raise PlanError(f"value {name!r} is a {type(value).__name__}, not a tensor; only "
                        "tensors cross stage boundaries")
    return TensorSpec(tuple(value.shape), value.dtype, name=name)


def propagate_values(gm: torch.fx.GraphModule, flat_inputs: Sequence[Any]) -> dict[str, Any]:
    """Run ``gm`` on fake tensors (no memory, weights may be on meta) and return every
    node's value: fake tensors for tensors, plain Python values otherwise
    (``tripar.graph.node_values``, with the error a split reports)."""
    # a graph exported from a meta-built model with a meta example has device=meta baked
    # in: stay on meta (unless its device constants were retargeted, or a real example
    # baked its own device in too: then they decide, and meta is retargeted)
    baked = baked_devices(gm)
    on_meta = baked == {"meta"} if baked else any(t.device.type == "meta"
                                                  for t in gm.parameters())
    try:
        with torch.enable_grad():
            return node_values(gm, flat_inputs, device="meta" if on_meta else "cpu")
    except Exception as error:  # noqa: BLE001 - reported with the fix
        shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in flat_inputs]
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise PlanError(
            f"the graph does not run on inputs of shapes {shapes}: {type(error).__name__}: "
            f"{first}; a graph from torch.export fixes the batch it was captured with, so "
            "capture the model with a microbatch-sized example") from error


def _is_guard(node: torch.fx.Node) -> bool:
    """``torch.export``'s input-shape guard: checks the example's shapes, returns nothing."""
    return node.op == "call_module" and str(node.target).startswith("_guards_fn")


def _reads_params(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return any(p.requires_grad for _, p in read_params(gm, node))


_RANDOM = ("rand", "randn", "randint", "randperm", "bernoulli", "dropout", "normal", "uniform",
           "multinomial", "native_dropout")


def _is_random(node: torch.fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target)).lower()
    return any(name.startswith(r) or f".{r}" in name for r in _RANDOM)


def derived_nodes(gm: torch.fx.GraphModule) -> set[str]:
    """Nodes computed only from graph inputs, buffers and constants (no trainable weight,
    no random draw): masks, position ids, rotary tables. Each stage recomputes them.

    >>> import torch
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = torch.nn.Linear(2, 2)
    ...     def forward(self, x, mask):
    ...         return self.lin(x) * (mask > 0)
    >>> sorted(derived_nodes(torch.fx.symbolic_trace(M())))
    ['gt']
    """
    derived: set[str] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or _is_guard(node):
            continue
        if _reads_params(gm, node) or _is_random(node):
            continue
        if node.op == "get_attr" or all(i.op == "placeholder" or i.name in derived
                                        for i in node.all_input_nodes):
            derived.add(node.name)
    return derived


# ---- the split ------------------------------------------------------------------------


def _check_assignment(gm: torch.fx.GraphModule, stage_nodes: Sequence[Sequence[str]]
                      ) -> dict[str, int]:
    if not stage_nodes:
        raise PlanError("split_stages needs at least one stage")
    names = {n.name for n in gm.graph.nodes}
    stage_of: dict[str, int] = {}
    for s, nodes in enumerate(stage_nodes):
        for name in nodes:
            if name not in names:
                raise PlanError(f"stage {s} lists node {name!r}, which is not in the graph")
            if name in stage_of and stage_of[name] != s:
                raise PlanError(f"node {name!r} is assigned to stages {stage_of[name]} and {s}; "
                                "give each node to one stage")
            stage_of[name] = s
    missing = [n.name for n in gm.graph.nodes
               if n.op in ("call_function", "call_method", "call_module")
               and n.name not in stage_of and not _is_guard(n)]
    if missing:
        raise PlanError(f"{len(missing)} graph node(s) belong to no stage (first: "
                        f"{missing[:5]}); every compute node must be assigned to a stage")
    return stage_of


def split_stages(
    gm: torch.fx.GraphModule,
    stage_nodes: Sequence[Sequence[str]],
    example_inputs: Sequence[Any],
    *,
    stage_blocks: Sequence[Sequence[str]] | None = None,
    recompute_derived: bool = True,
    values: Mapping[str, Any] | None = None,
) -> StageSplit:
    """Split ``gm`` into one GraphModule per stage; ``stage_nodes[s]`` names the FX nodes
    stage ``s`` computes, stages in pipeline order.

    ``example_inputs`` are the flat graph inputs of one microbatch (real, fake or meta
    tensors; see :func:`flat_graph_inputs`): the shapes recorded for receives are theirs.
    ``values``: ``gm``'s node values on them from an earlier :func:`propagate_values`
    (reused: propagation is most of a split's cost).
    ``get_attr`` nodes need not be assigned (each stage takes the weights it reads).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = torch.fx.symbolic_trace(model)
    >>> split = split_stages(gm, [["_0", "_1"], ["_2"]], [torch.randn(3, 4)])
    >>> [(s.index, [t.name for t in s.received], [t.shape for t in s.sent]) for s in split.stages]
    [(0, [], [(3, 8)]), (1, ['_1'], [])]
    >>> x = torch.randn(3, 4)
    >>> torch.equal(split.stages[1].module(*split.stages[0].module(x)), model(x))
    True
    """
    stage_of = _check_assignment(gm, stage_nodes)
    num = len(stage_nodes)
    if stage_blocks is not None and len(stage_blocks) != num:
        raise PlanError(f"{len(stage_blocks)} block lists for {num} stages")
    if values is None:
        values = propagate_values(gm, example_inputs)
    nodes = list(gm.graph.nodes)
    position = {n.name: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise PlanError(f"the graph has {len(placeholders)} inputs "
                        f"({[p.name for p in placeholders]}), got {len(example_inputs)} values")
    derived = derived_nodes(gm) if recompute_derived else set()
    output_node = next(n for n in reversed(nodes) if n.op == "output")

    # what each stage computes (own + recomputed), receives and reads
    computes: list[set[str]] = [set(n for n in stage if by_name[n].op != "get_attr")
                                for stage in stage_nodes]
    needs: list[set[str]] = [set() for _ in range(num)]  # activations from earlier stages
    reads: list[set[str]] = [set() for _ in range(num)]  # graph inputs
    recomputed: list[set[str]] = [set() for _ in range(num)]

    def resolve(value: torch.fx.Node, s: int, consumer: str) -> None:
        name = value.name
        if name in computes[s]:
            return
        if value.op == "placeholder":
            reads[s].add(name)
            return
        if value.op == "get_attr":
            computes[s].add(name)
            return
        tensor = isinstance(values.get(name), torch.Tensor)
        if not tensor and _reads_params(gm, value):
            raise PlanError(f"node {consumer!r} on stage {s} reads {name!r}, a "
                            f"{type(values.get(name)).__name__} made by a module with weights on "
                            f"stage {stage_of[name]}; only tensors cross stages: cut after the "
                            "tuple is unpacked")
        if name in derived or not tensor:
            computes[s].add(name)
            if stage_of.get(name) != s:
                recomputed[s].add(name)
            for arg in value.all_input_nodes:
                resolve(arg, s, name)
            return
        producer = stage_of[name]
        if producer > s:
            raise PlanError(f"node {consumer!r} on stage {s} reads {name!r}, which stage "
                            f"{producer} computes: stages must follow the graph's data flow; "
                            "assign contiguous node ranges in graph order")
        needs[s].add(name)

    for s in range(num):
        for name in sorted(computes[s], key=position.__getitem__):
            for arg in by_name[name].all_input_nodes:
                resolve(arg, s, name)
    for arg in output_node.all_input_nodes:
        resolve(arg, num - 1, "output")

    # values live across each cut: produced at or before it, needed after it
    live: list[list[str]] = [[] for _ in range(num)]  # live[s]: sent by stage s
    last_need: dict[str, int] = {}
    for s in range(num):
        for name in needs[s]:
            last_need[name] = max(last_need.get(name, -1), s)
    for name in sorted(last_need, key=position.__getitem__):
        for s in range(stage_of[name], last_need[name]):
            live[s].append(name)

    canon = canonical_names(gm)
    tied, holders = _tied_groups(gm, canon, computes, by_name)
    stages = []
    for s in range(num):
        received = live[s - 1] if s else []
        module, params = _build_stage(gm, values, s, num, received, placeholders, reads[s],
                                      computes[s], live[s], output_node, position, by_name)
        replicas = tuple(local for local, _ in params
                         if len(holders.get(canon.get(local, local), ())) > 1)
        gi = [p for p in placeholders if p.name in reads[s]]
        stages.append(StageProgram(
            index=s, num_stages=num, module=module,
            blocks=tuple(stage_blocks[s]) if stage_blocks is not None else (),
            received=tuple(_spec(n, values[n]) for n in received),
            graph_inputs=tuple(_spec(p.name, values[p.name])
                               if isinstance(values[p.name], torch.Tensor)
                               else TensorSpec((), type(values[p.name]).__name__, name=p.name)
                               for p in gi),
            graph_input_positions=tuple(placeholders.index(p) for p in gi),
            sent=tuple(_spec(n, values[n]) for n in live[s]) if s < num - 1 else (),
            params=params,
            replicas=replicas,
            recomputed=tuple(sorted(recomputed[s], key=position.__getitem__)),
        ))
    graph_inputs = []
    for p in placeholders:
        value = values[p.name]
        graph_inputs.append(_spec(p.name, value) if isinstance(value, torch.Tensor)
                            else TensorSpec((), type(value).__name__, name=p.name))
    return StageSplit(stages=tuple(stages), tied=tied, graph_inputs=tuple(graph_inputs))


def _build_stage(gm: torch.fx.GraphModule, values: dict[str, Any], s: int, num: int,
                 received: list[str],
                 placeholders: list[torch.fx.Node], reads: set[str], computes: set[str],
                 sent: list[str], output_node: torch.fx.Node, position: dict[str, int],
                 by_name: dict[str, torch.fx.Node]
                 ) -> tuple[torch.fx.GraphModule, tuple[tuple[str, str], ...]]:
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for name in received:
        env[name] = graph.placeholder(name)
        env[name].meta = dict(by_name[name].meta)
    for p in placeholders:
        if p.name in reads:
            env[p.name] = graph.placeholder(p.name)
            env[p.name].meta = dict(p.meta)
    for name in sorted(computes, key=position.__getitem__):
        env[name] = graph.node_copy(by_name[name], lambda n: env[n.name])
    for name, node in env.items():
        value = values.get(name)
        if isinstance(value, torch.Tensor):
            node.meta["tripar_spec"] = _spec(name, value)
    if s == num - 1:
        result = torch.fx.map_arg(output_node.args[0], lambda n: env[n.name])
        out_spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "out_spec", None)
        if out_spec is not None:  # an exported graph returns a flat list; restore its structure
            result = pytree.tree_unflatten(list(result), out_spec)
        graph.output(result)
    else:
        graph.output(tuple(env[n] for n in sent))
    _drop_dead(graph)
    graph.lint()
    module = torch.fx.GraphModule(gm, graph, class_name=f"Stage{s}")
    params = tuple((local, local) for local, _ in module.named_parameters(remove_duplicate=False))
    return module, params


def _drop_dead(graph: torch.fx.Graph) -> None:
    """Remove nodes whose every consumer went to other stages (pure ops only)."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("placeholder", "output") or node.users:
                continue
            target = getattr(node.target, "__name__", str(node.target))
            impure = node.op in ("call_function", "call_method") and node.is_impure()
            if target.endswith("_") or impure or node.target is operator.setitem:
                continue
            graph.erase_node(node)
            changed = True


def _tied_groups(gm: torch.fx.GraphModule, canon: Mapping[str, str],
                 computes: list[set[str]], by_name: dict[str, torch.fx.Node]
                 ) -> tuple[tuple[TiedGroup, ...], dict[str, set[int]]]:
    """The stages holding each parameter (by canonical name), and the parameters that
    have several names (``tripar.graph.param_groups``) or are held by several stages."""
    holders: dict[str, set[int]] = defaultdict(set)
    for s, nodes in enumerate(computes):
        for name in nodes:
            for fqn, _ in read_params(gm, by_name[name], canon):
                holders[fqn].add(s)
    groups = [TiedGroup(fqns, tuple(sorted(holders.get(fqns[0], ()))))
              for fqns in param_groups(gm) if len(fqns) > 1 or len(holders.get(fqns[0], ())) > 1]
    return tuple(groups), holders


# ---- by blocks ------------------------------------------------------------------------


def block_nodes(gm: torch.fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """Block name -> its FX node names, grouped as ``tripar.graph.blocks`` groups them."""
    part = partition_blocks(gm)
    return dict(zip(part.names, part.nodes))


def split_by_blocks(
    gm: torch.fx.GraphModule,
    stage_blocks: Sequence[Sequence[str]],
    example_inputs: Sequence[Any],
    *,
    blocks: dict[str, Sequence[str]] | None = None,
    recompute_derived: bool = True,
    values: Mapping[str, Any] | None = None,
) -> StageSplit:
    """:func:`split_stages` with stages given as block names (``Plan.stages[i].blocks``).

    ``blocks`` maps block name -> node names (``{b.name: b.nodes for b in
    proxy.blocks}``); by default the graph is grouped with ``partition_blocks``.
    """
    table = dict(blocks) if blocks is not None else block_nodes(gm)
    seen: dict[str, int] = {}
    stage_nodes = []
    for s, names in enumerate(stage_blocks):
        nodes: list[str] = []
        for block in names:
            if block not in table:
                raise PlanError(f"stage {s} names block {block!r}, which the model does not "
                                f"have (blocks: {list(table)[:8]}...); re-plan for this model")
            if block in seen:
                raise PlanError(f"block {block!r} is in stages {seen[block]} and {s}")
            seen[block] = s
            nodes.extend(table[block])
        stage_nodes.append(nodes)
    left = [b for b in table if b not in seen]
    if left:
        raise PlanError(f"blocks {left} are in no stage; every block must be in one stage")
    return split_stages(gm, stage_nodes, example_inputs, stage_blocks=stage_blocks,
                        recompute_derived=recompute_derived, values=values)


def even_stage_blocks(block_names: Sequence[str], num_stages: int) -> list[list[str]]:
    """Contiguous groups of blocks, as even in count as possible (a test and CLI helper,
    not a planner).

    >>> even_stage_blocks(["a", "b", "c", "d", "e"], 2)
    [['a', 'b', 'c'], ['d', 'e']]
    """
    if not 1 <= num_stages <= len(block_names):
        raise PlanError(f"cannot make {num_stages} stages of {len(block_names)} blocks; "
                        f"use 1 to {len(block_names)} stages")
    out, start = [], 0
    for s in range(num_stages):
        size = (len(block_names) - start + (num_stages - s) - 1) // (num_stages - s)
        out.append(list(block_names[start:start + size]))
        start += size
    return out


def rank_stages(split: StageSplit, pp: int, pp_rank: int, *,
                pipelines: int = 1) -> tuple[StageProgram, ...]:
    """The virtual stages pipeline rank ``pp_rank`` runs (stage ``i`` runs on rank ``i % pp``;
    with two pipelines (chimera) rank r runs stages r and pp - 1 - r).

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.ReLU()))
    >>> split = split_stages(gm, [["_0"], ["_1"]], [torch.randn(2)])
    >>> [s.index for s in rank_stages(split, 2, 1)]
    [1]
    """
    if not 0 <= pp_rank < pp:
        raise PlanError(f"pp_rank={pp_rank} is outside 0..{pp - 1}")
    if len(split.stages) % pp:
        raise PlanError(f"{len(split.stages)} stages do not divide over pp={pp} ranks")
    if pipelines == 2:
        return tuple(s for s in split.stages if s.index in (pp_rank, pp - 1 - pp_rank))
    return tuple(s for s in split.stages if s.index % pp == pp_rank)


def split_for_plan(gm: torch.fx.GraphModule, plan: Any, example_inputs: Sequence[Any], *,
                   blocks: dict[str, Sequence[str]] | None = None) -> StageSplit:
    """Every (virtual) stage of ``plan`` (a ``tripar.plan.plan.Plan``), split from ``gm``.

    The plan is validated first; its stages' block lists name the blocks of ``gm``
    (``blocks``, or ``partition_blocks`` grouping). ``example_inputs`` are the flat graph
    inputs of one microbatch. A pipeline rank runs ``rank_stages(split, pp, pp_rank)``.
    """
    plan.validate()
    table = dict(blocks) if blocks is not None else block_nodes(gm)
    if tuple(table) != tuple(plan.model.blocks):
        raise PlanError(f"the plan is for blocks {list(plan.model.blocks)[:6]}..., the graph has "
                        f"{list(table)[:6]}...; re-plan for this model (tripar plan)")
    return split_by_blocks(gm, [s.blocks for s in plan.stages], example_inputs, blocks=table)
