"""A stage split fixed in advance, with the DP's per-stage recompute choice for it.

The search also simulates the uniform split by layers; :func:`solve_fixed_partition`
gives it the recomputation :func:`~tripar.partitioner.partition.dp.solve_partition_dp`
would choose on the same ranges.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from tripar.errors import ConfigError, InfeasibleError
from tripar.partitioner.partition.problem import (
    PartitionProblem,
    PartitionSolution,
    evaluate_partition,
)
from tripar.partitioner.partition.stage_table import StageTable


def solve_fixed_partition(problem: PartitionProblem,
                          boundaries: Sequence[int]) -> PartitionSolution:
    """The cheapest recomputation for a split given by each stage's first block: per
    stage, the blocks :func:`solve_partition_dp` would recompute on that range (none when
    the stage fits, else the least recompute time that fits its budget).

    Raises ConfigError for malformed boundaries and InfeasibleError, naming the stage, its
    least memory and its budget, when a stage does not fit even with every block the
    policy allows recomputed.

    >>> prob = PartitionProblem.uniform(6, stages=3, activation_bytes=10, input_bytes=1,
    ...                                 memory_limit_bytes=40, num_microbatches=4)
    >>> sol = solve_fixed_partition(prob, (0, 2, 4))
    >>> [s.recompute for s in sol.stages], sol.objective_s, sol.status
    ([(0, 1), (), ()], 44.0, 'fixed split')
    """
    start = time.perf_counter()
    n, k = problem.num_blocks, problem.num_stages
    bounds = tuple(int(b) for b in boundaries)
    if (len(bounds) != k or bounds[0] != 0 or bounds[-1] >= n
            or any(a >= b for a, b in zip(bounds, bounds[1:]))):
        raise ConfigError(f"stage boundaries {list(bounds)} must be the first block of each "
                          f"of the {k} stages: start at 0, increase strictly, stay below {n}")
    table = StageTable(problem, tables=False)
    stops = (*bounds[1:], n)
    rec = []
    for s, (first, stop) in enumerate(zip(bounds, stops)):
        if table.choice(s, first, stop) is None:
            least = int(table.least_memory(s)[first, stop])
            limit = problem.memory_limit_bytes[s]
            how = ("with every block recomputed" if problem.recompute != "none"
                   else "without recompute")
            raise InfeasibleError(
                f"stage {s} ({problem.blocks[first]}..{problem.blocks[stop - 1]}, "
                f"{stop - first} blocks, {problem.in_flight[s]} microbatches in flight) of "
                f"the split {list(bounds)} needs at least {least} bytes "
                f"({least / 1e9:.2f} GB) {how} but its budget is {limit} bytes "
                f"({limit / 1e9:.2f} GB), {least - limit} bytes short")
        rec.append(table.recompute_blocks(s, first, stop))
    sol = evaluate_partition(problem, bounds, rec, solver="fixed", status="fixed split",
                             solve_time_s=time.perf_counter() - start)
    return PartitionSolution(sol.stages, sol.objective_s, sol.bottleneck_s, sol.solver,
                             sol.status, sol.solve_time_s, work=k)
