"""tripar.partitioner: the plan for a proxy graph on a cluster.

What the next layers (the API, the commands, codegen, the runtime) use:

- hardware: ``Cluster``, ``DeviceSpec``, ``Efficiency``, ``BUILTIN_DEVICES`` and the
  calibration helpers (``hardware``);
- the cost model: ``block_costs``, ``stage_costs``, ``step_estimate`` (``cost/``);
- schedules and their simulation: ``build_schedule``, ``simulate``, ``draw_timeline``;
- the stage partition: ``PartitionProblem``, ``solve_partition_dp``,
  ``build_partition_milp`` (``partition/``);
- the search: ``search``, ``search_with_stats``, ``Pins`` and the baselines a plan is
  checked against (``plan_search/``);
- ``example_graph``, a hand-built GPT-like proxy graph for examples, tests and
  benchmarks (``examples``).

Names load on first use (as ``tripar``'s own do), so that ``tripar show`` imports the
simulator without the search, the graph layer or torch. A module inside this package
imports the module that defines a name, never this face.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BUILTIN_DEVICES": "tripar.partitioner.hardware",
    "Cluster": "tripar.partitioner.hardware",
    "DeviceSpec": "tripar.partitioner.hardware",
    "Efficiency": "tripar.partitioner.hardware",
    "builtin_device": "tripar.partitioner.hardware",
    "canonical_dtype": "tripar.partitioner.hardware",
    "dtype_bytes": "tripar.partitioner.hardware",
    "fit_matmul_times": "tripar.partitioner.hardware",
    "load_calibration": "tripar.partitioner.hardware",
    "BlockCost": "tripar.partitioner.cost.blocks",
    "StepEstimate": "tripar.partitioner.cost.step",
    "block_costs": "tripar.partitioner.cost.blocks",
    "stage_costs": "tripar.partitioner.cost.stages",
    "step_estimate": "tripar.partitioner.cost.step",
    "uniform_boundaries": "tripar.partitioner.cost.stages",
    "StageCost": "tripar.partitioner.stage_cost",
    "build_schedule": "tripar.partitioner.schedules",
    "SimResult": "tripar.partitioner.simulator",
    "simulate": "tripar.partitioner.simulator",
    "draw_timeline": "tripar.partitioner.timeline",
    "PartitionProblem": "tripar.partitioner.partition.problem",
    "solve_partition_dp": "tripar.partitioner.partition.dp",
    "build_partition_milp": "tripar.partitioner.partition.milp",
    "Evaluated": "tripar.partitioner.plan_search",
    "Pins": "tripar.partitioner.plan_search",
    "Spelling": "tripar.partitioner.plan_search",
    "check_pins": "tripar.partitioner.plan_search",
    "SearchStats": "tripar.partitioner.plan_search",
    "evaluate_split": "tripar.partitioner.plan_search",
    "partition_problem": "tripar.partitioner.plan_search",
    "search": "tripar.partitioner.plan_search",
    "search_with_stats": "tripar.partitioner.plan_search",
    "uniform_split_of": "tripar.partitioner.plan_search",
    "example_graph": "tripar.partitioner.examples",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value   # later lookups skip this function
        return value
    raise AttributeError(f"module 'tripar.partitioner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
