"""``tripar.auto_parallel``: the passes, in order.

>>> import torch, tripar.api as api
>>> from tripar.models import load_model
>>> loaded = load_model("gpt:layers=1,hidden=16,heads=2,vocab=32,seq=8", batch_size=2)
>>> model = api.auto_parallel(loaded.model, 1, example_inputs=loaded.example_inputs)
>>> model.plan.parallel.devices, round(model.train_step(loaded.example_inputs), 1)
(1, 3.5)
>>> model.close(); torch.distributed.destroy_process_group()  # the one-process group it made

``auto_parallel`` is a straight list of named passes, each a function of the layer that
owns it, none changing its input:

1. ``capture_model`` (``tripar.graph``): the model's FX graph for the example batch,
   annotated, its proxy graph, and which batch field feeds each graph input;
2. :func:`make_plan` (``tripar.partitioner.search``): the planner's best plan under the
   user's pins; every rank computes the same plan (checked when the job runs);
3. ``build_mesh`` (``tripar.runtime``): the job's (pp, dp, tp) process groups;
4. ``assemble`` (``tripar.runtime``, over ``tripar.codegen.build``): this rank's stage
   programs -- the modules ``tripar codegen`` writes -- with their own weights, wired
   into a :class:`~tripar.runtime.engine.ParallelModel`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tripar.errors import ConfigError, PlanError
from tripar.graph import Captured, capture_model
from tripar.partitioner import Cluster, Pins, search
from tripar.plan import Plan, model_fingerprint
from tripar.runtime import (
    CommError,
    ParallelModel,
    assemble,
    build_mesh,
    check_precision,
    ensure_process_group,
    job_cluster,
    match_pretrained,
    optimizer_step_bytes,
    short_cause,
)

__all__ = ["Captured", "Pins", "auto_parallel", "capture_model", "default_optimizer", "make_plan"]


def default_optimizer(params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, lr 1e-3, torch's other defaults: the optimizer when none is given."""
    return torch.optim.AdamW(list(params), lr=1e-3)


def make_plan(captured: Captured, cluster: Cluster, global_batch: int, pins: Pins | None = None,
              *, model_spec: str = "", dtype: str | None = None) -> Plan:
    """The planner's best plan for ``captured`` on ``cluster`` under ``pins``, costed for
    compute in ``dtype`` (default: the device's usual training dtype). Pins that no plan
    can meet raise ConfigError naming them as keywords (``tp=3``)."""
    return search(captured.graph, cluster, global_batch, pins=pins or Pins(),
                  model_spec=model_spec, dtype=dtype)


def _merge(pins: Pins | None, keywords: dict[str, Any]) -> Pins:
    """``pins`` with the keyword pins added; a pin given both ways is a ConfigError."""
    given = {k: v for k, v in keywords.items() if v is not None}
    if pins is None:
        return Pins(**given)
    both = sorted(k for k in given if getattr(pins, k) is not None)
    if both:
        raise ConfigError(f"{', '.join(both)} given both in pins= and as keywords; give each "
                          "once")
    return dataclasses.replace(pins, **given)


def auto_parallel(model: nn.Module, devices: int | Cluster | None = None, *,
                  example_inputs: Sequence[Any] = (), example_kwargs: Mapping[str, Any] | None
                  = None, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                  optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
                  global_batch_size: int | None = None, cluster: Cluster | None = None,
                  pins: Pins | None = None,
                  dp: int | None = None, tp: int | None = None, pp: int | None = None,
                  vpp: int | None = None, num_microbatches: int | None = None,
                  schedule: str | None = None, recompute: str | None = None,
                  zero: int | bool | None = None, sp: bool | None = None,
                  tp_overlap: int | None = None,
                  plan: Plan | None = None,
                  max_grad_norm: float | None = None, precision: str = "fp32", seed: int = 0,
                  timeout_s: float = 300.0, model_spec: str = "",
                  captured: Captured | None = None,
                  init_from: str | os.PathLike | None = None) -> ParallelModel:
    """Plan and build ``model`` for data, tensor and pipeline parallelism on this job.

    ``devices``: None inside a started job (torchrun, ``tripar train``, an initialised
    process group: the whole world), an int (the job's size; 1 runs in this process), or a
    Cluster (its device profile for the planner). ``example_inputs`` (tuple) or
    ``example_kwargs`` (dict) is one batch; train batches take its form (extra fields are
    passed to ``loss_fn`` only). ``global_batch_size`` defaults to the example's batch size.
    ``loss_fn(outputs, microbatch)``; None uses the model's own loss (a scalar output, or
    ``.loss``). ``optimizer(params)`` builds the optimizer (default AdamW, lr 1e-3); the
    planner costs its step by the state it keeps (``optimizer_step_bytes``).
    ``pins`` (a :class:`tripar.Pins`), or the keywords of its fields (dp, tp, pp, vpp,
    num_microbatches, schedule, recompute, zero, sp, tp_overlap) as a convenience, fix what they name; the
    search chooses the rest, or ``plan`` (from ``tripar plan``) is used as is. A model on the
    meta device is initialised stage by stage under ``seed``. ``precision="bf16"`` runs the
    stages under bf16 autocast with fp32 master weights (:mod:`tripar.runtime.precision`);
    ``max_grad_norm`` clips by the global norm. ``captured`` reuses a
    :func:`capture_model` result of the same model and example. ``init_from`` (a directory
    ``save_pretrained`` wrote: config.json and safetensors, sharded or not) starts from
    those weights, matched by the model's parameter names; each rank reads only the
    slices it holds, so the model may be built on the meta device (see
    :mod:`tripar.runtime.pretrained`). Every rank calls it with the same arguments.
    Returns a :class:`~tripar.runtime.engine.ParallelModel`.
    """
    pins = _merge(pins, {"dp": dp, "tp": tp, "pp": pp, "vpp": vpp,
                         "num_microbatches": num_microbatches, "schedule": schedule,
                         "recompute": recompute, "zero": zero, "sp": sp,
                         "tp_overlap": tp_overlap})
    check_precision(precision)
    pretrained = None if init_from is None else match_pretrained(model, init_from)
    world = ensure_process_group(None if isinstance(devices, Cluster) else devices,
                                 timeout_s=timeout_s)
    if isinstance(devices, Cluster) and devices.devices != world:
        raise ConfigError(f"devices is a cluster of {devices.devices} devices, but the job has "
                          f"{world} ranks")
    captured = captured or capture_model(model, example_inputs, example_kwargs)
    if captured.model is not model:
        raise ConfigError("captured= was made from another model; pass the same model")
    batch = global_batch_size or captured.batch_size
    optimizer = optimizer or default_optimizer
    if plan is None:
        planned = job_cluster(world, devices if isinstance(devices, Cluster) else cluster)
        step_bytes = optimizer_step_bytes(optimizer)
        if step_bytes is not None:  # the step costed for this optimizer, not the profile's Adam
            planned = planned.with_optimizer(step_bytes)
        plan = make_plan(captured, planned, batch, pins,
                         model_spec=model_spec, dtype="bf16" if precision == "bf16" else "fp32")
    else:
        plan.validate()
        plan.check_model(model_fingerprint(captured.graph.blocks))
        if plan.parallel.devices != world:
            raise PlanError(f"the plan is for {plan.parallel.devices} devices, the job has "
                            f"{world} ranks")
    _check_same_plan(plan)
    par = plan.parallel
    mesh = build_mesh(par.pp, par.dp, par.tp, timeout_s=timeout_s, vpp=par.vpp,
                      pipelines=par.pipelines)
    return assemble(captured, plan, mesh, loss_fn=loss_fn,
                    make_optimizer=optimizer, max_grad_norm=max_grad_norm,
                    precision=precision, seed=seed, pretrained=pretrained)


def _check_same_plan(plan: Plan) -> None:
    """Refuse to run when ranks computed different plans (a non-deterministic search)."""
    if dist.get_world_size() == 1:
        return
    key = (plan.parallel, tuple(s.blocks for s in plan.stages), plan.schedule, plan.tp_regions)
    keys: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(keys, key)
    except RuntimeError as exc:  # a rank died or stalled before the comparison
        raise CommError(f"rank {dist.get_rank()} lost a peer while the ranks compared their "
                        f"plans ({short_cause(exc)}); another rank died, stalled or failed "
                        f"earlier: check its log") from exc
    differ = [r for r, k in enumerate(keys) if k != keys[0]]
    if differ:
        raise PlanError(f"ranks {differ} computed a different plan from rank 0's; pass the "
                        f"same arguments on every rank, or give plan= (tripar plan)")
