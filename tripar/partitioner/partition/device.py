"""A pipeline rank's memory shared among its virtual stages.

Under an interleaved schedule pipeline rank ``r`` holds the ``v`` virtual stages
``r, r + p, ..., r + (v - 1) p`` on one device. Their memory adds up at the rank's peak
(``in_flight`` gives each stage's microbatches at that moment), so the device's budget
binds their sum, not each stage's ``1 / v`` of it: a stage holding the embedding or the
vocabulary head may take more than its share when the rank's other stages take less.

The partition DP costs each stage on its own, so :func:`device_shares` splits each
rank's budget among its stages before it runs, after what each stage needs on a
reference split (the uniform split by layers):

* the rank fits without recomputation: each stage gets what it needs, and the slack in
  proportion to that;
* it fits when every stage recomputes what the policy allows: each stage gets its least
  memory and the rest in proportion to what recomputation could free on it, so that
  every stage of the rank recomputes the same share of what it can;
* it does not fit: the budget in proportion to each stage's least memory (the DP may
  still find a split that fits, or its diagnosis names the stage that falls short).

A rank's shares sum to its budget, so every partition the DP finds within them fits the
device at the rank's peak.

>>> from tripar.partitioner.partition.problem import PartitionProblem
>>> prob = PartitionProblem.uniform(4, stages=4, static_bytes=10, memory_limit_bytes=1,
...                                 num_microbatches=4)
>>> device_shares(prob, pp=2, device_budget=[60, 60], boundaries=[0, 1, 2, 3])
(30, 30, 30, 30)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tripar.errors import ConfigError
from tripar.partitioner.partition.problem import PartitionProblem


def device_shares(problem: PartitionProblem, *, pp: int, device_budget: Sequence[int],
                  boundaries: Sequence[int] | None = None) -> tuple[int, ...]:
    """Each virtual stage's part of its pipeline rank's ``device_budget`` (stage ``s``
    runs on rank ``s % pp``), from what the stages need on ``boundaries`` (the first
    block of each stage; default: equal block counts). See the module docstring.

    >>> prob = PartitionProblem.uniform(4, stages=2, static_bytes=10, activation_bytes=4,
    ...                                 input_bytes=1, memory_limit_bytes=1,
    ...                                 num_microbatches=2)
    >>> device_shares(prob, pp=1, device_budget=[100], boundaries=[0, 3])
    (79, 20)
    >>> device_shares(prob, pp=1, device_budget=[56], boundaries=[0, 3])
    (42, 14)
    """
    n, k = problem.num_blocks, problem.num_stages
    if k % pp or len(device_budget) != pp:
        raise ConfigError(f"{k} stages on {pp} pipeline ranks need k % pp == 0 and one "
                          f"device budget per rank, got {len(device_budget)}")
    firsts = (tuple(int(b) for b in boundaries) if boundaries is not None
              else tuple(s * n // k for s in range(k)))
    cuts = np.array((*firsts, n))
    saving = np.array([problem.saving_bytes(b) if problem.recomputable(b) else 0
                       for b in range(n)], dtype=np.float64)

    def spans(values) -> np.ndarray:
        cum = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])
        return cum[cuts[1:]] - cum[cuts[:-1]]

    c = np.asarray(problem.in_flight, dtype=np.float64)
    full = spans(problem.static_bytes) + c * spans(problem.activation_bytes)
    top = np.array([saving[a:b].max(initial=0.0) for a, b in zip(cuts[:-1], cuts[1:])])
    freed = c * spans(saving) - top if problem.recompute != "none" else np.zeros(k)
    freed = np.maximum(freed, 0.0)
    least = full - freed
    shares = np.zeros(k)
    for rank in range(pp):
        mine = np.arange(rank, k, pp)
        budget = float(device_budget[rank])
        need, low = full[mine].sum(), least[mine].sum()
        if need <= budget:
            weights = full[mine] / need if need > 0 else np.full(len(mine), 1 / len(mine))
            shares[mine] = full[mine] + (budget - need) * weights
        elif low <= budget:
            shares[mine] = least[mine] + (budget - low) * freed[mine] / freed[mine].sum()
        else:
            weights = least[mine] / low if low > 0 else np.full(len(mine), 1 / len(mine))
            shares[mine] = budget * weights
    return tuple(int(x) for x in np.floor(shares))
