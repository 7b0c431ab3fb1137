"""The count solver for chains with a long run of identical blocks: same optimum as the DP
over ranges, work linear in the run's length."""

from __future__ import annotations

import math
import random

import pytest

from tripar.errors import InfeasibleError
from tripar.partitioner.partition.dp import solve_partition_dp
from tripar.partitioner.partition.problem import PartitionProblem
from tripar.partitioner.partition.runs import find_run, solve_partition_runs


def chain_problem(rng: random.Random, layers: int, before: int, after: int, stages: int,
                  microbatches: int, vpp: int, policy: str, limit: int) -> PartitionProblem:
    n = before + layers + after

    def edge(lo, hi, count):
        return [rng.uniform(lo, hi) for _ in range(count)]

    fwd = edge(0.2, 3, before) + [1.0] * layers + edge(0.2, 3, after)
    act = [rng.randint(1, 30) for _ in range(before)] + [10] * layers + \
        [rng.randint(1, 30) for _ in range(after)]
    inp = [rng.randint(0, a) for a in act[:before]] + [2] * layers + \
        [rng.randint(0, a) for a in act[before + layers:]]
    static = [rng.randint(0, 20) for _ in range(before)] + [5] * layers + \
        [rng.randint(0, 20) for _ in range(after)]
    cut = edge(0, 0.3, before) + [0.1] * (layers - 1) + edge(0, 0.3, after)
    return PartitionProblem(
        blocks=tuple(f"b{i}" for i in range(n)), forward_s=fwd, backward_s=[2 * f for f in fwd],
        recompute_s=fwd, activation_bytes=act, input_bytes=inp, static_bytes=static,
        in_flight=tuple(min(stages - s, microbatches) for s in range(stages)),
        memory_limit_bytes=limit, num_microbatches=microbatches, virtual_stages=vpp,
        cut_s=cut[:n - 1], recompute=policy)


def test_count_solver_matches_the_range_dp_on_random_chains():
    rng = random.Random(7)
    compared = fast_used = 0
    for _ in range(80):
        layers, before, after = rng.randint(8, 24), rng.randint(0, 2), rng.randint(0, 3)
        stages = rng.randint(1, 8)
        vpp = 2 if stages % 2 == 0 and rng.random() < 0.3 else 1
        prob = chain_problem(rng, layers, before, after, stages, rng.randint(1, 12), vpp,
                             rng.choice(["none", "full", "stage-aware", "stage-aware"]),
                             rng.randint(40, 400))
        try:
            want = solve_partition_dp(prob, use_runs=False)
        except InfeasibleError:
            with pytest.raises(InfeasibleError, match="bytes short"):
                solve_partition_dp(prob)
            continue
        got = solve_partition_dp(prob)
        fast_used += got.solver == "dp-runs"
        compared += 1
        assert math.isclose(got.objective_s, want.objective_s, rel_tol=1e-9)
        assert all(st.memory_bytes <= st.memory_limit_bytes for st in got.stages)
    assert compared >= 40 and fast_used == compared


def test_find_run_needs_a_long_run_and_few_other_blocks():
    rng = random.Random(1)
    prob = chain_problem(rng, 12, 1, 3, 4, 8, 1, "stage-aware", 200)
    assert find_run(prob) == (1, 13)
    short = chain_problem(rng, 4, 1, 3, 2, 8, 1, "stage-aware", 200)
    assert find_run(short) is None


def test_work_grows_linearly_with_the_layers():
    work = {}
    for layers in (48, 96, 192):
        prob = chain_problem(random.Random(3), layers, 1, 3, 8, 32, 1, "stage-aware",
                             layers * 12)
        sol = solve_partition_runs(prob, find_run(prob))
        assert sol is not None and sol.solver == "dp-runs"
        work[layers] = sol.work
    assert work[96] / work[48] < 2.5 and work[192] / work[96] < 2.5, work
