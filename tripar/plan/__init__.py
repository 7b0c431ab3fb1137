"""tripar.plan: the IR every layer shares, and the names the next layers use.

A Plan (``plan``) is frozen records of plain values (``records``) with a parallel
configuration (``config``) and a pipeline schedule in action form (``schedule``). It
round-trips through JSON (``codec``) and prints as text (``render``, with the number
formats of ``units``). Everything here is the standard library and plain data: importing
it loads neither torch nor ``torch.distributed``.
"""

from tripar.plan.config import RECOMPUTE, SCHEDULES, ParallelConfig
from tripar.plan.plan import Plan, model_fingerprint
from tripar.plan.records import (
    Alternative,
    Binding,
    ClusterInfo,
    Estimate,
    Inputs,
    ModelInfo,
    SolverRun,
    StagePlan,
    TPShard,
)
from tripar.plan.render import fmt_device_memory, fmt_estimate, fmt_parallel
from tripar.plan.schedule import Action, ActionKind, Schedule, format_grid
from tripar.plan.units import fmt_bytes, fmt_time

__all__ = [
    "RECOMPUTE",
    "SCHEDULES",
    "Action",
    "ActionKind",
    "Alternative",
    "Binding",
    "ClusterInfo",
    "Estimate",
    "Inputs",
    "ModelInfo",
    "ParallelConfig",
    "Plan",
    "Schedule",
    "SolverRun",
    "StagePlan",
    "TPShard",
    "fmt_bytes",
    "fmt_device_memory",
    "fmt_estimate",
    "fmt_parallel",
    "fmt_time",
    "format_grid",
    "model_fingerprint",
]
