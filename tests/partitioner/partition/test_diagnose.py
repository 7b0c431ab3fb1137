"""What an infeasible partition problem's error names: the stage, the bytes, the fixes."""

from __future__ import annotations

import pytest

from tripar.errors import InfeasibleError
from tripar.partitioner.partition.dp import solve_partition_dp
from tripar.partitioner.partition.milp import solve_partition_milp
from tripar.partitioner.partition.problem import PartitionProblem


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


def test_no_recompute_policy_suggests_allowing_it():
    prob = PartitionProblem.uniform(4, stages=2, activation_bytes=100, memory_limit_bytes=250,
                                    num_microbatches=4, recompute="none")
    with pytest.raises(InfeasibleError, match="allowing recomputation"):
        solve_partition_dp(prob)
