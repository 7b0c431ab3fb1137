"""The package's doctests: ``example_graph`` in every example's namespace.

``example_graph`` is the hand-built GPT-like proxy graph of
``tests/partitioner/example_graphs.py`` (a test fixture, not part of the package) that
the partitioner's doctests plan; as numpy's conftest puts ``np`` in its doctests'
namespace, this puts it in ours. A pytest plugin (``-p tests.doctest_namespace`` in
pyproject's addopts), so that the installed package ships no test code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HELPERS = Path(__file__).resolve().parent / "partitioner"


@pytest.fixture(autouse=True, scope="session")
def _example_graph(doctest_namespace: dict) -> None:
    if str(_HELPERS) not in sys.path:
        sys.path.insert(0, str(_HELPERS))
    from example_graphs import example_graph

    doctest_namespace["example_graph"] = example_graph
