"""Give a stage program its own weights: only the tensors that stage holds.

Two sources:

- **A real model** (:func:`materialize_stage` with ``source=``): the stage's
  tensors are copied from the model's, looked up by FQN.
- **A model built on the meta device** (``meta_model=``): the stage's tensors
  are allocated on the CPU and initialised with the model's own initialisation
  (its ``init_weights()``, else every module's ``reset_parameters()`` in
  ``modules()`` order), run under ``torch.manual_seed(seed)`` on a private copy
  of the meta model where only this stage's parameters (and the model's
  buffers, which are small) are real. The result equals the same tensors of a
  full CPU build initialised the same way (``to_empty("cpu")``,
  ``torch.manual_seed(seed)``, ``init_weights()``: what ``load_model`` does),
  because the random stream is replayed exactly: every random fill of a tensor
  that stays on meta is run on a scratch CPU tensor of the same shape, which
  draws the same numbers and is dropped at once. Peak memory is the stage's
  own weights plus the largest single parameter; time is that of initialising
  the whole model once. A model too large for one machine is never built whole.

:func:`param_map` records, for each stage, local parameter name -> original FQN
(and the slice, once tensor parallelism shards weights), as JSON.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from tripar.codegen.split import StageProgram, StageSplit
from tripar.codegen.tp_shard import take_shard
from tripar.errors import PlanError


class _ReplayRandomOnMeta(TorchDispatchMode):
    """Run every seeded random op that touches a meta tensor on scratch CPU tensors
    instead, so the CPU generator advances exactly as if the tensor were real."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in func.tags or not _touches_meta(args, kwargs):
            return func(*args, **kwargs)

        def scratch(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                return torch.empty_strided(tuple(value.shape), tuple(value.stride()),
                                           dtype=value.dtype, device="cpu")
            if isinstance(value, torch.device) and value.type == "meta":
                return torch.device("cpu")
            return value

        cpu_args, cpu_kwargs = tree_map(scratch, (args, kwargs))
        result = func(*cpu_args, **cpu_kwargs)  # draws the numbers, on the CPU generator
        if func._schema.is_mutable and args and isinstance(args[0], torch.Tensor):
            return args[0]  # an in-place fill: the meta tensor stays as it was
        return tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, result)


def _touches_meta(args: Any, kwargs: Any) -> bool:
    found = []

    def visit(value: Any) -> Any:
        if (isinstance(value, torch.Tensor) and value.device.type == "meta") or (
                isinstance(value, torch.device) and value.type == "meta"):
            found.append(value)
        return value

    tree_map(visit, (args, kwargs))
    return bool(found)


def default_init(model: nn.Module) -> None:
    """``model.init_weights()`` if it has one, else ``reset_parameters()`` of every
    module that has one, in ``model.modules()`` order."""
    if callable(getattr(model, "init_weights", None)):
        model.init_weights()
        return
    for module in model.modules():
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()


def init_tensors(
    meta_model: nn.Module,
    fqns: Iterable[str],
    *,
    init: Callable[[nn.Module], None] = default_init,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Initialise only the parameters named ``fqns`` of a meta-built model, on the CPU.

    Returns FQN -> tensor (a parameter stays an ``nn.Parameter``). As with
    ``to_empty``, tied parameters come apart before the init runs; names share one
    tensor afterwards only where the init ties them again. Buffers may be asked for
    too. ``meta_model`` is not changed.

    >>> import torch
    >>> with torch.device("meta"):
    ...     net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    >>> mine = init_tensors(net, ["1.weight"], seed=7)
    >>> full = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    >>> _ = torch.manual_seed(7)
    >>> _ = [m.reset_parameters() for m in full.modules() if hasattr(m, "reset_parameters")]
    >>> torch.equal(mine["1.weight"], full[1].weight)
    True
    """
    model = copy.deepcopy(meta_model)
    named: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    wanted = list(dict.fromkeys(fqns))
    unknown = [f for f in wanted if f not in named]
    if unknown:
        raise PlanError(f"the model has no parameter or buffer {unknown[:5]}; the stage was "
                        "split from another model, or from a graph with constants of its own")
    keep = {id(named[f]) for f in wanted}
    real: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            # one tensor per slot, as ``to_empty`` makes: a tied parameter comes apart
            # until the init ties it again, exactly as in a full build
            if param is not None and id(param) in keep:
                module._parameters[name] = nn.Parameter(torch.empty_like(param, device="cpu"),
                                                        requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:  # buffers are small and inits compute them from each other
                if id(buffer) not in real:
                    real[id(buffer)] = torch.empty_like(buffer, device="cpu")
                module._buffers[name] = real[id(buffer)]
    with torch.random.fork_rng(devices=[]), _ReplayRandomOnMeta(), torch.no_grad():
        torch.manual_seed(seed)
        init(model)
    # init may re-tie (``lm_head.weight = wte.weight``): read the tensors after it ran
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    out = {}
    for fqn in wanted:
        tensor = named[fqn]
        if tensor.device.type == "meta":
            raise PlanError(f"{fqn} is still on the meta device after init; the init function "
                            "replaced it with a new tensor, so it cannot be initialised alone")
        out[fqn] = tensor
    return out


def _slots(module: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor, bool]]:
    """(owner, attribute, local name, tensor, is_parameter) of every tensor of ``module``."""
    slots = []
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for name, param in owner._parameters.items():
            if param is not None:
                slots.append((owner, name, f"{prefix}.{name}" if prefix else name, param, True))
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                slots.append((owner, name, f"{prefix}.{name}" if prefix else name, buffer, False))
    return slots


def materialize_stage(
    stage: StageProgram,
    *,
    source: nn.Module | None = None,
    meta_model: nn.Module | None = None,
    init: Callable[[nn.Module], None] = default_init,
    seed: int = 0,
    device: torch.device | str = "cpu",
    shards: Mapping[str, Any] | None = None,
) -> torch.fx.GraphModule:
    """A copy of ``stage.module`` holding its own tensors, from ``source`` (a real model:
    copied) or ``meta_model`` (initialised locally, see the module docstring).

    Tensors of the graph that the model does not have (constants lifted by
    ``torch.export``) are copied from the stage's graph; they must be real. Tied
    parameters within the stage stay one tensor. ``shards`` (FQN ->
    ``tripar.codegen.tp_shard.ParamShard``) cuts this tensor-parallel rank's slice of
    each weight a tensor-parallel stage holds sliced; the full tensor of such a weight
    exists only while it is cut (as Megatron's CPU initialisation does).
    """
    if (source is None) == (meta_model is None):
        raise PlanError("materialize_stage needs exactly one of source= (a real model) or "
                        "meta_model= (a model built on the meta device)")
    model = source if source is not None else meta_model
    assert model is not None
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    names |= set(dict(model.named_buffers(remove_duplicate=False)))
    fqn_of = dict(stage.params)
    module = copy.deepcopy(stage.module)
    slots = _slots(module)
    wanted = [fqn_of.get(local, local) for _, _, local, _, _ in slots]
    wanted = [f for f in wanted if f in names]
    if source is not None:
        found: dict[str, torch.Tensor] = dict(source.named_parameters(remove_duplicate=False))
        found.update(source.named_buffers(remove_duplicate=False))
        tensors = {f: found[f] for f in wanted}
    else:
        tensors = init_tensors(meta_model, wanted, init=init, seed=seed)  # type: ignore[arg-type]
    target = torch.device(device)
    made: dict[int, torch.Tensor] = {}
    for owner, attr, local, tensor, is_param in slots:
        fqn = fqn_of.get(local, local)
        if fqn in tensors:
            value = tensors[fqn]
        elif tensor.device.type == "meta":
            raise PlanError(f"stage {stage.index}: {local} is on the meta device and the model "
                            "has no tensor of that name; capture the model with real "
                            "constants, or give source= a real model")
        else:
            value = tensor
        key = id(tensor)  # the stage's own sharing (ties within the stage) decides identity
        if key not in made:
            cut = (shards or {}).get(fqn)
            if cut is not None and tuple(value.shape) != tuple(tensor.shape):
                value = take_shard(value.detach(), cut.dim, tuple(cut.parts), cut.t, cut.rank)
            if tuple(value.shape) != tuple(tensor.shape):
                raise PlanError(f"stage {stage.index}: {local} ({fqn}) has shape "
                                f"{tuple(tensor.shape)} in the stage but {tuple(value.shape)} in "
                                "the model; the stage was split from another model, or a "
                                "tensor-parallel slice is missing from shards=")
            data = value.detach().to(target, copy=True)
            made[key] = nn.Parameter(data, requires_grad=tensor.requires_grad) if is_param \
                else data
        if is_param:
            owner._parameters[attr] = made[key]
        else:
            owner._buffers[attr] = made[key]
    retarget_device(module, target)
    return module


def retarget_device(module: torch.fx.GraphModule, device: torch.device) -> int:
    """Rewrite device constants baked into the graph (``torch.export`` of a meta-built
    model records ``device=meta`` in ``arange``, ``to`` and asserts) to ``device``.
    Returns how many arguments changed."""
    changed = 0

    def swap(value: Any) -> Any:
        nonlocal changed
        if isinstance(value, torch.device) and value != device and value.type == "meta":
            changed += 1
            return device
        return value

    for node in module.graph.nodes:
        node.args = tree_map(swap, node.args)
        node.kwargs = tree_map(swap, node.kwargs)
    if changed:
        module.recompile()
    return changed


def param_map(split: StageSplit, *, slices: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per stage: local parameter name -> original FQN, shape, and whether its gradient is
    summed with other stages'; plus the tied groups. JSON-ready.

    ``slices`` (FQN -> description) records how tensor parallelism slices a weight.

    >>> import torch
    >>> from tripar.codegen.split import split_stages
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    >>> m = param_map(split_stages(gm, [["_0"]], [torch.randn(1, 2)]))
    >>> m["stages"][0]["params"]["0.weight"]
    {'fqn': '0.weight', 'shape': [2, 2], 'dtype': 'float32', 'replica': False, 'slice': None}
    """
    stages = []
    for stage in split.stages:
        tensors = dict(stage.module.named_parameters(remove_duplicate=False))
        entries = {}
        for local, fqn in stage.params:
            tensor = tensors[local]
            entries[local] = {
                "fqn": fqn,
                "shape": list(tensor.shape),
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "replica": local in stage.replicas,
                "slice": (slices or {}).get(fqn),
            }
        stages.append({"index": stage.index, "blocks": list(stage.blocks), "params": entries})
    return {"stages": stages,
            "tied": [{"fqns": list(g.fqns), "stages": list(g.stages)} for g in split.tied]}


def param_map_json(split: StageSplit, **kwargs: Any) -> str:
    """:func:`param_map` as indented JSON text."""
    return json.dumps(param_map(split, **kwargs), indent=2, sort_keys=True)
