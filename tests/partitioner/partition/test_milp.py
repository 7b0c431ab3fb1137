"""The partition MILP against the DP, its solvers, its LP text and its refusals."""

from __future__ import annotations

import random

import pytest
from random_problems import random_problem

from tripar.errors import InfeasibleError, PlanError
from tripar.partitioner.partition.dp import solve_partition_dp
from tripar.partitioner.partition.milp import build_partition_milp, solve_partition_milp
from tripar.partitioner.partition.problem import PartitionProblem
from tripar.partitioner.solvers import highs_available


def test_milp_matches_dp_on_random_cases():
    rng = random.Random(7)
    compared = infeasible = 0
    for i in range(36):
        n = rng.randint(2, 12)
        k = rng.randint(1, min(n, 4))
        policy = "stage-aware" if i % 4 else rng.choice(["none", "full"])
        prob = random_problem(rng, n, k, recompute=policy)
        try:
            dp = solve_partition_dp(prob)
        except InfeasibleError:
            with pytest.raises(InfeasibleError):
                solve_partition_milp(prob)
            infeasible += 1
            continue
        milp = solve_partition_milp(prob)
        assert milp.status == "optimal"
        assert milp.objective_s == pytest.approx(dp.objective_s, rel=1e-6), prob
        assert all(st.memory_bytes <= st.memory_limit_bytes for st in milp.stages)
        compared += 1
    assert compared >= 20 and infeasible >= 1


@pytest.mark.skipif(not highs_available(), reason="compares CBC against HiGHS")
def test_cbc_and_highs_agree():
    prob = random_problem(random.Random(5), 10, 3)
    highs = solve_partition_milp(prob, solver="highs")
    cbc = solve_partition_milp(prob, solver="cbc")
    assert highs.solver == "HiGHS" and cbc.solver == "PULP_CBC_CMD"
    assert highs.objective_s == pytest.approx(cbc.objective_s, rel=1e-6)


def test_dump_lp_names_variables_and_constraints(tmp_path):
    prob = random_problem(random.Random(3), 5, 2)
    assert prob.recomputable(0) and not prob.recomputable(2)
    path = build_partition_milp(prob).dump_lp(tmp_path / "partition.lp")
    text = path.read_text()
    for name in ("assign_b4_s1", "mem_limit_s0", "time_def_s1", "one_stage_b3", "order_b0_s0",
                 "nonempty_s1", "bottleneck", "recompute_b0_s0", "recompute_count_s1",
                 "workspace_b0_s0", "cut_b1_s0"):
        assert name in text
    assert "recompute_b2_s" not in text  # block 2 saves nothing by recomputing


def test_milp_refuses_a_solution_it_did_not_prove(monkeypatch):
    import tripar.partitioner.partition.milp as mod
    from tripar.partitioner.solvers import SolveRecord

    def stopped(lp, solver="auto", *, time_limit_s=None):
        return SolveRecord("HiGHS", "not-optimal", 1.0, 0.1)

    monkeypatch.setattr(mod, "run_solver", stopped)
    prob = PartitionProblem.uniform(4, stages=2, memory_limit_bytes=10, num_microbatches=2)
    with pytest.raises(PlanError, match="before proving optimality"):
        mod.build_partition_milp(prob).solve()
