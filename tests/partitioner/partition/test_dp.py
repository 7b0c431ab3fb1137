"""The exact partition DP against brute force."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from random_problems import random_problem

from tripar.errors import InfeasibleError
from tripar.partitioner.partition.dp import solve_partition_dp
from tripar.partitioner.partition.milp import solve_partition_milp
from tripar.partitioner.partition.problem import (
    PartitionProblem,
    evaluate_partition,
    one_f_one_b_in_flight,
    stage_memory,
)


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


def test_too_many_stages_for_the_blocks():
    prob = PartitionProblem.uniform(3, stages=4, memory_limit_bytes=10, num_microbatches=4)
    with pytest.raises(InfeasibleError, match="cannot cut 3 blocks into 4"):
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
    # counted work in tests/partitioner/partition/test_runs.py, not by the wall clock here.
    for layers in (48, 96):
        sol = solve_partition_dp(gpt(layers))
        assert all(st.memory_bytes <= 40 * 10**9 for st in sol.stages)
        assert 0 < sum(len(st.recompute) for st in sol.stages) < layers  # partial recompute
        assert sum(st.num_blocks for st in sol.stages) == layers + 2
