"""Checks of field values that the plan's records and the Plan share; each raises PlanError
naming the record, the field and the value it got."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from tripar.errors import PlanError


def check(condition: bool, message: str) -> None:
    if not condition:
        raise PlanError(message)


def nonneg_int(owner: str, **values: Any) -> None:
    for name, value in values.items():
        check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
              f"{owner}.{name} must be an integer >= 0, got {value!r}")


def pos_int(owner: str, **values: Any) -> None:
    for name, value in values.items():
        check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
              f"{owner}.{name} must be a positive integer, got {value!r}")


def nonneg_float(owner: str, **values: Any) -> None:
    for name, value in values.items():
        check(isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value) and value >= 0,
              f"{owner}.{name} must be a finite number >= 0, got {value!r}")


def strs(owner: str, name: str, value: Any) -> None:
    check(isinstance(value, tuple) and all(isinstance(v, str) for v in value),
          f"{owner}.{name} must be a tuple of strings, got {value!r}")


def dupes(names: Iterable[str]) -> list[str]:
    """The names that occur more than once, each once, in order of their second occurrence.

    >>> dupes(["a", "b", "a", "c", "b", "a"])
    ['a', 'b']
    """
    seen, out = set(), []
    for name in names:
        if name in seen and name not in out:
            out.append(name)
        seen.add(name)
    return out
