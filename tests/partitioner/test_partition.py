"""Stage partition: the DP against brute force, and the MILP against the DP."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from tripar.errors import ConfigError, InfeasibleError, PlanError
from tripar.partitioner.partition import (
    PartitionProblem,
    evaluate_partition,
    one_f_one_b_in_flight,
    solve_partition_dp,
    stage_memory,
)
from tripar.partitioner.partition_milp import (
    build_partition_milp,
    highs_available,
    solve_partition_milp,
)


def random_problem(rng: random.Random, n: int, k: int, *, v: int = 1,
                   recompute: str = "stage-aware") -> PartitionProblem:
    m = rng.randint(1, 6)
    act = [rng.randint(1, 40) for _ in range(n)]
    inp = [rng.randint(0, a) for a in act]
    static = [rng.randint(0, 30) for _ in range(n)]
    fwd = [rng.randint(1, 20) / 4 for _ in range(n)]
    in_flight = tuple(min(k - s, m) for s in range(k)) if v == 1 else tuple(
        rng.randint(1, m) for _ in range(k))
    per_stage = (sum(static) + max(in_flight) * sum(act)) / k
    limit = tuple(int(per_stage * rng.uniform(0.6, 2.0)) for _ in range(k))
    return PartitionProblem(
        blocks=tuple(f"b{i}" for i in range(n)), forward_s=fwd,
        backward_s=[2 * f + rng.randint(0, 4) / 4 for f in fwd],
        recompute_s=[f + rng.randint(0, 2) / 4 for f in fwd],
        activation_bytes=act, input_bytes=inp, static_bytes=static, in_flight=in_flight,
        memory_limit_bytes=limit, num_microbatches=m, virtual_stages=v,
        cut_s=[rng.randint(0, 3) / 8 for _ in range(n - 1)], recompute=recompute)


def brute_force(problem: PartitionProblem) -> float:
    """Least objective over every partition and every recompute subset (inf if none fits)."""
    n, k = problem.num_blocks, problem.num_stages
    best = math.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts)
        options = []
        for s in range(k):
            first, stop = bounds[s], (bounds[s + 1] if s + 1 < k else n)
            rec = [b for b in range(first, stop) if problem.recomputable(b)]
            if problem.recompute == "full":
                subsets = [tuple(rec)]
            else:
                subsets = [c for r in range(len(rec) + 1) for c in itertools.combinations(rec, r)]
            fits = [sub for sub in subsets
                    if stage_memory(problem, s, first, stop, sub) <= problem.memory_limit_bytes[s]]
            if not fits:
                break
            options.append(fits)
        else:
            for choice in itertools.product(*options):
                sol = evaluate_partition(problem, bounds, choice)
                best = min(best, sol.objective_s)
    return best


def dp_objective(problem: PartitionProblem) -> float:
    try:
        return solve_partition_dp(problem).objective_s
    except InfeasibleError:
        return math.inf


def test_one_f_one_b_in_flight_counts():
    assert one_f_one_b_in_flight(4, 8) == (4, 3, 2, 1)
    assert one_f_one_b_in_flight(4, 2) == (2, 2, 2, 1)


def test_problem_rejects_inconsistent_fields():
    base = dict(blocks=("a", "b"), forward_s=(1, 1), backward_s=(2, 2), recompute_s=(1, 1),
                activation_bytes=(4, 4), input_bytes=(1, 1), static_bytes=(0, 0),
                in_flight=(2, 1), memory_limit_bytes=100, num_microbatches=2)
    assert PartitionProblem(**base).memory_limit_bytes == (100, 100)
    with pytest.raises(ConfigError, match="forward_s has 1 entries for 2 blocks"):
        PartitionProblem(**{**base, "forward_s": (1,)})
    with pytest.raises(ConfigError, match="finite and >= 0"):
        PartitionProblem(**{**base, "activation_bytes": (-1, 4)})
    with pytest.raises(ConfigError, match="p \\* v"):
        PartitionProblem(**{**base, "in_flight": (1, 1, 1), "virtual_stages": 2})
    with pytest.raises(ConfigError, match="unknown recompute"):
        PartitionProblem(**{**base, "recompute": "some"})
    with pytest.raises(ConfigError, match="cut_s has 3 entries"):
        PartitionProblem(**{**base, "cut_s": (0, 0, 0)})


def test_dp_matches_brute_force_on_random_cases():
    rng = random.Random(1234)
    checked = feasible = 0
    for _ in range(120):
        n = rng.randint(1, 7)
        k = rng.randint(1, min(n, 3))
        policy = rng.choice(["stage-aware", "stage-aware", "none", "full"])
        prob = random_problem(rng, n, k, recompute=policy)
        want, got = brute_force(prob), dp_objective(prob)
        if math.isinf(want):
            assert math.isinf(got)
        else:
            feasible += 1
            assert got == pytest.approx(want, rel=1e-9), prob
        checked += 1
    assert feasible >= 60  # the generator exercises the feasible side too


def test_dp_matches_brute_force_with_virtual_stages():
    rng = random.Random(99)
    for _ in range(30):
        prob = random_problem(rng, rng.randint(4, 7), 4, v=2)
        assert dp_objective(prob) == pytest.approx(brute_force(prob), rel=1e-9)


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


def test_stage_aware_recompute_is_finer_than_all_or_nothing():
    # 12 identical layers, 4 stages of 3, 1F1B with 8 microbatches: stage s holds 4 - s.
    prob = PartitionProblem.uniform(12, stages=4, activation_bytes=100, input_bytes=10,
                                    static_bytes=50, memory_limit_bytes=950,
                                    num_microbatches=8)
    sol = solve_partition_dp(prob)
    counts = [len(st.recompute) for st in sol.stages]
    assert [st.num_blocks for st in sol.stages] == [3, 3, 3, 3]
    # the first stage recomputes most, the last nothing; some stage recomputes part of its blocks
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0 and counts[0] > 0
    assert any(0 < c < 3 for c in counts)
    assert all(st.memory_bytes <= 950 for st in sol.stages)
    full = PartitionProblem.uniform(12, stages=4, activation_bytes=100, input_bytes=10,
                                    static_bytes=50, memory_limit_bytes=950,
                                    num_microbatches=8, recompute="full")
    assert solve_partition_dp(full).objective_s > sol.objective_s


def test_infeasible_names_the_stage_bytes_and_fixes():
    prob = PartitionProblem.uniform(8, stages=2, static_bytes=120, activation_bytes=40,
                                    input_bytes=4, memory_limit_bytes=500, num_microbatches=4)
    with pytest.raises(InfeasibleError) as info:
        solve_partition_dp(prob)
    text = str(info.value)
    # The least-overshooting split is 4 + 4; stage 0 (2 in flight) with every layer
    # recomputed holds 4*120 static + 2*4*4 inputs + one 36-byte layer = 548 bytes.
    assert "stage 0 (layers.0..layers.3, 4 blocks, 2 microbatches in flight)" in text
    assert "needs at least 548 bytes" in text and "budget is 500 bytes" in text
    assert "more pipeline stages" in text and "tensor parallelism" in text
    assert "ZeRO-1" in text and "smaller microbatch" in text
    need = int(text.split("needs at least ")[1].split(" ")[0])
    assert need > 500 and f"{need - 500} bytes short" in text
    with pytest.raises(InfeasibleError, match="stage 0"):
        solve_partition_milp(prob)


def test_too_many_stages_for_the_blocks():
    prob = PartitionProblem.uniform(3, stages=4, memory_limit_bytes=10, num_microbatches=4)
    with pytest.raises(InfeasibleError, match="cannot cut 3 blocks into 4"):
        solve_partition_dp(prob)


def test_no_recompute_policy_suggests_allowing_it():
    prob = PartitionProblem.uniform(4, stages=2, activation_bytes=100, memory_limit_bytes=250,
                                    num_microbatches=4, recompute="none")
    with pytest.raises(InfeasibleError, match="allowing recomputation"):
        solve_partition_dp(prob)


def test_cut_costs_steer_the_boundaries():
    # Equal blocks; cutting after block 2 is free, after any other block expensive.
    cut = [5.0] * 7
    cut[2] = 0.0
    prob = PartitionProblem(
        blocks=tuple(f"l{i}" for i in range(8)), forward_s=(1,) * 8, backward_s=(2,) * 8,
        recompute_s=(1,) * 8, activation_bytes=(1,) * 8, input_bytes=(0,) * 8,
        static_bytes=(0,) * 8, in_flight=(2, 1), memory_limit_bytes=1000,
        num_microbatches=2, cut_s=cut)
    assert solve_partition_dp(prob).boundaries == (0, 3)
    assert solve_partition_milp(prob).boundaries == (0, 3)


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
    import tripar.partitioner.partition_milp as mod

    def stopped(lp, solver="auto", *, time_limit_s=None):
        return mod.SolveRecord("HiGHS", "not-optimal", 1.0, 0.1)

    monkeypatch.setattr(mod, "run_solver", stopped)
    prob = PartitionProblem.uniform(4, stages=2, memory_limit_bytes=10, num_microbatches=2)
    with pytest.raises(PlanError, match="before proving optimality"):
        mod.build_partition_milp(prob).solve()


def test_identical_layers_scale_about_linearly():
    """GPT-3-like chain (embedding, 96 layers, head) on 16 stages; time grows ~linearly."""

    def gpt(layers: int) -> PartitionProblem:
        n = layers + 2
        act = [10**9] + [2 * 10**9] * layers + [4 * 10**9]
        return PartitionProblem(
            blocks=("embed", *(f"h.{i}" for i in range(layers)), "head"),
            forward_s=(0.001, *([0.01] * layers), 0.02),
            backward_s=(0.002, *([0.02] * layers), 0.04),
            recompute_s=(0.001, *([0.01] * layers), 0.02),
            activation_bytes=act, input_bytes=[10**6] + [5 * 10**7] * layers + [5 * 10**7],
            static_bytes=[2 * 10**9] + [3 * 10**9] * layers + [2 * 10**9],
            in_flight=one_f_one_b_in_flight(16, 64), memory_limit_bytes=40 * 10**9,
            num_microbatches=64, cut_s=[0.0005] * (n - 1))

    # How its time grows with depth is measured in benchmarks/plan_scaling.py and by the
    # counted work in tests/partitioner/test_partition_runs.py, not by the wall clock here.
    for layers in (48, 96):
        sol = solve_partition_dp(gpt(layers))
        assert all(st.memory_bytes <= 40 * 10**9 for st in sol.stages)
        assert 0 < sum(len(st.recompute) for st in sol.stages) < layers  # partial recompute
        assert sum(st.num_blocks for st in sol.stages) == layers + 2
