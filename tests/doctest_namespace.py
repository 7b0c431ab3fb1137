"""The package's doctests: ``example_graph`` in every example's namespace.

``example_graph`` is the hand-built GPT-like proxy graph of
:mod:`tripar.partitioner.examples` that the partitioner's doctests plan; as numpy's
conftest puts ``np`` in its doctests' namespace, this puts it in ours. A pytest plugin
(``-p tests.doctest_namespace`` in pyproject's addopts), so that the installed package
ships no conftest.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _example_graph(doctest_namespace: dict) -> None:
    from tripar.partitioner.examples import example_graph

    doctest_namespace["example_graph"] = example_graph
