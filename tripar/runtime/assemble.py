"""Assemble one rank: a plan's stage programs, wired to this job, into a ``ParallelModel``.

The last pass of ``auto_parallel``. Codegen makes the stages
(``tripar.codegen.build.split_for_rank`` and ``stage_programs``: the same modules
``tripar codegen`` writes, with their own weights, tensor-parallel collectives pointed
at the mesh's tp group and the plan's recomputed blocks checkpointed); this module adds
what only a running job knows:

- which batch field feeds each stage's graph inputs (``StageProgram.batch_inputs``),
  and the constants no batch field gives (``_Bound``);
- the precision the stages run in (``Autocast``);
- what each parameter is of the original tensor (``LocalParam``: whole, or a
  tensor-parallel slice), one tensor per weight on a rank that holds it in several
  stages, and the weights tied across pipeline ranks (``TiedWeight``);
- the batch layout the plan was made for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tripar.codegen.build import batch_dims, split_for_rank, stage_programs
from tripar.codegen.tp_rng import tp_rng_tracker
from tripar.codegen.tp_shard import ParamShard
from tripar.errors import ConfigError
from tripar.graph import param_groups
from tripar.graph.captured import Captured
from tripar.models.hf import transformers_source
from tripar.plan.plan import Plan
from tripar.runtime.engine import BatchLayout, ParallelModel
from tripar.runtime.mesh import Mesh
from tripar.runtime.params import LocalParam
from tripar.runtime.precision import Autocast
from tripar.runtime.pretrained import Pretrained, load_pretrained
from tripar.runtime.tied import TiedWeight

__all__ = ["assemble"]


class _Bound(nn.Module):
    """A stage whose graph also reads inputs that no batch field gives (constants)."""

    def __init__(self, module: nn.Module, layout: tuple[tuple[bool, Any], ...]) -> None:
        super().__init__()
        self.module = module
        self._layout = layout  # (from the batch?, constant) per graph input, in order

    def forward(self, *args: Any) -> Any:
        it = iter(args)
        n_received = len(args) - sum(1 for fed, _ in self._layout if fed)
        call = [next(it) for _ in range(n_received)]
        call += [next(it) if fed else value for fed, value in self._layout]
        return self.module(*call)


def assemble(captured: Captured, plan: Plan, mesh: Mesh, *, loss_fn: Callable | None,
             make_optimizer: Callable, max_grad_norm: float | None = None,
             precision: str = "fp32", seed: int = 0,
             pretrained: Pretrained | None = None) -> ParallelModel:
    """This rank's ParallelModel for ``plan`` on ``mesh``: its stages with their own
    weights (copied from ``captured.model``, or initialised under ``seed`` when it was
    built on the meta device; then, with ``pretrained``, the part of each tensor the rank
    holds read from that checkpoint), wired to the job. Reports a failure to the other
    ranks before raising it."""
    try:
        return _assemble(captured, plan, mesh, loss_fn=loss_fn, make_optimizer=make_optimizer,
                         max_grad_norm=max_grad_norm, precision=precision, seed=seed,
                         pretrained=pretrained)
    except BaseException as exc:
        mesh.report_failure(f"{mesh.describe()} failed building its stages "
                            f"{[s.index for s in plan.stages if s.rank == mesh.coords.pp]}: "
                            f"{type(exc).__name__}: {exc}")
        raise


def _assemble(captured: Captured, plan: Plan, mesh: Mesh, *, loss_fn: Callable | None,
              make_optimizer: Callable, max_grad_norm: float | None, precision: str,
              seed: int, pretrained: Pretrained | None) -> ParallelModel:
    model, par = captured.model, plan.parallel
    made = split_for_rank(captured, plan, mesh.coords.tp)
    micro, split, shards = made.captured, made.split, made.shards
    # every name of each original tensor; the first is canonical
    aliases = {group[0]: group for group in param_groups(model)}
    canon = {fqn: group[0] for group in aliases.values() for fqn in group}
    on_meta = any(p.device.type == "meta" for p in model.parameters())

    holders: dict[str, set[int]] = {}
    for st in split.stages:
        for _, fqn in st.params:
            # under chimera a rank and its mirror hold the same stages; the gradient
            # reduction sums the two (Mesh.grad_group), so a pair counts as one holder
            holders.setdefault(canon.get(fqn, fqn), set()).add(min(par.ranks_of(st.index)))
    tied = [TiedWeight(fqn, tuple(sorted(ranks))) for fqn, ranks in sorted(holders.items())
            if len(ranks) > 1]
    if tied and par.pipelines == 2:
        raise ConfigError(
            f"weights {[t.fqn for t in tied][:3]} are tied between stages that chimera puts on "
            f"different pairs of pipeline ranks ({[t.pp_ranks for t in tied][:3]}); tripar sums "
            f"tied gradients within one pair only (stages r and pp-1-r). Use another schedule, "
            f"or pp=2")

    tracker = tp_rng_tracker(seed, mesh.coords.tp, mesh.device) if par.tp > 1 else None
    weights: dict[str, Any] = ({"meta_model": model, "seed": seed} if on_meta
                               else {"source": model})
    stages = stage_programs(split, plan, mesh.coords.pp, blocks=made.blocks, shards=shards,
                            device=mesh.device,
                            tp_group=mesh.tp_group if par.tp > 1 else None,
                            rng=tracker, inputs=list(micro.constants),
                            batch_dims=batch_dims(micro.gm, plan, list(micro.constants),
                                                  values=captured.values.get(
                                                      par.micro_batch_size)),
                            **weights)
    programs, local, buffers = [], [], {}
    shared: dict[str, nn.Parameter] = {}
    state_names = set(model.state_dict(keep_vars=True))
    for st in stages:
        module = st.module
        fqn_of = dict(st.params)
        for prefix, owner in module.named_modules():
            for attr, p in list(owner._parameters.items()):
                if p is None:
                    continue
                local_name = f"{prefix}.{attr}" if prefix else attr
                key = canon.get(fqn_of.get(local_name, local_name), local_name)
                if key in shared:  # the same weight in another stage of this rank: one tensor
                    owner._parameters[attr] = shared[key]
                else:
                    shared[key] = p
                    local.append(_local_param(key, p, shards.get(key), mesh.coords.tp))
        for name, b in module.named_buffers():
            if name in state_names:
                buffers[name] = b
        keys = [micro.keys[i] for i in st.graph_input_positions]
        call: nn.Module = module
        if any(k is None for k in keys):
            call = _Bound(module, tuple((k is not None, micro.constants[i])
                                        for k, i in zip(keys, st.graph_input_positions)))
        if precision != "fp32":
            call = Autocast(call, precision, mesh.device)
        programs.append(dataclasses.replace(
            st, module=call, batch_inputs=tuple(k for k in keys if k is not None)))

    held_buffers = {name for st in split.stages for name, _ in st.module.named_buffers()}
    extra = {} if on_meta else {k: v for k, v in model.state_dict().items()
                                if k not in held_buffers and canon.get(k, k) not in holders}
    if pretrained is not None:
        load_pretrained(pretrained, local, {**buffers, **extra})
    return ParallelModel(plan=plan, mesh=mesh, programs=programs, params=local, buffers=buffers,
                         aliases=aliases, tied=tied, layout=_layout(captured, par),
                         make_optimizer=make_optimizer, loss_fn=loss_fn,
                         max_grad_norm=max_grad_norm, extra_state=extra,
                         transformers=transformers_source(model))


def _layout(captured: Captured, par: Any) -> BatchLayout:
    example = captured.example
    fields = [(k, t) for k, t in (example.items() if isinstance(example, dict)
                                  else enumerate(example)) if isinstance(t, torch.Tensor)]
    return BatchLayout(captured.form, tuple((k, tuple(t.shape[1:]), t.dtype) for k, t in fields
                                            if k in set(captured.keys)),
                       par.global_batch_size)


def _local_param(fqn: str, param: nn.Parameter, shard: ParamShard | None,
                 tp_rank: int) -> LocalParam:
    """What part of original tensor ``fqn`` this rank's ``param`` is: all of it, or the
    tensor-parallel slice ``shard`` (one box per fused part along its dim). A weight
    tensor parallelism leaves whole is counted on tp rank 0 only."""
    if shard is None:
        whole = LocalParam.whole(fqn, param)
        return whole if tp_rank == 0 else dataclasses.replace(whole, counts=False)
    shape = list(param.shape)
    shape[shard.dim] = sum(stop - start for start, stop in shard.ranges) * shard.t
    full = tuple((0, n) for n in shape)
    boxes = tuple(full[:shard.dim] + (rng,) + full[shard.dim + 1:] for rng in shard.ranges)
    return LocalParam(fqn, param, tuple(shape), boxes, dim=shard.dim)


