"""Sub-pipelined tensor parallelism in the cost model: a block in k parts costs the
two-stage pipeline of its parts' compute and collectives, and keeps the whole
microbatch's memory."""

from __future__ import annotations

import dataclasses

import pytest
from example_graphs import example_graph

from tripar.partitioner.cost.blocks import block_costs
from tripar.partitioner.cost.overlap import pipelined
from tripar.partitioner.hardware import Cluster
from tripar.plan.config import ParallelConfig

A100 = Cluster.builtin("a100-80g", nodes=1, gpus_per_node=8)
SLOW_LINK = dataclasses.replace(A100, intra_bandwidth=A100.intra_bandwidth / 20)


def _costs(cluster: Cluster, b: int, k: int, sp: bool = False):
    cfg = ParallelConfig(dp=1, tp=4, pp=1, micro_batch_size=b, num_microbatches=1, sp=sp,
                         tp_overlap=k)
    return block_costs(example_graph(layers=2, hidden=1024, seq=512, heads=8), cluster, cfg,
                       dtype="bf16")


@pytest.mark.parametrize(("k", "sp"), [(2, False), (4, False), (2, True)])
def test_k_parts_are_the_pipeline_of_the_part_costs(k, sp):
    whole, part, split = _costs(A100, 8, 1, sp), _costs(A100, 8 // k, 1, sp), \
        _costs(A100, 8, k, sp)
    for w, p, s in zip(whole, part, split):
        if not w.tp_forward_comm_s:   # no sharded region: the block runs whole
            assert s == w
            continue
        assert s.forward_s == pytest.approx(pipelined(
            p.forward_s - p.tp_forward_comm_s, p.tp_forward_comm_s, k))
        assert s.backward_input_s == pytest.approx(pipelined(
            p.backward_input_s - p.tp_backward_comm_s, p.tp_backward_comm_s, k))
        assert s.backward_weight_s == pytest.approx(k * p.backward_weight_s)
        assert (s.saved_bytes, s.params) == (w.saved_bytes, w.params)
        assert s.tp_comm_s < w.tp_comm_s   # only part of the collectives stays exposed


def test_overlap_pays_where_collectives_are_slow_and_not_for_tiny_parts():
    def step(cluster, b, k):
        return sum(c.forward_s + c.backward_input_s + c.backward_weight_s
                   for c in _costs(cluster, b, k))

    assert step(SLOW_LINK, 8, 2) < step(SLOW_LINK, 8, 1)
    # parts of one sample run small GEMMs at low efficiency and pay every launch again
    assert step(A100, 4, 4) > step(A100, 4, 1)
