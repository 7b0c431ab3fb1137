"""The whole-block scales of a calibrated CPU profile (``Efficiency.block_forward`` /
``block_backward``) in the cost model: they scale a block's compute, not its collectives,
and a profile without them costs exactly as before."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from example_graphs import example_graph

from tripar.partitioner.cost import block_costs, stage_costs, step_estimate
from tripar.partitioner.hardware import Cluster
from tripar.plan.config import ParallelConfig


def _scaled(cluster: Cluster, forward: float, backward: float, sharing: float = 1.0) -> Cluster:
    eff = replace(cluster.device.efficiency, block_forward=forward, block_backward=backward,
                  node_sharing=sharing)
    return replace(cluster, device=replace(cluster.device, efficiency=eff))


def test_scales_multiply_forward_and_backward_compute():
    graph = example_graph(layers=2)
    cpu = Cluster.builtin("cpu")
    one = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=1, num_microbatches=1)
    base = block_costs(graph, cpu, one)
    scaled = block_costs(graph, _scaled(cpu, 1.25, 1.5), one)
    for b, s in zip(base, scaled):
        assert s.forward_s == pytest.approx(1.25 * b.forward_s)
        assert s.backward_input_s == pytest.approx(1.5 * b.backward_input_s)
        assert s.backward_weight_s == pytest.approx(1.5 * b.backward_weight_s)
        assert (s.saved_bytes, s.params) == (b.saved_bytes, b.params)  # memory unchanged


def test_collectives_are_not_scaled():
    graph = example_graph(layers=2)
    cpu = Cluster.builtin("cpu")
    tp2 = ParallelConfig(dp=1, tp=2, pp=1, micro_batch_size=1, num_microbatches=1)
    base = block_costs(graph, cpu, tp2)
    scaled = block_costs(graph, _scaled(cpu, 1.4, 1.4), tp2)
    layer = 1
    assert base[layer].tp_comm_s > 0
    assert scaled[layer].tp_comm_s == pytest.approx(base[layer].tp_comm_s)

    def compute(c):
        return c.forward_s + c.backward_input_s + c.backward_weight_s - c.tp_comm_s

    assert compute(scaled[layer]) == pytest.approx(1.4 * compute(base[layer]))


def test_step_and_recompute_follow_the_scales():
    graph = example_graph(layers=4)
    cpu = Cluster.builtin("cpu")
    cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=4)
    base = stage_costs(graph, cpu, cfg, recompute="full")
    scaled = stage_costs(graph, _scaled(cpu, 2.0, 1.0), cfg, recompute="full")
    for b, s in zip(base, scaled):
        assert s.forward_s == pytest.approx(2.0 * b.forward_s)
        # full recomputation re-runs the (scaled) forward inside B
        assert s.backward_input_s - b.backward_input_s == pytest.approx(b.forward_s)
        assert s.tail_s == pytest.approx(b.tail_s)  # the optimizer has its own fit
    slow = step_estimate(graph, _scaled(cpu, 1.3, 1.3), cfg, record_timeline=False)
    fast = step_estimate(graph, cpu, cfg, record_timeline=False)
    assert slow.step_time_s > 1.2 * fast.step_time_s
    assert slow.peak_memory_bytes == fast.peak_memory_bytes


def test_profile_without_scales_costs_as_before(tmp_path):
    data = Cluster.builtin("cpu").to_dict()
    data["device"]["efficiency"].update(op_s=2e-5, memory_traffic=4.0)
    for field in ("block_forward", "block_backward", "node_sharing"):  # older profile
        del data["device"]["efficiency"][field]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    old = Cluster.from_file(path)
    assert (old.device.efficiency.block_forward, old.device.efficiency.block_backward) == \
        (1.0, 1.0)
    graph = example_graph(layers=2)
    one = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=1, num_microbatches=2)
    assert block_costs(graph, old, one) == block_costs(graph, _scaled(old, 1.0, 1.0), one)
    pp2 = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=2)
    assert stage_costs(graph, old, pp2) == stage_costs(graph, _scaled(old, 1.0, 1.0), pp2)
    data["device"]["efficiency"].update(block_forward=1.1, block_backward=1.2)
    path = tmp_path / "new.json"
    path.write_text(json.dumps(data))
    new = Cluster.from_file(path)
    assert step_estimate(graph, new, one).step_time_s > step_estimate(graph, old,
                                                                      one).step_time_s


def test_node_sharing_applies_when_the_node_s_devices_compute_at_once():
    graph = example_graph(layers=2)
    cpu = Cluster.builtin("cpu")  # 2 devices per node
    shared = _scaled(cpu, 1.1, 1.2, sharing=1.5)
    one = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=1, num_microbatches=2)
    pp2 = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=2)
    # one process: the other device idles, no sharing
    assert block_costs(graph, shared, one) == block_costs(graph, _scaled(cpu, 1.1, 1.2), one)
    alone, both = block_costs(graph, _scaled(cpu, 1.1, 1.2), pp2), block_costs(graph, shared, pp2)
    for a, b in zip(alone, both):
        assert b.forward_s == pytest.approx(1.5 * a.forward_s)
        assert b.backward_input_s + b.backward_weight_s == pytest.approx(
            1.5 * (a.backward_input_s + a.backward_weight_s))
    # a node of one device shares nothing
    single = replace(shared, devices_per_node=1, nodes=2)
    assert block_costs(graph, single, pp2) == block_costs(
        graph, replace(_scaled(cpu, 1.1, 1.2), devices_per_node=1, nodes=2), pp2)
