"""The hand-built proxy graph of :mod:`tripar.partitioner.examples`, importable by name
from this folder's tests (``tests/partitioner/conftest.py`` puts the folder on the path)."""

from __future__ import annotations

from tripar.partitioner.examples import example_graph

__all__ = ["example_graph"]
