"""Why no partition fits: the stage that falls short in the partition that fits best.

>>> from tripar.partitioner.partition.problem import PartitionProblem
>>> prob = PartitionProblem.uniform(2, stages=2, static_bytes=10, memory_limit_bytes=5,
...                                 num_microbatches=1)
>>> "5 bytes short" in str(diagnose_infeasible(prob))
True
"""

from __future__ import annotations

import math

import numpy as np

from tripar.errors import InfeasibleError
from tripar.partitioner.partition.problem import PartitionProblem
from tripar.partitioner.partition.stage_table import StageTable, trace

_INF = math.inf


def diagnose_infeasible(problem: PartitionProblem) -> InfeasibleError:
    """The error for a problem no partition fits: the partition that overshoots least,
    its worst stage, the bytes it needs at least, its budget and what would help.

    >>> prob = PartitionProblem.uniform(4, stages=2, static_bytes=100, activation_bytes=8,
    ...                                 memory_limit_bytes=150, num_microbatches=4)
    >>> print(diagnose_infeasible(prob))  # doctest: +ELLIPSIS
    stage 0 (layers.0..layers.1, 2 blocks, 2 microbatches in flight) needs at least 208 bytes ...
    """
    n, k = problem.num_blocks, problem.num_stages
    if n < k:
        return InfeasibleError(f"cannot cut {n} blocks into {k} non-empty pipeline stages")
    table = StageTable(problem, tables=False)
    least = []  # least memory of each (stage, first, stop) minus its budget
    for s in range(k):
        over = (table.least_memory(s) - problem.memory_limit_bytes[s]).astype(np.float64)
        least.append(np.where(table.valid(s), over, _INF))
    best = np.full(n + 1, _INF)
    best[0] = -_INF
    args = []
    for over in least:
        total = np.maximum(best[:, None], over)
        arg = np.argmin(total, axis=0)
        best = total[arg, np.arange(n + 1)]
        args.append(arg)
    bounds = trace(args, n)
    worst, first, stop = 0, 0, n
    worst_over = -_INF
    for s in range(k):
        a, b = bounds[s], (bounds[s + 1] if s + 1 < k else n)
        if least[s][a, b] > worst_over:
            worst, first, stop, worst_over = s, a, b, least[s][a, b]
    limit = problem.memory_limit_bytes[worst]
    need = int(worst_over + limit)
    how = "with every block recomputed" if problem.recompute != "none" else "without recompute"
    fixes = ["more pipeline stages", "tensor parallelism", "ZeRO-1 optimizer sharding",
             "a smaller microbatch"]
    if problem.recompute == "none":
        fixes.insert(0, "allowing recomputation")
    return InfeasibleError(
        f"stage {worst} ({problem.blocks[first]}..{problem.blocks[stop - 1]}, "
        f"{stop - first} blocks, {problem.in_flight[worst]} microbatches in flight) needs at "
        f"least {need} bytes ({need / 1e9:.2f} GB) {how} but its budget is {limit} bytes "
        f"({limit / 1e9:.2f} GB), {need - limit} bytes short, in the partition into {k} "
        f"stages that fits best; try {', '.join(fixes)}")
