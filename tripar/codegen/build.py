"""A plan into one rank's programs: tensor-parallel rewrite, stage split, own weights.

:func:`build` is codegen's pipeline for rank ``(pp_rank, tp_rank)``, a straight list
of named passes:

1. :func:`check_plan` -- the plan is valid (``Plan.validate``) and made for this graph:
   the same blocks in the same order, the same parameter count (and fingerprint,
   when the caller has the proxy graph).
2. :func:`plan_regions` -- the plan's sharded regions (``TPShard``: block, kind,
   nodes, shards) found again in the graph as ``TPRegion`` records, proven at the
   plan's ``tp``; a region that differs or cannot be proven is refused.
3. :func:`split_tp_rank` -- ``tp_rewrite`` of the whole graph for ``tp_rank``, then the
   stage split of the rewritten graph by the plan's blocks. Rewriting first keeps one
   rule for every region, whichever stages it touches: a sharded value that crosses a
   cut (vocab-sharded logits before the loss) travels between the stages of one
   tensor-parallel rank like any activation. The nodes the rewrite adds (collectives,
   the row-parallel bias add) join the block of the next original node in graph order.
4. ``rank_stages`` and ``materialize_stage`` (inside :func:`stage_programs`) -- the virtual stages of ``pp_rank``, each
   given its own weights: only this rank's tensor-parallel slice of the stage's weights
   is kept (copied from a real model, or initialised locally from a meta-built one; the
   full tensor of a sliced weight exists only while it is initialised and cut, as in
   Megatron's CPU initialisation). Nothing else holds a real weight: the rewrite and
   the split work on a meta copy of the graph.
5. :func:`stage_programs` -- each stage as it runs: its tensor-parallel collectives
   pointed at the job's group and random stream, and the blocks its plan recomputes
   run under activation checkpointing (``apply_recompute``). ``tripar codegen`` writes
   these modules, and ``tripar.runtime.assemble`` runs them: one path.

The result, a :class:`RankProgram`, carries the parameter map: local name -> original
FQN, the dim it is cut on and the index ranges kept (``param_map``, JSON-ready).
:func:`write_rank` writes a rank's readable stage sources and its map.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from tripar.codegen.collectives import TPCollective
from tripar.codegen.emit import stage_source
from tripar.codegen.recompute import apply_recompute
from tripar.codegen.split import (
    block_nodes,
    propagate_values,
    rank_stages,
    split_by_blocks,
)
from tripar.codegen.stage import StageProgram, StageSplit
from tripar.codegen.sub_pipeline import stage_inputs, sub_pipeline
from tripar.codegen.tensor_parallel import rewrite_with_values
from tripar.codegen.tp_rng import ForkedRNG
from tripar.codegen.tp_shard import ParamShard, shard_map
from tripar.codegen.weights import default_init, materialize_stage, param_map, retarget_device
from tripar.errors import PlanError
from tripar.graph import Captured, TPRegion, baked_devices, for_micro_batch, node_values
from tripar.graph.batchwise import microbatch_split
from tripar.plan.schedule import ActionKind

__all__ = ["RankProgram", "SplitForRank", "SplitKey", "build", "build_pipeline", "check_plan",
           "batch_dims", "connect_tp", "drop_dtype_asserts", "plan_regions", "recomputed_by_schedule", "split_for_rank",
           "split_tp_rank", "stage_programs", "write_rank"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RankProgram:
    """What rank ``(pp_rank, tp_rank)`` runs: its virtual stages and their weights."""

    pp_rank: int
    tp_rank: int
    pp: int
    tp: int
    stages: tuple[StageProgram, ...]
    """This rank's virtual stages in pipeline order (stage ``i`` runs on ``i % pp``); their
    modules hold this rank's own weights when built with ``materialize=True``."""
    split: StageSplit
    """Every stage of this tensor-parallel rank's pipeline (wiring, tied groups), with the
    weights of the rewritten graph (meta when the graph was captured on meta)."""
    regions: tuple[TPRegion, ...] = ()
    """The regions sharded, as found in the graph."""
    shards: Mapping[str, ParamShard] = field(default_factory=dict)
    """FQN -> the slice of it this rank holds (every name of a tied weight)."""

    @property
    def modules(self) -> tuple[torch.fx.GraphModule, ...]:
        return tuple(s.module for s in self.stages)

    def param_map(self) -> dict[str, Any]:
        """Per stage: local parameter name -> original FQN, shape, dtype, whether its
        gradient is summed with another stage's replica, and its slice (``dim``,
        ``ranges`` kept, fused ``parts``; None when whole). JSON-ready."""
        mine = dataclasses.replace(self.split, stages=self.stages)
        slices = {name: shard.to_json() for name, shard in self.shards.items()}
        return {"pp_rank": self.pp_rank, "tp_rank": self.tp_rank, "pp": self.pp,
                "tp": self.tp, **param_map(mine, slices=slices)}

    def param_map_json(self) -> str:
        return json.dumps(self.param_map(), indent=2, sort_keys=True)


# ---- 1. the plan is for this graph ----------------------------------------------------


def _param_count(gm: torch.fx.GraphModule) -> int:
    return sum(p.numel() for p in gm.parameters())  # each tied tensor once


def check_plan(gm: torch.fx.GraphModule, plan: Any, *, fingerprint: str | None = None
               ) -> dict[str, tuple[str, ...]]:
    """Validate ``plan`` and check it was made for ``gm``; returns the graph's blocks
    (name -> FX node names). ``fingerprint`` (``model_fingerprint`` of the proxy graph's
    blocks, which depend on the batch the graph was measured with) is checked when given.

    >>> import torch
    >>> from tripar.plan.plan import (ClusterInfo, Estimate, Inputs, ModelInfo, Plan,
    ...                               StagePlan)
    >>> from tripar.plan.config import ParallelConfig
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    >>> plan = Plan(ModelInfo("m", "0" * 16, ("1",), 6),
    ...             ClusterInfo("cpu", 1, 1, 10**9, 1e9, 1e9, 1e9), Inputs(1, 1),
    ...             ParallelConfig(1, 1, 1, 1, 1), (StagePlan(0, 0, 0, ("1",), (), 0.0, 1),),
    ...             Estimate(0.0, 0.0, 1, 0.0))
    >>> check_plan(gm, plan)
    Traceback (most recent call last):
    tripar.errors.PlanError: the plan is for model 'm' with blocks ['1'], but the graph has blocks ['0']; re-plan for this model (tripar plan)
    """
    plan.validate()
    if fingerprint is not None:
        plan.check_model(fingerprint)
    table = block_nodes(gm)
    if tuple(table) != tuple(plan.model.blocks):
        ours, theirs = list(table), list(plan.model.blocks)
        where = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                     min(len(ours), len(theirs)))
        detail = (f" (first difference at block {where}: plan "
                  f"{theirs[where] if where < len(theirs) else 'ends'}, graph "
                  f"{ours[where] if where < len(ours) else 'ends'})"
                  if len(ours) > 6 or len(theirs) > 6 else "")
        raise PlanError(f"the plan is for model {plan.model.spec!r} with blocks "
                        f"{_short(theirs)}, but the graph has blocks {_short(ours)}{detail}; "
                        "re-plan for this model (tripar plan)")
    count = _param_count(gm)
    if count != plan.model.params:
        raise PlanError(f"the plan is for model {plan.model.spec!r} with {plan.model.params:,} "
                        f"parameters, but the graph has {count:,}; the blocks are named alike but "
                        "sized differently: re-plan for this model (tripar plan)")
    return table


def _short(names: Sequence[str]) -> str:
    names = list(names)
    return str(names) if len(names) <= 6 else f"{names[:3]}...{names[-2:]} ({len(names)})"


# ---- 2. the plan's regions, found in the graph ----------------------------------------


def plan_regions(gm: torch.fx.GraphModule, plan: Any, example_inputs: Sequence[Any] | None,
                 *, blocks: Mapping[str, Sequence[str]] | None = None) -> tuple[TPRegion, ...]:
    """The ``TPRegion`` of every region ``plan`` shards (``plan.tp_regions``), in the
    plan's order, found again in ``gm`` at ``plan.parallel.tp`` and matched by name
    (``block:kind:index``). Raises PlanError when the graph has no such region at that
    degree, or when its nodes or sharded weights differ from the plan's."""
    if not plan.tp_regions:
        return ()
    from tripar.graph.tp_regions import find_tp_regions

    t = plan.parallel.tp
    table = dict(blocks) if blocks is not None else block_nodes(gm)
    node_block = {n: b for b, nodes in table.items() for n in nodes}
    exported = gm.meta.get("tripar_tracer") == "export"
    found, unproven = find_tp_regions(gm, node_block, degrees=(t,),
                                      example_inputs=None if exported else example_inputs)
    by_name = {r.name: r for r in found}
    out = []
    for shard in plan.tp_regions:
        region = by_name.get(shard.name)
        if region is None:
            why = [u.reason for u in unproven if u.block == shard.block
                   and u.kind in ("", shard.kind)]
            alike = [r.name for r in found if (r.block, r.kind) == (shard.block, shard.kind)]
            missing = (f"no {shard.kind} region in block {shard.block!r}" if not alike else
                       f"no {shard.kind} region number {shard.index} in block "
                       f"{shard.block!r} (only {', '.join(alike)})")
            have = sorted(by_name)
            raise PlanError(
                f"the plan shards region {shard.name}, but the graph has {missing} provable "
                f"at tp={t}"
                + (f" ({why[0]})" if why else "")
                + f"; the graph's regions at tp={t}: {_short(have)}. Re-plan for this model")
        if tuple(region.nodes) != tuple(shard.nodes):
            extra = sorted(set(region.nodes) ^ set(shard.nodes))
            raise PlanError(f"region {shard.name}: the plan lists {len(shard.nodes)} nodes, the "
                            f"graph's region has {len(region.nodes)} (differing: {extra[:5]}); "
                            "the plan was made for another graph: re-plan for this model")
        if tuple(region.shards) != tuple(shard.shards):
            raise PlanError(f"region {shard.name}: the plan shards {list(shard.shards)}, the "
                            f"graph's region shards {list(region.shards)}; re-plan for this model")
        out.append(region)
    _check_tied(out, found)
    return tuple(out)


def _weights(region: TPRegion) -> set[str]:
    return {fqn for fqn, _ in region.shards} | set(region.tied)


def _check_tied(chosen: Sequence[TPRegion], found: Sequence[TPRegion]) -> None:
    """A weight the plan shards must be sharded by every region that reads it (a tied
    embedding and LM head): one left replicated would read a slice as the whole."""
    sharded: dict[str, TPRegion] = {}
    for region in chosen:
        for name in _weights(region):
            sharded.setdefault(name, region)
    for region in found:
        if any(region is r for r in chosen):
            continue
        shared = sorted(_weights(region) & set(sharded))
        if shared:
            other = sharded[shared[0]]
            raise PlanError(
                f"the plan shards region {other.name}, whose weight {shared[0]} "
                f"region {region.name} also reads, but leaves that region "
                "replicated; a shared (tied) weight must be sharded by every region using it "
                "or by none: add both regions to tp_regions or drop both (the planner should "
                "decide them together)")


# ---- 3. rewrite, then split -----------------------------------------------------------


def _rewritten_blocks(table: Mapping[str, Sequence[str]], rewritten: torch.fx.GraphModule
                      ) -> dict[str, list[str]]:
    """The block table of a rewritten graph: original nodes keep their block, a node the
    rewrite added joins the block of the next original node in graph order (the last
    block when none follows). Weights (``get_attr``) are left to the split."""
    block_of = {n: b for b, nodes in table.items() for n in nodes}
    out: dict[str, list[str]] = {b: [] for b in table}
    pending: list[str] = []
    last = next(reversed(table))
    for node in rewritten.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        block = block_of.get(node.name)
        if block is None:
            pending.append(node.name)
            continue
        out[block].extend(pending)
        out[block].append(node.name)
        pending = []
    out[last].extend(pending)
    return out


def split_tp_rank(
    gm: torch.fx.GraphModule,
    plan: Any,
    example_inputs: Sequence[Any],
    *,
    tp_rank: int = 0,
    tp_group: Any = None,
    rng: Any = None,
    regions: Sequence[TPRegion] | None = None,
    blocks: Mapping[str, Sequence[str]] | None = None,
    values: Mapping[str, Any] | None = None,
) -> StageSplit:
    """Every stage of tensor-parallel rank ``tp_rank``'s pipeline: ``gm`` rewritten for
    the plan's sharded regions (none when ``plan.parallel.tp`` is 1), then split by the
    plan's stage blocks. With tensor parallelism the rewrite works on a copy of ``gm``
    whose weights are on the meta device, so the stage modules hold meta slices
    (``materialize_stage`` gives them real ones); without, they hold ``gm``'s weights.
    ``regions`` and ``blocks`` default to :func:`plan_regions` and ``block_nodes`` of
    ``gm``; the plan is not re-checked. ``values``: ``gm``'s node values on
    ``example_inputs`` (``split.propagate_values``), when the caller has them: the
    rewrite and the split then propagate only the rewritten graph, once."""
    t = plan.parallel.tp
    if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank < t:
        raise PlanError(f"tp_rank={tp_rank!r} is outside 0..{t - 1} (the plan's tp={t})")
    table = dict(blocks) if blocks is not None else block_nodes(gm)
    if regions is None:
        regions = plan_regions(gm, plan, example_inputs, blocks=table)
    stage_blocks = [s.blocks for s in plan.stages]
    if t == 1 or not regions:
        return split_by_blocks(gm, stage_blocks, example_inputs, blocks=table, values=values)
    gm = _meta_twin(gm)  # the rewrite copies the graph: copy no weight
    if "meta" in baked_devices(gm):
        # exported from a meta-built model: device=meta is baked into asserts and
        # factories; the rewrite checks shapes on CPU fake tensors, so write cpu (weights
        # are materialised on the CPU or retargeted again by ``materialize_stage``)
        retarget_device(gm, torch.device("cpu"))
    rewritten, shapes = rewrite_with_values(gm, regions, t=t, rank=tp_rank, group=tp_group,
                                            example_inputs=example_inputs, rng=rng,
                                            values=values, sequence_parallel=plan.parallel.sp)
    return split_by_blocks(rewritten, stage_blocks, example_inputs,
                           blocks=_rewritten_blocks(table, rewritten), values=shapes)


def _meta_twin(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` whose parameters are on the meta device (no weight is copied;
    buffers and constants, which are small, stay as they are). Ties stay ties."""
    memo: dict[int, Any] = {}
    for param in gm.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"),
                                       requires_grad=param.requires_grad)
    return copy.deepcopy(gm, memo)


# ---- 4. this rank -------------------------------------------------------------------


def _on_meta(gm: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in gm.parameters())


def build(
    graph_module: torch.fx.GraphModule,
    plan: Any,
    example_inputs: Sequence[Any],
    *,
    pp_rank: int,
    tp_rank: int = 0,
    tp_group: Any = None,
    source: nn.Module | None = None,
    meta_model: nn.Module | None = None,
    seed: int = 0,
    init: Any = default_init,
    materialize: bool = True,
    fingerprint: str | None = None,
    rng: Any = None,
    device: torch.device | str = "cpu",
    values: Mapping[str, Any] | None = None,
) -> RankProgram:
    """Rank ``(pp_rank, tp_rank)``'s stage programs for ``plan``, with their own weights.

    ``graph_module`` is the captured model (``tripar.graph.capture``) and
    ``example_inputs`` its flat inputs for one microbatch (``flat_graph_inputs``): the
    shapes the stages send and receive are theirs. The weights of each stage are this
    rank's slices, copied from ``source`` (a real model whose FQNs the graph uses;
    default: the graph's own weights when they are real) or initialised from
    ``meta_model`` with its own init under ``seed``. ``materialize=False`` skips the
    weights (the stage modules then hold meta tensors where tensor parallelism slices:
    enough to read the source). ``tp_group`` is the tensor-parallel process group the
    collectives use (None: the default group); ``rng`` the tensor-parallel random stream
    (``tp_rng_tracker``; default seeded from ``torch.initial_seed()`` and ``tp_rank``).
    ``fingerprint`` (``model_fingerprint`` of the proxy graph the plan was made from) is
    checked against the plan's when given. ``values``: the graph's node values on
    ``example_inputs`` (``split.propagate_values``), reused by every build for the same
    microbatch (propagating the graph is most of a build's cost).

    Raises PlanError when the plan is invalid or made for another model, or
    ``RewriteError`` (a PlanError) naming the node when a region cannot be rewritten.
    """
    pp = plan.parallel.pp
    if isinstance(pp_rank, bool) or not isinstance(pp_rank, int) or not 0 <= pp_rank < pp:
        raise PlanError(f"pp_rank={pp_rank!r} is outside 0..{pp - 1} (the plan's pp={pp})")
    (program,) = _build(graph_module, plan, example_inputs, (pp_rank,), tp_rank=tp_rank,
                        tp_group=tp_group, source=source, meta_model=meta_model, seed=seed,
                        init=init, materialize=materialize, fingerprint=fingerprint, rng=rng,
                        device=device, values=values)
    return program


def build_pipeline(
    graph_module: torch.fx.GraphModule,
    plan: Any,
    example_inputs: Sequence[Any],
    *,
    tp_rank: int = 0,
    **kwargs: Any,
) -> tuple[RankProgram, ...]:
    """:func:`build` for every pipeline rank of tensor-parallel rank ``tp_rank`` at once
    (one rewrite and one split): the programs ``tripar codegen`` writes, and a whole
    pipeline run in one process. Takes :func:`build`'s keywords."""
    return _build(graph_module, plan, example_inputs, tuple(range(plan.parallel.pp)),
                  tp_rank=tp_rank, **kwargs)


def _build(graph_module: torch.fx.GraphModule, plan: Any, example_inputs: Sequence[Any],
           pp_ranks: Sequence[int], *, tp_rank: int = 0, tp_group: Any = None,
           source: nn.Module | None = None, meta_model: nn.Module | None = None,
           seed: int = 0, init: Any = default_init, materialize: bool = True,
           fingerprint: str | None = None, rng: Any = None,
           device: torch.device | str = "cpu",
           values: Mapping[str, Any] | None = None) -> tuple[RankProgram, ...]:
    table = check_plan(graph_module, plan, fingerprint=fingerprint)
    if source is not None and meta_model is not None:
        raise PlanError("build takes source= (a real model) or meta_model= (built on the meta "
                        "device), not both")
    if materialize and source is None and meta_model is None:
        if _on_meta(graph_module):
            raise PlanError("the graph was captured from a model on the meta device: give "
                            "meta_model= (to initialise this rank's weights) or source= (a real "
                            "model), or materialize=False for the programs alone")
        source = graph_module
    regions = plan_regions(graph_module, plan, example_inputs, blocks=table)
    split = split_tp_rank(graph_module, plan, example_inputs, tp_rank=tp_rank,
                          tp_group=tp_group, rng=rng, regions=regions, blocks=table,
                          values=values)
    pp, t = plan.parallel.pp, plan.parallel.tp
    shards = shard_map(graph_module, regions, t=t, rank=tp_rank) if regions else {}
    dims = batch_dims(graph_module, plan, example_inputs, values=values)
    out = []
    for pp_rank in pp_ranks:
        stages = stage_programs(split, plan, pp_rank, blocks=table, shards=shards,
                                source=source, meta_model=meta_model, init=init, seed=seed,
                                device=device, materialize=materialize,
                                inputs=example_inputs, batch_dims=dims)
        out.append(RankProgram(pp_rank=pp_rank, tp_rank=tp_rank, pp=pp, tp=t, stages=stages,
                               split=split, regions=regions, shards=shards))
    return tuple(out)


# ---- 5. the stages a rank runs ---------------------------------------------------------


def recomputed_by_schedule(plan: Any) -> frozenset[int]:
    """The stages whose schedule recomputes them whole (its ``f`` and ``R`` actions: scp,
    full recompute); their blocks are not checkpointed a second time. A plan that records
    no schedule (written by hand for codegen) recomputes no stage whole."""
    if not plan.schedule:
        return frozenset()
    return frozenset(a.stage for acts in plan.to_schedule().actions for a in acts
                     if a.kind is ActionKind.RECOMPUTE)


def connect_tp(module: nn.Module, group: Any, tracker: Any) -> None:
    """Point a stage's tensor-parallel collectives at ``group`` and its tensor-parallel
    dropout at the random stream ``tracker`` (before recomputation wraps the stage: a
    recomputed segment replays the trackers it finds)."""
    for sub in module.modules():
        if isinstance(sub, TPCollective):
            sub.group = group
        elif isinstance(sub, ForkedRNG):
            sub.tracker = tracker


def drop_dtype_asserts(module: nn.Module) -> int:
    """Remove ``torch.export``'s checks that a value is still of the dtype it was traced
    in (``aten._assert_tensor_metadata`` with a ``dtype``): under autocast a linear's
    output is bf16 and the check would fail though nothing is wrong. Returns how many."""
    if not isinstance(module, torch.fx.GraphModule):
        return 0
    found = [n for n in module.graph.nodes if n.op == "call_function" and not n.users
             and n.target is torch.ops.aten._assert_tensor_metadata.default
             and n.kwargs.get("dtype") is not None]
    for node in found:
        module.graph.erase_node(node)
    if found:
        module.recompile()
    return len(found)


def stage_programs(split: StageSplit, plan: Any, pp_rank: int, *,
                   blocks: Mapping[str, Sequence[str]], shards: Mapping[str, ParamShard],
                   source: nn.Module | None = None, meta_model: nn.Module | None = None,
                   init: Any = default_init, seed: int = 0,
                   device: torch.device | str = "cpu", materialize: bool = True,
                   tp_group: Any = None, rng: Any = None,
                   inputs: Sequence[Any] | None = None,
                   batch_dims: Mapping[str, int | None] | None = None
                   ) -> tuple[StageProgram, ...]:
    """The virtual stages of pipeline rank ``pp_rank`` as they run: each given its own
    weights (``materialize_stage``; skipped with ``materialize=False``), its
    tensor-parallel collectives pointed at ``tp_group`` and ``rng`` (when given), and the
    blocks its ``StagePlan.recompute`` names and the nodes its ``StagePlan.selective``
    names run under activation checkpointing (``apply_recompute``), unless its schedule
    recomputes the stage whole. With ``plan.parallel.tp_overlap`` k > 1 each stage then runs
    its microbatches as k parts (``sub_pipeline``), along the batch, or along the sequence
    where a microbatch is one sample; ``inputs``, the graph's flat example inputs for one
    microbatch, and ``batch_dims``, the whole graph's split dims (:func:`batch_dims`),
    show which values carry the dim split."""
    whole = recomputed_by_schedule(plan)
    k = plan.parallel.tp_overlap if plan.parallel.tp > 1 else 1
    if k > 1 and inputs is None:
        raise PlanError(f"tp_overlap={k}: stage_programs needs the graph's example inputs "
                        "(inputs=) to find the batch")
    out = []
    for stage in rank_stages(split, plan.parallel.pp, pp_rank,
                             pipelines=plan.parallel.pipelines):
        module = stage.module
        if materialize:
            module = materialize_stage(stage, source=source, meta_model=meta_model, init=init,
                                       seed=seed, device=device, shards=shards)
        if tp_group is not None or rng is not None:
            connect_tp(module, tp_group, rng)
        if plan.inputs.dtype != "fp32":
            drop_dtype_asserts(module)
        if k > 1:
            own = [inputs[i] for i in stage.graph_input_positions]
            values = node_values(module, stage_inputs(stage.received, own))
            parts = microbatch_split(module, values,
                                     micro_batch_size=plan.parallel.micro_batch_size,
                                     seq_len=plan.inputs.seq_len, known=batch_dims)
        recompute = plan.stages[stage.index].recompute
        selective = getattr(plan.stages[stage.index], "selective", ())
        if (recompute or selective) and stage.index not in whole:
            module = apply_recompute(stage, recompute, blocks=blocks, module=module,
                                     selective=selective)
        if k > 1:
            module, why = sub_pipeline(module, k, parts, values, where=f"stage {stage.index}")
            if why:
                log.warning("stage %d runs its microbatches whole, not in %d parts: %s",
                            stage.index, k, why)
        out.append(dataclasses.replace(stage, module=module))
    return tuple(out)


def batch_dims(gm: torch.fx.GraphModule, plan: Any, example_inputs: Sequence[Any], *,
               values: Mapping[str, Any] | None = None) -> dict[str, int | None]:
    """The dim carrying the batch of each value of the whole captured graph that runs per
    part (empty unless the plan sub-pipelines its tensor-parallel stages): a stage input
    whose shape has several dims of the microbatch's size (a sequence shard as long as
    the microbatch) takes its dim from here."""
    par = plan.parallel
    if par.tp_overlap < 2 or par.tp < 2:
        return {}
    if values is None:
        values = node_values(gm, example_inputs)
    return microbatch_split(gm, values, micro_batch_size=par.micro_batch_size,
                            seq_len=plan.inputs.seq_len).dims


@dataclass(frozen=True, slots=True)
class SplitKey:
    """What a stage split depends on (``Captured.splits`` is keyed by it)."""

    stage_blocks: tuple[tuple[str, ...], ...]
    micro_batch_size: int
    tp: int
    tp_rank: int
    regions: tuple
    sp: bool = False


@dataclass(frozen=True, slots=True)
class SplitForRank:
    """Every stage of one tensor-parallel rank's pipeline, without weights."""

    captured: Captured
    """The capture at the plan's microbatch size (its flat inputs feed the stages)."""
    split: StageSplit
    blocks: Mapping[str, Sequence[str]]
    """The captured graph's block table."""
    shards: Mapping[str, ParamShard]
    """FQN -> the slice of it this tensor-parallel rank holds."""


def split_for_rank(captured: Captured, plan: Any, tp_rank: int) -> SplitForRank:
    """Tensor-parallel rank ``tp_rank``'s pipeline for ``plan`` (passes 1-3 of
    :func:`build`), remembered in ``captured`` for later builds of the same split. No
    weight is materialised, and the collectives have no process group yet."""
    par = plan.parallel
    key = SplitKey(tuple(s.blocks for s in plan.stages), par.micro_batch_size, par.tp,
                   tp_rank, plan.tp_regions, par.sp)
    if key not in captured.splits:
        micro = for_micro_batch(captured, par.micro_batch_size)
        if par.micro_batch_size not in captured.values:
            captured.values[par.micro_batch_size] = propagate_values(
                micro.gm, list(micro.constants))
        first, *_ = build_pipeline(micro.gm, plan, list(micro.constants), tp_rank=tp_rank,
                                   materialize=False,
                                   values=captured.values[par.micro_batch_size])
        captured.splits[key] = SplitForRank(micro, first.split, block_nodes(micro.gm),
                                            dict(first.shards))
    return captured.splits[key]


def write_rank(program: RankProgram, out_dir: str | Path) -> list[Path]:
    """Write ``stage_<i>.py`` (readable source) for each of the rank's stages and its
    ``param_map.json`` into ``out_dir``; returns the paths written."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stage in program.stages:
        path = folder / f"stage_{stage.index}.py"
        text = stage_source(stage, pp=program.pp)
        if program.tp > 1:
            text = (f"# tensor-parallel rank {program.tp_rank} of {program.tp}: "
                    f"{len(program.regions)} regions sharded\n") + text
        path.write_text(text)
        written.append(path)
    path = folder / "param_map.json"
    path.write_text(program.param_map_json() + "\n")
    written.append(path)
    return written
