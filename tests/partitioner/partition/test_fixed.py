"""The stage partition on a given split: the DP's per-stage recomputation, brute-forced."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tripar.errors import ConfigError, InfeasibleError
from tripar.partitioner.partition.dp import solve_partition_dp
from tripar.partitioner.partition.fixed import solve_fixed_partition
from tripar.partitioner.partition.problem import PartitionProblem, evaluate_partition


@st.composite
def problems(draw) -> tuple[PartitionProblem, tuple[int, ...]]:
    """A problem and a split of it, the memory budget drawn between what the split's
    busiest stage needs with every block recomputed and without recomputation."""
    n = draw(st.integers(2, 7))
    k = draw(st.integers(1, min(n, 3)))
    m = draw(st.integers(1, 5))
    act = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    inp = [draw(st.integers(0, a)) for a in act]
    static = draw(st.lists(st.integers(0, 30), min_size=n, max_size=n))
    fwd = draw(st.lists(st.integers(1, 20), min_size=n, max_size=n))
    bounds = (0, *sorted(draw(st.sets(st.integers(1, n - 1), min_size=k - 1,
                                      max_size=k - 1))))
    in_flight = tuple(min(k - s, m) for s in range(k))
    spans = list(zip(bounds, (*bounds[1:], n)))
    keep = max(sum(static[a:b]) + c * sum(act[a:b]) for (a, b), c in zip(spans, in_flight))
    drop = max(sum(static[a:b]) + c * sum(inp[a:b]) + max(x - y for x, y in
                                                          zip(act[a:b], inp[a:b]))
               for (a, b), c in zip(spans, in_flight))
    share = draw(st.floats(-0.1, 1.1, allow_nan=False))
    limit = max(0, round(drop + share * (keep - drop)))
    problem = PartitionProblem(
        blocks=tuple(f"b{i}" for i in range(n)), forward_s=[f / 4 for f in fwd],
        backward_s=[f / 2 for f in fwd], recompute_s=[f / 4 for f in fwd],
        activation_bytes=act, input_bytes=inp, static_bytes=static, in_flight=in_flight,
        memory_limit_bytes=limit, num_microbatches=m,
        recompute=draw(st.sampled_from(("stage-aware", "full", "none"))))
    return problem, bounds


def _least_times(problem: PartitionProblem, bounds: tuple[int, ...]) -> list[float] | None:
    """Brute force: per stage, the least time over every recompute set that fits."""
    n, k = problem.num_blocks, problem.num_stages
    stops = (*bounds[1:], n)
    out = []
    for s, (first, stop) in enumerate(zip(bounds, stops)):
        allowed = [b for b in range(first, stop) if problem.recomputable(b)]
        sets = ([tuple(allowed)] if problem.recompute == "full" else
                [c for r in range(len(allowed) + 1) for c in itertools.combinations(allowed, r)])
        best = None
        for rec in sets:
            recs = [() for _ in range(k)]
            recs[s] = rec
            sol = evaluate_partition(problem, bounds, recs, check_memory=False)
            if sol.stages[s].memory_bytes <= problem.memory_limit_bytes[s]:
                t = sol.stages[s].time_s
                best = t if best is None else min(best, t)
        if best is None:
            return None
        out.append(best)
    return out


@settings(max_examples=100, deadline=None)
@given(problems())
def test_fixed_split_recomputes_least_and_dp_never_loses(drawn):
    problem, bounds = drawn
    least = _least_times(problem, bounds)
    if least is None:
        with pytest.raises(InfeasibleError, match=r"stage \d .* needs at least \d+ bytes"):
            solve_fixed_partition(problem, bounds)
        return
    sol = solve_fixed_partition(problem, bounds)
    assert sol.boundaries == bounds and sol.status == "fixed split"
    assert [s.time_s for s in sol.stages] == pytest.approx(least)
    assert all(s.memory_bytes <= s.memory_limit_bytes for s in sol.stages)
    dp = solve_partition_dp(problem)        # optimal over every split, this one included
    assert dp.objective_s <= sol.objective_s + 1e-9
    again = solve_fixed_partition(problem, dp.boundaries)   # the DP's own choice back
    assert again.objective_s == pytest.approx(dp.objective_s)
    assert [s.recompute for s in again.stages] == [s.recompute for s in dp.stages]


def test_fixed_split_rejects_malformed_boundaries():
    prob = PartitionProblem.uniform(6, stages=3, activation_bytes=10, input_bytes=1,
                                    memory_limit_bytes=40, num_microbatches=4)
    for bad in [(0, 2), (1, 2, 4), (0, 4, 2), (0, 2, 6)]:
        with pytest.raises(ConfigError, match="must be the first block of each of the 3"):
            solve_fixed_partition(prob, bad)
    tight = PartitionProblem.uniform(6, stages=3, activation_bytes=10, input_bytes=1,
                                     memory_limit_bytes=20, num_microbatches=4)
    with pytest.raises(InfeasibleError, match=r"stage 0 \(layers.0..layers.3, 4 blocks, 3 "
                                              r"microbatches in flight\).*bytes short"):
        solve_fixed_partition(tight, (0, 4, 5))
