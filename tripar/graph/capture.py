"""Turn an ``nn.Module`` into a ``torch.fx.GraphModule``.

Two tracers are tried, in this order when ``method="auto"``:

- **fx**: ``torch.fx`` symbolic tracing with a tracer that keeps chosen modules
  whole (``leaf_modules``, given as types or FQNs). Fast, keeps ``call_module``
  nodes, and records each node's module stack in ``node.meta["nn_module_stack"]``.
- **export**: ``torch.export.export(model, args, kwargs, strict=False).module()``,
  for models FX cannot trace (data-dependent control flow, caches: Hugging Face
  models). Its nodes are ATen ops that carry ``nn_module_stack`` too.

Both trace with the model's key/value cache off: a transformers model left at its
default ``use_cache=True`` returns a cache object (``DynamicCache``) that no tracer can
carry and training never reads. Every ``config`` in the model with ``use_cache`` set
reads ``False`` while tracing, and the user's setting is restored afterwards.

Neither tracer runs the model's arithmetic on real data, so a model built
under ``torch.device("meta")`` is captured without allocating a weight. The
returned module records the tracer in ``gm.meta["tripar_tracer"]`` and why it
was chosen in ``gm.meta["tripar_tracer_reason"]``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import sys
import traceback
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
import torch.fx._pytree as fx_pytree
from torch import nn

from tripar.errors import CaptureError, PlanError, TriparError

_METHODS = ("auto", "fx", "export")
_TORCH_DIR = os.path.dirname(torch.__file__)


class _LeafTracer(torch.fx.Tracer):
    """An FX tracer that also keeps ``leaf_modules`` (types or FQNs) whole."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]) -> None:
        super().__init__()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if module_qualified_name in self._leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


@contextlib.contextmanager
def caches_off(model: nn.Module) -> Iterator[None]:
    """Within the block, ``use_cache`` is False on every module's ``config`` that has it
    set (transformers models); each config's own value is restored afterwards.

    >>> import types, torch
    >>> model = torch.nn.Linear(2, 2)
    >>> model.config = types.SimpleNamespace(use_cache=True)
    >>> with caches_off(model):
    ...     model.config.use_cache
    False
    >>> model.config.use_cache
    True
    """
    configs = {id(c): c for m in model.modules()
               if getattr(c := getattr(m, "config", None), "use_cache", False) is True}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


def _split_leaves(leaf_modules: Iterable[type | str]) -> tuple[tuple[type, ...], frozenset[str]]:
    types, names = [], []
    for leaf in leaf_modules:
        if isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        elif isinstance(leaf, str):
            names.append(leaf)
        else:
            raise CaptureError(
                f"leaf_modules entries must be nn.Module subclasses or module FQNs, got {leaf!r}"
            )
    return tuple(types), frozenset(names)


def _where_in_user_code(error: BaseException) -> str:
    """``file.py:line (`code`)`` of the deepest traceback frame outside torch, or ``""``."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if not frame.filename.startswith(_TORCH_DIR) and "tripar/graph" not in frame.filename:
            code = (frame.line or "").strip()
            if len(code) > 80:
                code = code[:77] + "..."
            return f"{os.path.basename(frame.filename)}:{frame.lineno}" + (
                f" (`{code}`)" if code else "")
    return ""


def _summary(error: BaseException) -> str:
    """The first line of an error, shortened: what a user needs to recognise it."""
    text = str(error).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), "")
    if len(first) > 240:
        first = first[:237] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _describe_failure(tracer: str, error: BaseException, module: str, module_type: str) -> str:
    where = f"module '{module}' ({module_type})" if module else "the top-level module"
    line = _where_in_user_code(error)
    at = f" at {line}" if line else ""
    return f"{tracer}: failed in {where}{at}: {_summary(error)}"


def _bind_concrete(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> dict:
    """Concrete values for the ``forward`` parameters the example does not give.

    FX would otherwise turn an omitted ``targets=None`` into a placeholder and
    trace the ``if targets is not None`` branch.
    """
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    concrete = {}
    params = list(signature.parameters.values())
    for index, param in enumerate(params):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        given = index < len(args) or param.name in kwargs
        if not given and param.default is not param.empty:
            concrete[param.name] = param.default
    return concrete


def _trace_fx(
    model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any],
    leaf_types: tuple[type, ...], leaf_names: frozenset[str],
) -> torch.fx.GraphModule:
    tracer = _LeafTracer(leaf_types, leaf_names)
    concrete = _bind_concrete(model, args, kwargs)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as error:  # noqa: BLE001 - any tracing failure is reported
        stack = list(tracer.module_stack.values())
        module, module_type = ("", "")
        if stack:
            module, kind = stack[-1]
            module_type = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        raise _TracerFailure(_describe_failure("fx", error, module, module_type)) from error
    name = type(model).__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


class _TracerFailure(Exception):
    """One tracer's failure, already summarised."""

    details: str = ""
    """What the tracer printed while it failed (torch.export prints its partial graph)."""


@contextlib.contextmanager
def _quiet_torch(sink: io.StringIO) -> Iterator[None]:
    """Collect what torch writes to stderr and mute its log records for the duration: a
    failed ``torch.export`` prints its partial graph and warnings, which the CaptureError
    summarises (the full text is in ``CaptureError.details``)."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.redirect_stderr(sink):
            yield
    finally:
        logger.setLevel(level)


def _trace_export(
    model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]
) -> torch.fx.GraphModule:
    names = {id(m): (fqn, type(m).__name__) for fqn, m in model.named_modules()}
    stack: list[tuple[str, str]] = []
    failed_at: list[tuple[str, str]] = []

    def pre_hook(module: nn.Module, _inputs: Any) -> None:
        if id(module) in names:
            stack.append(names[id(module)])

    def post_hook(module: nn.Module, _inputs: Any, _output: Any) -> None:
        if id(module) in names and stack:
            stack.pop()

    handles = [
        torch.nn.modules.module.register_module_forward_pre_hook(pre_hook),
        torch.nn.modules.module.register_module_forward_hook(post_hook),
    ]
    noise = io.StringIO()
    try:
        with _quiet_torch(noise):
            program = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    except Exception as error:  # noqa: BLE001 - any tracing failure is reported
        failed_at.extend(stack)
        module, module_type = failed_at[-1] if failed_at else ("", "")
        failure = _TracerFailure(_describe_failure("export", error, module, module_type))
        failure.details = noise.getvalue()
        raise failure from error
    finally:
        for handle in handles:
            handle.remove()
    if noise.getvalue():
        sys.stderr.write(noise.getvalue())  # what a successful export said, as it said it
    gm = program.module()
    if not isinstance(gm, torch.fx.GraphModule):  # pragma: no cover - torch API drift
        raise _TracerFailure(f"export: .module() returned {type(gm).__name__}, not a GraphModule")
    return gm


def capture(
    model: nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    leaf_modules: Iterable[type | str] = (),
    method: str = "auto",
) -> torch.fx.GraphModule:
    """Trace ``model`` into a GraphModule (FX first, ``torch.export`` as fallback).

    ``leaf_modules`` (types or FQNs) stay single ``call_module`` nodes under FX
    (export inlines every module).
    ``gm.meta["tripar_tracer"]`` says which tracer produced the graph and
    ``gm.meta["tripar_tracer_reason"]`` why. Raises CaptureError, naming where
    each tracer failed, when no tracer succeeds.

    >>> import torch
    >>> with torch.device("meta"):
    ...     model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    >>> gm = capture(model, (torch.empty(2, 4, device="meta"),))
    >>> gm.meta["tripar_tracer"], [n.op for n in gm.graph.nodes]
    ('fx', ['placeholder', 'call_module', 'call_module', 'output'])
    """
    if method not in _METHODS:
        raise CaptureError(f"capture method must be one of {', '.join(_METHODS)}, got {method!r}")
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture needs an nn.Module, got {type(model).__name__}")
    args = tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    leaf_types, leaf_names = _split_leaves(leaf_modules)
    with caches_off(model):
        return _capture(model, args, kwargs, leaf_types, leaf_names, method)


_DROPOUTS = {  # function -> position of its ``training`` argument (named ``training`` or ``train``)
    torch.nn.functional.dropout: 2, torch.nn.functional.alpha_dropout: 2,
    torch.nn.functional.feature_alpha_dropout: 2, torch.nn.functional.dropout1d: 2,
    torch.nn.functional.dropout2d: 2, torch.nn.functional.dropout3d: 2, torch.dropout: 2,
    torch.ops.aten.dropout.default: 2, torch.ops.aten.native_dropout.default: 2,
}


def dropouts_follow_mode(gm: torch.fx.GraphModule) -> int:
    """Make each functional dropout traced in training mode read the module's mode.

    A model that calls ``F.dropout(x, p, training=self.training)`` (transformers'
    attention does) is traced with ``training=True`` written into the graph, so the
    captured module would keep dropping in ``eval()``. Each such argument becomes a
    ``get_attr`` of ``training``: the graph module's own mode, and each stage's once the
    graph is split. Returns how many dropouts were rewired.

    >>> import torch.nn.functional as F
    >>> class Net(nn.Module):
    ...     def forward(self, x):
    ...         return F.dropout(x, 0.5, training=self.training)
    >>> gm = torch.fx.symbolic_trace(Net())
    >>> dropouts_follow_mode(gm), bool((gm.eval()(torch.ones(8)) == 1).all())
    (1, True)
    """
    rewired = 0
    for node in list(gm.graph.nodes):
        index = _DROPOUTS.get(node.target) if node.op == "call_function" else None
        if index is None:
            continue
        key = next((k for k in ("training", "train") if k in node.kwargs), None)
        given = node.kwargs[key] if key else node.args[index] if len(node.args) > index else None
        if given is not True:
            continue  # left out (the function's default, as the model wrote it), or False
        with gm.graph.inserting_before(node):
            mode = gm.graph.create_node("get_attr", "training")  # a flag, not a tensor
        if key:
            node.update_kwarg(key, mode)
        else:
            node.update_arg(index, mode)
        rewired += 1
    if rewired:
        gm.recompile()
    return rewired


def _capture(model: nn.Module, args: tuple, kwargs: dict, leaf_types: tuple[type, ...],
             leaf_names: frozenset[str], method: str) -> torch.fx.GraphModule:
    gm = _traced(model, args, kwargs, leaf_types, leaf_names, method)
    dropouts_follow_mode(gm)
    return gm


def _traced(model: nn.Module, args: tuple, kwargs: dict, leaf_types: tuple[type, ...],
            leaf_names: frozenset[str], method: str) -> torch.fx.GraphModule:
    failures: list[str] = []
    details: list[str] = []
    if method in ("auto", "fx"):
        try:
            gm = _trace_fx(model, args, kwargs, leaf_types, leaf_names)
        except _TracerFailure as failure:
            failures.append(str(failure))
        else:
            gm.meta["tripar_tracer"] = "fx"
            gm.meta["tripar_tracer_reason"] = (
                "fx: traced" if method == "auto" else "fx: requested with method='fx'"
            )
            return gm
    if method in ("auto", "export"):
        try:
            gm = _trace_export(model, args, kwargs)
        except _TracerFailure as failure:
            failures.append(str(failure))
            details.append(failure.details)
        else:
            gm.meta["tripar_tracer"] = "export"
            gm.meta["tripar_tracer_reason"] = (
                f"{failures[0]}; fell back to export" if failures
                else "export: requested with method='export'"
            )
            return gm
    tried = " and ".join(f.split(":", 1)[0] for f in failures)
    error = CaptureError(
        f"could not capture {type(model).__name__} with {tried}:\n  "
        + "\n  ".join(failures)
        + "\nfix: mark the failing module as a leaf (leaf_modules=[...]), or remove the "
        "data-dependent control flow it uses"
    )
    error.details = "\n".join(details)
    raise error


def flat_graph_inputs(gm: torch.fx.GraphModule, args: Sequence[Any] = (),
                      kwargs: dict[str, Any] | None = None, *,
                      error: type[TriparError] = PlanError) -> list[Any]:
    """The values of ``gm``'s placeholders, in order, for a call ``gm(*args, **kwargs)``;
    a placeholder no argument gives takes its default. Raises ``error`` (``annotate``
    raises CaptureError) when the arguments do not fit the captured forward.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(lambda x, y: x + y)
    >>> flat_graph_inputs(gm, (1,), {"y": 2})
    [1, 2]
    """
    kwargs = dict(kwargs or {})
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "in_spec", None)
    if spec is not None:
        return list(fx_pytree.tree_flatten_spec((tuple(args), kwargs), spec))
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise error(f"the inputs do not match the captured forward: {exc}") from None
    bound.apply_defaults()
    values = []
    for node in gm.graph.find_nodes(op="placeholder"):
        name = str(node.target).lstrip("*")
        if name in bound.arguments:
            values.append(bound.arguments[name])
        elif node.args:  # the placeholder's default
            values.append(node.args[0])
        else:
            raise error(f"no value for graph input {name!r}, which has no default; pass one")
    return values
