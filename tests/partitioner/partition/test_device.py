"""A pipeline rank's virtual stages share its device: ``device_shares`` and the DP under it."""

from __future__ import annotations

import dataclasses

import pytest

from tripar.errors import InfeasibleError
from tripar.partitioner.partition import (
    PartitionProblem,
    device_shares,
    solve_partition_dp,
    stage_memory,
)
from tripar.partitioner.schedules import warmup_in_flight

PP, VPP, M = 2, 4, 8


def _head_heavy() -> PartitionProblem:
    """16 layers between a light embedding and a vocabulary head that keeps 8x a layer's
    activations and 4x its weights, under interleaved 1F1B (pp=2, vpp=4)."""
    n = 18
    act = [10] + [100] * 16 + [800]
    static = [50] + [100] * 16 + [400]
    return PartitionProblem(
        blocks=("embedding", *(f"blocks.{i}" for i in range(16)), "head"),
        forward_s=[0.1] + [1.0] * 16 + [2.0], backward_s=[0.2] + [2.0] * 16 + [4.0],
        recompute_s=[0.1] + [1.0] * 16 + [2.0], activation_bytes=act,
        input_bytes=[1] + [10] * 17, static_bytes=static,
        in_flight=warmup_in_flight("interleaved-1f1b", PP, M, VPP),
        memory_limit_bytes=[0] * (PP * VPP), num_microbatches=M, virtual_stages=VPP,
        cut_s=[0.0] * (n - 1))


def _rank_memory(problem: PartitionProblem, sol) -> list[int]:
    return [sum(stage_memory(problem, st.index, st.first, st.stop, st.recompute)
                for st in sol.stages if st.index % PP == r) for r in range(PP)]


def test_head_stage_takes_more_than_its_even_share_when_the_device_total_fits():
    """Even shares (device / vpp) cannot hold the head's stage even with everything
    recomputed; the device's total can, and the DP finds a split within the shares."""
    base = _head_heavy()
    device = 4000
    even = dataclasses.replace(base, memory_limit_bytes=[device // VPP] * (PP * VPP))
    with pytest.raises(InfeasibleError, match="stage 7"):
        solve_partition_dp(even)
    uniform = (0, *range(3, 18, 2))[:PP * VPP]
    shares = device_shares(base, pp=PP, device_budget=[device] * PP, boundaries=uniform)
    for rank in range(PP):
        assert sum(shares[rank::PP]) <= device
    assert shares[-1] > device // VPP   # the head's stage
    sol = solve_partition_dp(dataclasses.replace(base, memory_limit_bytes=shares))
    assert max(_rank_memory(base, sol)) <= device
    assert sol.stages[-1].num_blocks < max(st.num_blocks for st in sol.stages)


def test_shares_split_a_rank_s_slack_in_proportion_to_need():
    base = _head_heavy()
    uniform = (0, *range(3, 18, 2))[:PP * VPP]
    roomy = device_shares(base, pp=PP, device_budget=[10**6] * PP, boundaries=uniform)
    need = [stage_memory(base, s, a, b, ()) for s, (a, b) in
            enumerate(zip(uniform, (*uniform[1:], base.num_blocks)))]
    for s in range(PP * VPP):   # each stage gets what it needs and slack in proportion
        assert roomy[s] >= need[s]
        rank = s % PP
        assert roomy[s] / need[s] == pytest.approx(roomy[rank] / need[rank], rel=1e-3)
        assert roomy[s] > 0
    assert device_shares(base, pp=PP, device_budget=[0] * PP, boundaries=uniform) == (0,) * 8
