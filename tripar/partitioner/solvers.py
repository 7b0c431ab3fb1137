"""The MILP solvers behind pulp: HiGHS when ``highspy`` imports, else CBC.

:func:`run_solver` solves a built ``pulp.LpProblem`` and records which solver ran, the
status it reported, the objective and the time (:class:`SolveRecord`), never hiding a
non-optimal status. The stage partition's MILP
(:mod:`tripar.partitioner.partition.milp`) and the tensor-parallel region choice
(:mod:`tripar.partitioner.tp_choice`) both solve through it.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from dataclasses import dataclass

import pulp

from tripar.errors import PlanError

MIP_REL_GAP = 1e-9
"""Relative optimality gap asked of the solver: the answer is optimal, not nearly."""


@functools.cache
def highs_available() -> bool:
    """Whether pulp can drive HiGHS through ``highspy`` (checked once per process).

    HiGHS prints a banner on stdout the first time it is created in a process;
    this swallows it so ``tripar plan --format json`` keeps stdout to one object.

    >>> isinstance(highs_available(), bool)
    True
    """
    try:
        import highspy
    except ImportError:
        return False
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (embedded interpreters): let it print
        highspy.Highs()
        return pulp.HiGHS().available()
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return bool(pulp.HiGHS().available())


def make_solver(name: str = "auto", *, time_limit_s: float | None = None):
    """A pulp solver: ``"highs"``, ``"cbc"``, or ``"auto"`` (HiGHS when highspy imports).

    >>> make_solver("cbc").name
    'PULP_CBC_CMD'
    """
    if name == "auto":
        name = "highs" if highs_available() else "cbc"
    if name == "highs":
        if not highs_available():
            raise PlanError("solver 'highs' needs the highspy package (pip install highspy); "
                            "use solver 'cbc' instead")
        return pulp.HiGHS(msg=False, gapRel=MIP_REL_GAP, gapAbs=0.0, timeLimit=time_limit_s,
                          threads=1)
    if name == "cbc":
        return pulp.PULP_CBC_CMD(msg=False, gapRel=MIP_REL_GAP, gapAbs=0.0,
                                 timeLimit=time_limit_s, threads=1)
    raise PlanError(f"unknown MILP solver {name!r}; choose auto, highs or cbc")


@dataclass(frozen=True, slots=True)
class SolveRecord:
    """Solver provenance: which solver, what it said, the objective and the time."""

    solver: str
    status: str
    """``optimal``, ``infeasible``, ``not-optimal`` (stopped early with a solution),
    ``unbounded`` or ``not-solved``."""
    objective: float
    solve_time_s: float


def run_solver(lp: pulp.LpProblem, solver: str = "auto", *,
               time_limit_s: float | None = None) -> SolveRecord:
    """Solve ``lp`` and say how it went; never hides a non-optimal status."""
    backend = make_solver(solver, time_limit_s=time_limit_s)
    start = time.perf_counter()
    code = lp.solve(backend)
    elapsed = time.perf_counter() - start
    if code == pulp.LpStatusOptimal and lp.sol_status == pulp.LpSolutionOptimal:
        status = "optimal"
    elif lp.sol_status == pulp.LpSolutionIntegerFeasible:
        status = "not-optimal"
    elif code == pulp.LpStatusInfeasible or lp.sol_status == pulp.LpSolutionInfeasible:
        status = "infeasible"
    elif code == pulp.LpStatusUnbounded:
        status = "unbounded"
    else:
        status = "not-solved"
    objective = pulp.value(lp.objective)
    return SolveRecord(backend.name, status,
                       float(objective) if objective is not None else math.nan, elapsed)
