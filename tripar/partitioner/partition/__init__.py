"""The contiguous stage partition with per-stage recomputation.

The planner cuts the chain of blocks of a proxy graph into ``k = p * v`` contiguous,
non-empty (virtual) stages and decides, per stage, which blocks recompute their
activations in the backward. One job per module:

* ``problem``: the problem on plain per-block numbers (:class:`PartitionProblem`, whose
  module docstring states the memory and time model) and the cost of one partition
  (:func:`evaluate_partition`);
* ``device``: a pipeline rank's memory shared among its virtual stages
  (:func:`device_shares`: their sum binds, at the rank's peak);
* ``recompute``: the cheapest recompute counts that make one stage fit;
* ``stage_table``: the least time of every (stage, first, stop) range;
* ``dp``: the exact DP over ranges (:func:`solve_partition_dp`);
* ``runs``: the same optimum by layer counts for a chain with a long run of identical
  blocks (the DP hands such chains to it);
* ``fixed``: a split fixed in advance, with the DP's recompute choice for it
  (:func:`solve_fixed_partition`);
* ``diagnose``: the error naming the stage that falls short when nothing fits;
* ``milp``: the same problem as a MILP in pulp (:func:`build_partition_milp`), which must
  agree with the DP.

>>> prob = PartitionProblem.uniform(6, stages=3, activation_bytes=10, input_bytes=1,
...                                 memory_limit_bytes=40, num_microbatches=4)
>>> solve_partition_dp(prob).boundaries
(0, 2, 4)
"""

from tripar.partitioner.partition.device import device_shares
from tripar.partitioner.partition.diagnose import diagnose_infeasible
from tripar.partitioner.partition.dp import solve_partition_dp
from tripar.partitioner.partition.fixed import solve_fixed_partition
from tripar.partitioner.partition.milp import (
    PartitionMilp,
    build_partition_milp,
    solve_partition_milp,
)
from tripar.partitioner.partition.problem import (
    RECOMPUTE_CHOICES,
    PartitionProblem,
    PartitionSolution,
    StageAssignment,
    evaluate_partition,
    one_f_one_b_in_flight,
    stage_memory,
)

__all__ = [
    "RECOMPUTE_CHOICES",
    "PartitionMilp",
    "PartitionProblem",
    "PartitionSolution",
    "StageAssignment",
    "build_partition_milp",
    "device_shares",
    "diagnose_infeasible",
    "evaluate_partition",
    "one_f_one_b_in_flight",
    "solve_fixed_partition",
    "solve_partition_dp",
    "solve_partition_milp",
    "stage_memory",
]
