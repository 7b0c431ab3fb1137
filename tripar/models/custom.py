"""``path/to/file.py:function`` MODEL specs: a user's own model.

The function is called with no arguments, except that parameters it names
``batch_size``, ``seq_len``, ``device`` or ``seed`` receive those values. It
returns one of

- ``module``, where the module has an ``example_inputs(batch_size, seq_len)``
  method returning the positional inputs (a tuple, or one tensor);
- ``(module, example_inputs)``;
- ``(module, example_inputs, example_kwargs)``.

With ``device="meta"`` the function runs under ``torch.device("meta")`` and
whatever it returns is moved to meta.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tripar.errors import ModelSpecError
from tripar.models.loaded import LoadedModel, seeded

CONTRACT = (
    "the function must return an nn.Module that has an example_inputs(batch_size, seq_len) "
    "method, or (module, example_inputs) or (module, example_inputs, example_kwargs), where "
    "example_inputs is a tuple of tensors and example_kwargs a dict of tensors for which "
    "forward returns the loss"
)


def import_file(path: str) -> Any:
    """Import a Python file as a fresh module (not added to ``sys.modules``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelSpecError(f"MODEL spec names {path!r}, which is not a file")
    name = f"tripar_user_model_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"cannot import {path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.resolve().parent))  # let the file import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise ModelSpecError(
            f"importing {path!r} failed: {type(error).__name__}: {error}"
        ) from error
    finally:
        sys.path.remove(str(file.resolve().parent))
    return module


def _call(function: Any, available: dict[str, Any]) -> Any:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        parameters = {}
    kwargs = {k: v for k, v in available.items() if k in parameters}
    return function(**kwargs)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def unpack(result: Any, *, where: str, batch_size: int, seq_len: int | None
           ) -> tuple[nn.Module, tuple, dict]:
    """Split what a model function returned into (module, inputs, kwargs)."""
    if isinstance(result, nn.Module):
        model, inputs, kwargs = result, None, {}
    elif isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], nn.Module):
        model, inputs = result[0], result[1]
        kwargs = result[2] if len(result) == 3 else {}
    else:
        raise ModelSpecError(f"{where} returned {type(result).__name__}; {CONTRACT}")
    if inputs is None:
        method = getattr(model, "example_inputs", None)
        if not callable(method):
            raise ModelSpecError(
                f"{where} returned only a {type(model).__name__} without an "
                f"example_inputs(batch_size, seq_len) method; {CONTRACT}"
            )
        inputs = method(batch_size, seq_len)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if not isinstance(inputs, tuple) or not isinstance(kwargs, dict):
        raise ModelSpecError(
            f"{where} gave example inputs of type {type(inputs).__name__} and kwargs of type "
            f"{type(kwargs).__name__}; {CONTRACT}"
        )
    return model, inputs, kwargs


def load_file_model(
    path: str, function_name: str, *, batch_size: int, seq_len: int | None,
    device: torch.device, seed: int,
) -> LoadedModel:
    """Build the model of a ``file.py:function`` spec."""
    module = import_file(path)
    function = getattr(module, function_name, None)
    where = f"{path}:{function_name}"
    if not callable(function):
        found = sorted(n for n, v in vars(module).items()
                       if callable(v) and not n.startswith("_") and inspect.isfunction(v))
        raise ModelSpecError(
            f"{path!r} has no function {function_name!r}; its functions: "
            f"{', '.join(found) or 'none'}"
        )
    available = {"batch_size": batch_size, "seq_len": seq_len, "device": str(device),
                 "seed": seed}
    with seeded(seed, device):
        if device.type == "meta":
            with torch.device("meta"):
                result = _call(function, available)
        else:
            result = _call(function, available)
        model, inputs, kwargs = unpack(result, where=where, batch_size=batch_size,
                                       seq_len=seq_len)
    model = model.to(device) if device.type != "meta" else model.to_empty(device="meta")
    inputs, kwargs = _to(inputs, device), _to(kwargs, device)
    sizes = getattr(getattr(model, "config", None), "sizes", None)  # zoo models have it
    config = dict(sizes()) if callable(sizes) else {}
    return LoadedModel(model=model, example_inputs=inputs, example_kwargs=kwargs,
                       config=config, spec=f"{path}:{function_name}", family="file")
