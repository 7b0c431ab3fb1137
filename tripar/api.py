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

import math
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
    short_cause,
)

__all__ = ["Captured", "auto_parallel", "capture_model", "check_pins", "default_optimizer",
           "make_plan"]


def default_optimizer(params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, lr 1e-3, torch's other defaults: the optimizer when none is given."""
    return torch.optim.AdamW(list(params), lr=1e-3)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_pins(devices: int, global_batch: int, *, dp: int | None = None,
               tp: int | None = None, pp: int | None = None,
               num_microbatches: int | None = None, heads: int | None = None,
               hidden: int | None = None) -> None:
    """Raise ConfigError, with the numbers and a fix, for pins no plan can satisfy.

    What ``auto_parallel`` and ``tripar train`` check before any search or process:
    positive pins, pinned degrees that multiply into ``devices``, a pinned tp that
    divides the model's ``heads`` and ``hidden`` size (when known), and a global batch divisible by dp x num_microbatches.

    >>> try:
    ...     check_pins(8, 16, dp=3)
    ... except ConfigError as error:
    ...     print(error)
    the pinned degrees dp=3 multiply to 3, which does not divide the job's 8 devices \
(dp*tp*pp must equal 8); pin degrees whose product divides 8: 1, 2, 4, 8
    """
    pins = {"dp": dp, "tp": tp, "pp": pp, "num_microbatches": num_microbatches}
    for name, value in pins.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ConfigError(f"the global batch must be a positive integer, got {global_batch!r}")
    pinned = {k: v for k, v in pins.items() if k != "num_microbatches" and v is not None}
    product = math.prod(pinned.values())
    shown = " x ".join(f"{k}={v}" for k, v in pinned.items())
    if len(pinned) == 3 and product != devices:
        raise ConfigError(f"dp*tp*pp = {dp}*{tp}*{pp} = {product}, but the job has {devices} "
                          f"devices; choose degrees whose product is {devices}")
    if pinned and devices % product:
        raise ConfigError(f"the pinned degrees {shown} multiply to {product}, which does not "
                          f"divide the job's {devices} devices (dp*tp*pp must equal {devices}); "
                          f"pin degrees whose product divides {devices}: "
                          f"{', '.join(map(str, _divisors(devices)))}")
    if tp is not None and tp > 1:
        for what, size in (("attention heads", heads), ("hidden size", hidden)):
            if size and size % tp:
                fit = [d for d in _divisors(size) if d > 1 and devices % d == 0]
                raise ConfigError(f"tp={tp} does not divide the model's {what} ({size}); a "
                                  f"tensor-parallel degree must split every layer evenly: pin "
                                  f"tp to a divisor of {size}"
                                  + (f" ({', '.join(map(str, fit))})" if fit else "")
                                  + " or tp=1")
    if num_microbatches is not None:
        rest = devices // product if pinned else devices
        dps = [dp] if dp is not None else [d for d in _divisors(rest)]
        if not any(global_batch % (d * num_microbatches) == 0 for d in dps):
            raise ConfigError(f"global batch {global_batch} is not divisible by dp x "
                              f"num_microbatches={num_microbatches} for any dp"
                              + (f" (dp={dp})" if dp else "") + "; choose a global batch that "
                              "is a multiple of dp x num_microbatches")


def make_plan(captured: Captured, cluster: Cluster, global_batch: int, *,
              dp: int | None = None, tp: int | None = None, pp: int | None = None,
              vpp: int | None = None, num_microbatches: int | None = None,
              schedule: str | None = None, recompute: str | None = None,
              zero: int | bool | None = None, model_spec: str = "",
              dtype: str | None = None) -> Plan:
    """The planner's best plan for ``captured`` on ``cluster`` under the given pins, costed
    for compute in ``dtype`` (default: the device's usual training dtype)."""
    config = captured.graph.model_config or {}
    heads = config.get("heads") or max((getattr(r, "heads", 0) or 0
                                        for r in captured.graph.tp_regions), default=0)
    check_pins(cluster.devices, global_batch, dp=dp, tp=tp, pp=pp,
               num_microbatches=num_microbatches, heads=heads or None,
               hidden=config.get("hidden"))
    if vpp is not None and vpp > 1 and schedule is None:
        schedule = "interleaved-1f1b"
    zero_pin = None if zero is None else int(bool(zero))
    devices = cluster.devices
    if num_microbatches is None:
        dps: list[int | None] = [dp]
    else:
        rest = devices // ((tp or 1) * (pp or 1))
        dps = [dp] if dp is not None else [d for d in range(1, rest + 1) if rest % d == 0]
        dps = [d for d in dps if global_batch % (d * num_microbatches) == 0]  # not empty:
        # check_pins refused a batch that no dp x num_microbatches divides
    best: Plan | None = None
    for d in dps:
        mbs = None if num_microbatches is None else global_batch // (d * num_microbatches)
        pins = Pins(dp=d, tp=tp, pp=pp, vpp=vpp, micro_batch_size=mbs, schedule=schedule,
                    recompute=recompute, zero=zero_pin)
        plan = search(captured.graph, cluster, global_batch, pins=pins, model_spec=model_spec,
                      dtype=dtype)
        if best is None or plan.estimate.step_time_s < best.estimate.step_time_s:
            best = plan
    assert best is not None
    return best


def _cluster_for(devices: int | Cluster | None, cluster: Cluster | None, world: int) -> Cluster:
    if isinstance(devices, Cluster):
        cluster = devices
    if cluster is None:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if world % per_node:
            per_node = world
        kind = "cpu"
        if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
            name = torch.cuda.get_device_name().lower()
            kind = next((k for key, k in (("h200", "h200"), ("h100", "h100-80g"),
                                          ("a100", "a100-80g"), ("v100", "v100-32g"))
                         if key in name), "")
            if not kind:
                raise ConfigError(f"no built-in profile for GPU {name!r}; pass cluster= "
                                  f"(tripar calibrate writes one)")
        cluster = Cluster.builtin(kind, nodes=world // per_node, gpus_per_node=per_node)
    if cluster.devices != world:
        raise ConfigError(f"the cluster has {cluster.devices} devices but the job has {world} "
                          f"ranks; start {cluster.devices} ranks or describe the job's devices")
    return cluster


def auto_parallel(model: nn.Module, devices: int | Cluster | None = None, *,
                  example_inputs: Sequence[Any] = (), example_kwargs: Mapping[str, Any] | None
                  = None, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                  optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
                  global_batch_size: int | None = None, cluster: Cluster | None = None,
                  dp: int | None = None, tp: int | None = None, pp: int | None = None,
                  vpp: int | None = None, num_microbatches: int | None = None,
                  schedule: str | None = None, recompute: str | None = None,
                  zero: int | bool | None = None, plan: Plan | None = None,
                  max_grad_norm: float | None = None, precision: str = "fp32", seed: int = 0,
                  timeout_s: float = 300.0, model_spec: str = "",
                  captured: Captured | None = None) -> ParallelModel:
    """Plan and build ``model`` for data, tensor and pipeline parallelism on this job.

    ``devices``: None inside a started job (torchrun, ``tripar train``, an initialised
    process group: the whole world), an int (the job's size; 1 runs in this process), or a
    Cluster (its device profile for the planner). ``example_inputs`` (tuple) or
    ``example_kwargs`` (dict) is one batch; train batches take its form (extra fields are
    passed to ``loss_fn`` only). ``global_batch_size`` defaults to the example's batch size.
    ``loss_fn(outputs, microbatch)``; None uses the model's own loss (a scalar output, or
    ``.loss``). ``optimizer(params)`` builds the optimizer (default AdamW, lr 1e-3). The pins
    (dp, tp, pp, vpp, num_microbatches, schedule, recompute, zero) fix what they name; the
    search chooses the rest, or ``plan`` (from ``tripar plan``) is used as is. A model on the
    meta device is initialised stage by stage under ``seed``. ``precision="bf16"`` runs the
    stages under bf16 autocast with fp32 master weights (:mod:`tripar.runtime.precision`);
    ``max_grad_norm`` clips by the global norm. ``captured`` reuses a
    :func:`capture_model` result of the same model and example. Every rank calls it with the
    same arguments. Returns a :class:`~tripar.runtime.engine.ParallelModel`.
    """
    check_precision(precision)
    world = ensure_process_group(None if isinstance(devices, Cluster) else devices,
                                 timeout_s=timeout_s)
    if isinstance(devices, Cluster) and devices.devices != world:
        raise ConfigError(f"devices is a cluster of {devices.devices} devices, but the job has "
                          f"{world} ranks")
    captured = captured or capture_model(model, example_inputs, example_kwargs)
    if captured.model is not model:
        raise ConfigError("captured= was made from another model; pass the same model")
    batch = global_batch_size or captured.batch_size
    if plan is None:
        plan = make_plan(captured, _cluster_for(devices, cluster, world), batch, dp=dp, tp=tp,
                         pp=pp, vpp=vpp, num_microbatches=num_microbatches, schedule=schedule,
                         recompute=recompute, zero=zero, model_spec=model_spec,
                         dtype="bf16" if precision == "bf16" else "fp32")
    else:
        plan.validate()
        plan.check_model(model_fingerprint(captured.graph.blocks))
        if plan.parallel.devices != world:
            raise PlanError(f"the plan is for {plan.parallel.devices} devices, the job has "
                            f"{world} ranks")
    _check_same_plan(plan)
    par = plan.parallel
    mesh = build_mesh(par.pp, par.dp, par.tp, timeout_s=timeout_s, vpp=par.vpp)
    return assemble(captured, plan, mesh, loss_fn=loss_fn,
                    make_optimizer=optimizer or default_optimizer, max_grad_norm=max_grad_norm,
                    precision=precision, seed=seed)


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
