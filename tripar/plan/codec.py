"""The JSON form of a plan: a schema version, and dataclass fields read by their type hints.

``encode`` turns a record into plain JSON data (lists for tuples, values for enums);
``decode`` rebuilds a record from such data, checking every field against its type hint
and naming the path of anything wrong; ``parse_json`` reads the text, turning every way it
can be corrupt into a PlanError. The codec knows dataclasses, tuples, enums and scalars,
not the Plan: ``Plan.from_dict`` hands it the class to build.

>>> from tripar.plan.records import Inputs
>>> encode(Inputs(global_batch_size=8, seq_len=512))
{'global_batch_size': 8, 'seq_len': 512, 'dtype': 'bf16'}
>>> decode(Inputs, parse_json('{"global_batch_size": 8, "seq_len": 512}'), "inputs")
Inputs(global_batch_size=8, seq_len=512, dtype='bf16')
>>> decode(Inputs, {"global_batch_size": 8, "seq_len": "long"}, "inputs")
Traceback (most recent call last):
...
tripar.errors.PlanError: inputs.seq_len: expected an integer, got "long"
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from typing import Any, TypeVar

from tripar.errors import PlanError, TriparError

SCHEMA_VERSION = 1
"""Version of the JSON layout; a plan of another version is refused, not guessed at."""

T = TypeVar("T")


def encode(value: Any) -> Any:
    """Plain JSON-able data of a record: dicts of its fields, lists for tuples, values for
    enums."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [encode(v) for v in value]
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


_KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def decode(hint: Any, data: Any, path: str) -> Any:
    """The value of type ``hint`` that ``data`` (from ``encode``, through JSON) holds; a
    field of the wrong type, missing or unknown raises PlanError naming its ``path``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if data is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return decode(inner[0], data, path)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(data, list):
            raise PlanError(f"{path}: expected a list, got {json.dumps(data)[:60]}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v, f"{path}[{i}]") for i, v in enumerate(data))
        if len(args) != len(data):
            raise PlanError(f"{path}: expected {len(args)} items, got {len(data)}")
        return tuple(decode(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, data)))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(data)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in hint)
            raise PlanError(f"{path}: {data!r} is not one of {allowed}") from None
    if dataclasses.is_dataclass(hint):
        if not isinstance(data, dict):
            raise PlanError(f"{path}: expected an object, got {json.dumps(data)[:60]}")
        fields = {f.name: f for f in dataclasses.fields(hint)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise PlanError(f"{path}: unknown field {unknown[0]!r} (a newer or corrupt plan?)")
        hints = _hints(hint)
        kwargs = {}
        for name, f in fields.items():
            if name not in data:
                if (f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING):
                    raise PlanError(f"{path}: missing field {name!r}")
                continue
            kwargs[name] = decode(hints[name], data[name], f"{path}.{name}")
        try:
            return hint(**kwargs)
        except PlanError as error:
            raise PlanError(f"{path}: {error}") from None
        except TriparError as error:  # ParallelConfig raises ConfigError
            raise PlanError(f"{path}: {error}") from None
    if hint is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise PlanError(f"{path}: expected a number, got {json.dumps(data)[:60]}")
        return float(data)
    if hint in (int, str, bool):
        if isinstance(data, bool) != (hint is bool) or not isinstance(data, hint):
            raise PlanError(f"{path}: expected {_KIND_WORDS[hint]}, got {json.dumps(data)[:60]}")
        return data
    raise AssertionError(f"no JSON decoding for {hint!r} at {path}")


def parse_json(text: str) -> Any:
    """The JSON data in ``text``; truncated or corrupt text raises PlanError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise PlanError(f"plan JSON is corrupt or truncated at line {error.lineno} column "
                        f"{error.colno} ({error.msg}); re-create it with `tripar plan`"
                        ) from None
    except (ValueError, RecursionError) as error:  # absurd nesting or number lengths
        raise PlanError(f"plan JSON is corrupt ({type(error).__name__}: "
                        f"{str(error)[:80]}); re-create it with `tripar plan`") from None


def decode_plan(cls: type[T], data: Any) -> T:
    """A plan of class ``cls`` from JSON data, after checking it is a plan of this
    schema version."""
    if not isinstance(data, dict):
        raise PlanError(f"a plan is a JSON object, got {type(data).__name__}")
    if "schema_version" not in data:
        raise PlanError("not a tripar plan: the JSON has no 'schema_version'")
    version = data["schema_version"]
    if version != SCHEMA_VERSION:
        raise PlanError(f"plan schema version {version!r}; this tripar reads version "
                        f"{SCHEMA_VERSION}: re-create the plan with `tripar plan`")
    return decode(cls, data, "plan")
