"""``tripar.auto_parallel``: capture -> analyze -> search -> build -> Engine.

>>> import torch, tripar.api as api
>>> from tripar.models import load_model
>>> loaded = load_model("gpt:layers=1,hidden=16,heads=2,vocab=32,seq=8", batch_size=2)
>>> model = api.auto_parallel(loaded.model, 1, example_inputs=loaded.example_inputs)
>>> model.plan.parallel.devices, round(model.train_step(loaded.example_inputs), 1)
(1, 3.5)
>>> model.close(); torch.distributed.destroy_process_group()  # the one-process group it made

Each step is a named function that does not change its input:

- :func:`capture_model`: the FX graph of the model for the example batch, annotated
  (``tripar.graph``), and which batch field feeds each graph input;
- :func:`make_plan`: the planner's search (``tripar.partitioner.search``) under the
  user's pins; every rank computes the same plan (checked when the job runs);
- :func:`build`: this rank's stage programs -- split the graph per the plan
  (``tripar.codegen.split``), give each stage its own weights (``tripar.codegen.weights``:
  copied from a real model or initialised locally from a meta-built one) -- wired into
  a :class:`~tripar.runtime.engine.ParallelModel` on the job's (pp, dp, tp) mesh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tripar.errors import ConfigError, PlanError
from tripar.partitioner.hardware import Cluster
from tripar.plan.plan import Plan, model_fingerprint

__all__ = ["Captured", "auto_parallel", "build", "capture_model", "check_pins",
           "default_optimizer", "make_plan"]


def default_optimizer(params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, lr 1e-3, torch's other defaults: the optimizer when none is given."""
    return torch.optim.AdamW(list(params), lr=1e-3)


@dataclass(frozen=True, eq=False)
class Captured:
    """A model's graph for an example batch, and how batches feed it."""

    model: nn.Module
    gm: torch.fx.GraphModule
    graph: Any
    """The ``ProxyGraph`` (blocks, costs, TP regions) the planner reads."""
    form: str
    """``tuple`` (positional example) or ``dict`` (keyword example)."""
    example: tuple | dict = field(repr=False)
    """The example batch, in its form."""
    keys: tuple[int | str | None, ...]
    """Batch field feeding each flat graph input (None: a constant, e.g. a default)."""
    constants: tuple[Any, ...]
    """The value of each flat graph input in the example (used where ``keys`` is None)."""
    memo: dict = field(default_factory=dict, repr=False)
    """What builds from this capture reuse: the capture for each microbatch size
    (``("micro", size)``), its graph's node values (``("values", size)``: shape
    propagation is most of a split's cost) and the stage splits (``("split", stage
    blocks, microbatch size, tp, tp rank, regions)``: a split depends on nothing else,
    so plans that cut the model alike share one)."""

    @property
    def batch_size(self) -> int:
        return _batch_size(self.example)


class _Field:
    """Stands for a batch field while the graph's inputs are flattened."""

    def __init__(self, key: int | str) -> None:
        self.key = key


def _batch_size(example: tuple | dict) -> int:
    values = example.values() if isinstance(example, Mapping) else example
    sizes = {int(t.shape[0]) for t in values if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ConfigError(f"the example batch needs tensors with one batch size (dim 0); "
                          f"found sizes {sorted(sizes)}")
    return sizes.pop()


def _resize(example: tuple | dict, size: int) -> tuple | dict:
    """The example with ``size`` samples (its first ones, repeated if it has fewer)."""
    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        reps = -(-size // t.shape[0])
        return (t if reps == 1 else torch.cat([t] * reps))[:size]
    if isinstance(example, Mapping):
        return {k: one(v) for k, v in example.items()}
    return tuple(one(v) for v in example)


def capture_model(model: nn.Module, example_inputs: Sequence[Any] = (),
                  example_kwargs: Mapping[str, Any] | None = None, *,
                  model_config: dict | None = None) -> Captured:
    """capture -> annotate -> build the proxy graph, for the example batch as given."""
    from tripar.codegen.split import flat_graph_inputs
    from tripar.graph.annotate import annotate
    from tripar.graph.build import build_proxy_graph
    from tripar.graph.capture import capture

    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    if args and kwargs:
        raise ConfigError("give the example batch either as example_inputs (a tuple: batches "
                          "are tuples) or as example_kwargs (a dict: batches are dicts), not both")
    if not args and not kwargs:
        raise ConfigError("auto_parallel needs an example batch: example_inputs=(...) or "
                          "example_kwargs={...}, with the model's loss or loss_fn's inputs")
    example: tuple | dict = kwargs if kwargs else args
    size = _batch_size(example)
    gm = capture(model, args, kwargs)
    annotate(gm, args, kwargs)
    seq = next((int(t.shape[1]) for t in (kwargs.values() if kwargs else args)
                if isinstance(t, torch.Tensor) and t.dim() >= 2), 1)
    graph = build_proxy_graph(gm, batch_size=size, seq_len=seq, model_config=model_config)
    markers = flat_graph_inputs(gm, tuple(_Field(i) for i in range(len(args))),
                                {k: _Field(k) for k in kwargs})
    values = flat_graph_inputs(gm, args, kwargs)
    keys = tuple(m.key if isinstance(m, _Field) else None for m in markers)
    return Captured(model, gm, graph, "dict" if kwargs else "tuple", example, keys,
                    tuple(values))


def _for_micro_batch(captured: Captured, size: int) -> Captured:
    """The capture for microbatches of ``size`` samples (the example resized): a graph from
    ``torch.export`` fixes its batch size, so it is captured again; an FX graph is reused."""
    if captured.batch_size == size:
        return captured
    if ("micro", size) not in captured.memo:
        captured.memo["micro", size] = _recapture(captured, size)
    return captured.memo["micro", size]


def _recapture(captured: Captured, size: int) -> Captured:
    from tripar.codegen.split import flat_graph_inputs
    from tripar.graph.capture import capture

    example = _resize(captured.example, size)
    args = example if isinstance(example, tuple) else ()
    kwargs = example if isinstance(example, dict) else {}
    gm = captured.gm
    if gm.meta.get("tripar_tracer") == "export":
        gm = capture(captured.model, args, kwargs, method="export")
    values = flat_graph_inputs(gm, args, kwargs)
    return Captured(captured.model, gm, captured.graph, captured.form, example, captured.keys,
                    tuple(values))


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
    from tripar.partitioner.search import Pins, search

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
        import os

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
                  captured: Captured | None = None):
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
    from tripar.runtime.launch import ensure_process_group
    from tripar.runtime.precision import check_precision

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
    return build(captured, plan, loss_fn=loss_fn, optimizer=optimizer or default_optimizer,
                 max_grad_norm=max_grad_norm, precision=precision, seed=seed,
                 timeout_s=timeout_s)


def _check_same_plan(plan: Plan) -> None:
    """Refuse to run when ranks computed different plans (a non-deterministic search)."""
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return
    key = (plan.parallel, tuple(s.blocks for s in plan.stages), plan.schedule, plan.tp_regions)
    keys: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(keys, key)
    except RuntimeError as exc:  # a rank died or stalled before the comparison
        from tripar.runtime.mesh import CommError, short_cause

        raise CommError(f"rank {dist.get_rank()} lost a peer while the ranks compared their "
                        f"plans ({short_cause(exc)}); another rank died, stalled or failed "
                        f"earlier: check its log") from exc
    differ = [r for r, k in enumerate(keys) if k != keys[0]]
    if differ:
        raise PlanError(f"ranks {differ} computed a different plan from rank 0's; pass the "
                        f"same arguments on every rank, or give plan= (tripar plan)")


def build(captured: Captured, plan: Plan, *, loss_fn: Callable | None = None,
          optimizer: Callable = default_optimizer, max_grad_norm: float | None = None,
          precision: str = "fp32", seed: int = 0, timeout_s: float = 300.0, mesh: Any = None):
    """This rank's ParallelModel for ``plan``: mesh, stage split, own weights, engine."""
    from tripar.runtime.mesh import build_mesh

    par = plan.parallel
    if mesh is None:
        mesh = build_mesh(par.pp, par.dp, par.tp, timeout_s=timeout_s, vpp=par.vpp)
    tp_rank = mesh.coords.tp
    key = ("split", tuple(s.blocks for s in plan.stages), par.micro_batch_size, par.tp,
           tp_rank, plan.tp_regions)
    if key not in captured.memo:
        captured.memo[key] = _split(captured, plan, tp_rank)
    micro, split, shards = captured.memo[key]
    try:
        return _build_rank(micro, split, shards, plan, mesh, loss_fn=loss_fn,
                           make_optimizer=optimizer, max_grad_norm=max_grad_norm,
                           precision=precision, seed=seed)
    except BaseException as exc:
        mesh.report_failure(f"{mesh.describe()} failed building its stages "
                            f"{[s.index for s in plan.stages if s.rank == mesh.coords.pp]}: "
                            f"{type(exc).__name__}: {exc}")
        raise


def _split(captured: Captured, plan: Plan, tp_rank: int) -> tuple[Captured, Any, dict]:
    """Every stage of tensor-parallel rank ``tp_rank``'s pipeline (codegen's passes: the
    plan checked against the graph, the graph rewritten for the plan's sharded regions,
    split by its stages), and the slices of the weights they hold (FQN -> ``ParamShard``).
    No weight is materialised here, and the collectives have no process group yet."""
    from tripar.codegen.build import build_pipeline
    from tripar.codegen.split import propagate_values

    size = plan.parallel.micro_batch_size
    micro = _for_micro_batch(captured, size)
    if ("values", size) not in captured.memo:
        captured.memo["values", size] = propagate_values(micro.gm, list(micro.constants))
    first, *_ = build_pipeline(micro.gm, plan, list(micro.constants), tp_rank=tp_rank,
                               materialize=False, values=captured.memo["values", size])
    return micro, first.split, dict(first.shards)


def _connect_tp(module: nn.Module, mesh: Any, tracker: Any) -> None:
    """Point a stage's tensor-parallel collectives at this job's tp group, and its
    tensor-parallel dropout at this rank's random stream."""
    from tripar.codegen.collectives import TPCollective
    from tripar.codegen.tp_rng import ForkedRNG

    for sub in module.modules():
        if isinstance(sub, TPCollective):
            sub.group = mesh.tp_group
        elif isinstance(sub, ForkedRNG):
            sub.tracker = tracker


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


def _build_rank(captured: Captured, split: Any, shards: dict, plan: Plan, mesh: Any, *,
                loss_fn: Callable | None, make_optimizer: Callable,
                max_grad_norm: float | None, precision: str, seed: int):
    from tripar.codegen.recompute import apply_recompute
    from tripar.codegen.split import block_nodes, rank_stages
    from tripar.codegen.tp_rng import tp_rng_tracker
    from tripar.codegen.weights import materialize_stage
    from tripar.plan.schedule import ActionKind
    from tripar.runtime.engine import BatchLayout, ParallelModel
    from tripar.runtime.executor import StageProgram
    from tripar.runtime.p2p import TensorSpec
    from tripar.runtime.precision import Autocast
    from tripar.runtime.tied import TiedWeight

    model, par = captured.model, plan.parallel
    # every name of each original tensor; the first is canonical
    names: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(fqn)
    canon = {fqn: group[0] for group in names.values() for fqn in group}
    aliases = {group[0]: tuple(group) for group in names.values()}
    on_meta = any(p.device.type == "meta" for p in model.parameters())

    holders: dict[str, set[int]] = {}
    for st in split.stages:
        for _, fqn in st.params:
            holders.setdefault(canon.get(fqn, fqn), set()).add(st.index % par.pp)
    tied = [TiedWeight(fqn, tuple(sorted(ranks))) for fqn, ranks in sorted(holders.items())
            if len(ranks) > 1]

    def spec(t: Any) -> TensorSpec:
        return TensorSpec(t.shape, getattr(torch, t.dtype))

    programs, local, buffers = [], [], {}
    shared: dict[str, nn.Parameter] = {}
    state_names = set(model.state_dict(keep_vars=True))
    tracker = tp_rng_tracker(seed, mesh.coords.tp, mesh.device) if par.tp > 1 else None
    blocks = block_nodes(captured.gm)
    # stages whose schedule recomputes them whole (its f and R actions: scp, full recompute)
    explicit = {a.stage for acts in plan.to_schedule().actions for a in acts
                if a.kind is ActionKind.RECOMPUTE}
    for st in rank_stages(split, par.pp, mesh.coords.pp):
        weights = {"meta_model": model, "seed": seed} if on_meta else {"source": model}
        module = materialize_stage(st, device=mesh.device, shards=shards, **weights)
        if par.tp > 1:
            _connect_tp(module, mesh, tracker)
        recompute = plan.stages[st.index].recompute
        if recompute and st.index not in explicit:  # the plan's blocks, checkpointed
            module = apply_recompute(st, recompute, blocks=blocks, module=module)
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
        keys = [captured.keys[i] for i in st.graph_input_positions]
        call: nn.Module = module
        if any(k is None for k in keys):
            call = _Bound(module, tuple((k is not None, captured.constants[i])
                                        for k, i in zip(keys, st.graph_input_positions)))
        if precision != "fp32":
            call = Autocast(call, precision, mesh.device)
        programs.append(StageProgram(
            stage=st.index, module=call, inputs=tuple(spec(t) for t in st.received),
            outputs=tuple(spec(t) for t in st.sent),
            batch_inputs=tuple(k for k in keys if k is not None)))

    held_buffers = {name for st in split.stages for name, _ in st.module.named_buffers()}
    extra = {} if on_meta else {k: v for k, v in model.state_dict().items()
                                if k not in held_buffers and canon.get(k, k) not in holders}
    example = captured.example
    fields = [(k, t) for k, t in (example.items() if isinstance(example, dict)
                                  else enumerate(example)) if isinstance(t, torch.Tensor)]
    layout = BatchLayout(captured.form, tuple((k, tuple(t.shape[1:]), t.dtype) for k, t in fields
                                              if k in set(captured.keys)),
                         par.global_batch_size)
    return ParallelModel(plan=plan, mesh=mesh, programs=programs, params=local, buffers=buffers,
                         aliases=aliases, tied=tied, layout=layout,
                         make_optimizer=make_optimizer, loss_fn=loss_fn,
                         max_grad_norm=max_grad_norm, extra_state=extra)


def _local_param(fqn: str, param: nn.Parameter, shard: Any, tp_rank: int):
    """What part of original tensor ``fqn`` this rank's ``param`` is: all of it, or the
    tensor-parallel slice ``shard`` (a ``ParamShard``: one box per fused part along its
    dim). A weight tensor parallelism leaves whole is counted on tp rank 0 only."""
    from tripar.runtime.engine import LocalParam

    if shard is None:
        whole = LocalParam.whole(fqn, param)
        return whole if tp_rank == 0 else dataclasses.replace(whole, counts=False)
    shape = list(param.shape)
    shape[shard.dim] = sum(stop - start for start, stop in shard.ranges) * shard.t
    full = tuple((0, n) for n in shape)
    boxes = tuple(full[:shard.dim] + (rng,) + full[shard.dim + 1:] for rng in shard.ranges)
    return LocalParam(fqn, param, tuple(shape), boxes, dim=shard.dim)
