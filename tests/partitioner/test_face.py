"""The package face: every name it lists resolves, and names load on first use."""

from __future__ import annotations

import subprocess
import sys

import tripar.partitioner as face


def test_every_listed_name_resolves():
    assert face.__all__ == sorted(face.__all__)
    for name in face.__all__:
        assert getattr(face, name) is not None, name
    assert callable(face.search) and face.search.__module__.endswith("plan_search.driver")


def test_the_simulator_loads_without_the_search_or_torch():
    """``tripar show`` replays a schedule: the face must not pull the search, the graph
    layer or torch in with it."""
    code = ("import sys\n"
            "from tripar.partitioner import StageCost, build_schedule, simulate\n"
            "loaded = [m for m in ('torch', 'tripar.graph', 'tripar.partitioner.plan_search')\n"
            "          if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True)
