"""Stage costs: static memory, recomputation, p2p, the data-parallel tail, boundaries."""

from __future__ import annotations

import dataclasses

import pytest
from example_graphs import example_graph

from tripar.errors import ConfigError
from tripar.partitioner.cost.blocks import block_costs
from tripar.partitioner.cost.collectives import (
    all_gather_time,
    all_reduce_time,
    p2p_time,
    reduce_scatter_time,
)
from tripar.partitioner.cost.stages import (
    BUCKET_BYTES,
    bytes_per_param,
    stage_costs,
    uniform_boundaries,
)
from tripar.partitioner.hardware import ADAM_STEP_BYTES, Cluster
from tripar.plan.config import ParallelConfig

A100 = Cluster.builtin("a100-80g", nodes=1, gpus_per_node=8)


def cfg(**kw) -> ParallelConfig:
    base = dict(dp=1, tp=1, pp=1, micro_batch_size=1, num_microbatches=4)
    base.update(kw)
    return ParallelConfig(**base)


def test_static_memory_adam_and_zero():
    assert bytes_per_param("bf16", 0, 4) == (4.0, 12.0)  # 16 bytes/param mixed precision
    assert bytes_per_param("fp32", 0, 4) == (8.0, 8.0)
    graph = example_graph(layers=4)
    params = sum(b.params for b in graph.blocks)
    plain = stage_costs(graph, A100, cfg(dp=4, num_microbatches=2))[0]
    zero = stage_costs(graph, A100, cfg(dp=4, num_microbatches=2, zero=1))[0]
    bucket = min(params * 2, BUCKET_BYTES)
    assert plain.static_bytes == pytest.approx(16 * params + bucket, abs=2)
    assert zero.static_bytes == pytest.approx((4 + 12 / 4) * params + bucket, abs=2)


def test_zero_stages_bytes_per_param_follow_megatron():
    # bf16 weights (2) and gradients (2), 12 bytes of fp32 optimizer state (master copy and two
    # moments); ZeRO-1 shards the 12 over dp, ZeRO-2 the gradients' 2 too
    assert [bytes_per_param("bf16", zero, 4) for zero in (0, 1, 2)] == \
        [(4.0, 12.0), (4.0, 3.0), (2.5, 3.0)]
    assert bytes_per_param("fp32", 2, 4) == (5.0, 2.0)  # fp32: no master copy
    graph = example_graph(layers=4)
    params = sum(b.params for b in graph.blocks)
    one, two = (stage_costs(graph, A100, cfg(dp=4, num_microbatches=2, zero=z))[0]
                for z in (1, 2))
    assert one.static_bytes - two.static_bytes == pytest.approx(2 * params * 3 / 4, abs=2)


def test_recompute_fraction_blends_memory_and_time():
    graph = example_graph(layers=4)
    config = cfg(pp=2, num_microbatches=4)
    none, half, full = (stage_costs(graph, A100, config, recompute=r) for r in (0.0, 0.5, 1.0))
    blocks = block_costs(graph, A100, config)[0:3]  # stage 0: embedding + 2 layers
    saved = sum(b.saved_bytes for b in blocks)
    inputs = sum(b.input_bytes for b in blocks)
    forward = sum(b.forward_s for b in blocks)
    assert none[0].activation_bytes == saved
    assert full[0].activation_bytes == inputs
    assert half[0].activation_bytes == int(0.5 * inputs + 0.5 * saved)
    assert half[0].backward_input_s == pytest.approx(none[0].backward_input_s + 0.5 * forward)
    assert half[0].forward_s == none[0].forward_s
    explicit = stage_costs(graph, A100, config, recompute="full", explicit_recompute=True)
    assert explicit[1].recompute_s == pytest.approx(explicit[1].forward_s)
    assert explicit[1].activation_bytes == none[1].activation_bytes
    stage1 = block_costs(graph, A100, config)[3:]
    assert explicit[1].input_bytes == sum(b.input_bytes for b in stage1)  # every block's input
    assert explicit[1].backward_input_s == none[1].backward_input_s
    with pytest.raises(ConfigError, match="2 numbers in \\[0, 1\\]"):
        stage_costs(graph, A100, config, recompute=[0.5, 2.0])
    with pytest.raises(ConfigError, match="per-stage fractions"):
        stage_costs(graph, A100, config, recompute="stage-aware")


def test_p2p_crosses_nodes_only_when_stages_do():
    graph = example_graph(layers=4, hidden=2048, seq=2048)
    two_nodes = Cluster.builtin("a100-80g", nodes=2, gpus_per_node=8)
    one_node = Cluster.builtin("a100-80g", nodes=1, gpus_per_node=16)
    config = cfg(tp=8, pp=2)
    across = stage_costs(graph, two_nodes, config)
    inside = stage_costs(graph, one_node, config)
    assert across[1].send_s == 0 and inside[1].send_s == 0  # the last stage sends nothing
    output = block_costs(graph, two_nodes, config)[2].output_bytes
    gather = all_gather_time(two_nodes, output, 8)
    assert across[0].send_s == pytest.approx(p2p_time(two_nodes, output / 8, True) + gather)
    assert inside[0].send_s == pytest.approx(p2p_time(one_node, output / 8, False) + gather)
    assert across[0].send_s - gather > 3 * (inside[0].send_s - gather)


def test_data_parallel_tail_overlaps_all_but_the_rest():
    graph = example_graph(layers=4, hidden=1024)
    cluster = Cluster.builtin("a100-80g", nodes=4, gpus_per_node=8)
    alone = stage_costs(graph, cluster, cfg())[0]
    dp = stage_costs(graph, cluster, cfg(dp=32))[0]
    zero = stage_costs(graph, cluster, cfg(dp=32, zero=1))[0]
    params = sum(b.params for b in graph.blocks)
    optimizer = params * ADAM_STEP_BYTES / (
        cluster.device.memory_bandwidth * cluster.device.efficiency.memory)
    assert alone.tail_s == pytest.approx(optimizer)
    full = all_reduce_time(cluster, params * 2, 32)
    last = all_reduce_time(cluster, min(params * 2, BUCKET_BYTES), 32)
    assert last <= dp.tail_s - optimizer <= full
    assert zero.tail_s > optimizer / 32


def test_zero_tail_reduce_scatters_gathers_and_copies_into_the_parameters():
    graph = example_graph(layers=4, hidden=1024)
    params = sum(b.params for b in graph.blocks)
    grad = params * 2  # bf16
    rate = A100.device.memory_bandwidth * A100.device.efficiency.memory
    zero = stage_costs(graph, A100, cfg(dp=8, zero=1))[0]
    backward = zero.backward_input_s + zero.backward_weight_s
    hidden = max(reduce_scatter_time(A100, min(grad, BUCKET_BYTES), 8),
                 reduce_scatter_time(A100, grad, 8) - backward)
    # the step on 1/8, the exposed reduce-scatter, the all-gather of the updated shards and
    # their copy out of the gathered buckets into the parameters (read and written)
    assert zero.tail_s == pytest.approx(params * ADAM_STEP_BYTES / rate / 8 + hidden
                                        + all_gather_time(A100, grad, 8) + 2 * grad / rate)
    # a profile whose all-gather reaches a quarter of the all-reduce's link (gloo-like)
    eff = dataclasses.replace(A100.device.efficiency,
                              link_all_gather=A100.device.efficiency.link / 4)
    gloo = dataclasses.replace(A100, device=dataclasses.replace(A100.device, efficiency=eff))
    slow = stage_costs(graph, gloo, cfg(dp=8, zero=1))[0]
    assert slow.tail_s - zero.tail_s == pytest.approx(
        all_gather_time(gloo, grad, 8) - all_gather_time(A100, grad, 8))
    assert slow.tail_s > stage_costs(graph, gloo, cfg(dp=8))[0].tail_s


def test_uniform_boundaries_and_errors():
    graph = example_graph(layers=6)
    assert uniform_boundaries(graph, 3) == (0, 3, 5)
    assert uniform_boundaries(graph, 4) == (0, 3, 5, 6)  # 6 layers: 2, 2, 1, 1
    costs = stage_costs(graph, A100, cfg(pp=3), boundaries=(0, 3, 5, 8))
    assert len(costs) == 3
    with pytest.raises(ConfigError, match="cannot split 6 layers into 7"):
        uniform_boundaries(graph, 7)
    with pytest.raises(ConfigError, match="first block of each"):
        stage_costs(graph, A100, cfg(pp=3), boundaries=(0, 5, 3))
    with pytest.raises(ConfigError, match="cluster has 8"):
        stage_costs(graph, A100, cfg(dp=4, tp=4))


def test_stage_costs_are_valid_stage_cost_objects():
    graph = example_graph(layers=8)
    costs = stage_costs(graph, Cluster.builtin("h100-80g", nodes=2),
                        cfg(dp=2, tp=4, pp=2, num_microbatches=8, recompute="full"))
    for cost in costs:
        assert cost.forward_s > 0 and cost.backward_input_s > cost.forward_s
        assert cost.static_bytes > 0 and cost.activation_bytes > 0
    assert dataclasses.is_dataclass(costs[0])


def _with_host_costs(cluster: Cluster, **fields) -> Cluster:
    device = dataclasses.replace(cluster.device, efficiency=dataclasses.replace(
        cluster.device.efficiency, **fields))
    return dataclasses.replace(cluster, device=device)


def test_optimizer_step_counts_bytes_and_tensors():
    base = example_graph(layers=2)
    count = {"embedding": 2, "layer": 12, "head": 1}  # equal signatures, equal counts
    names = [tuple(f"{b.name}.p{j}" for j in range(count[b.kind])) for b in base.blocks]
    graph = dataclasses.replace(base, blocks=[dataclasses.replace(b, param_names=n)
                                              for b, n in zip(base.blocks, names)])
    cpu = Cluster.builtin("cpu")
    tuned = _with_host_costs(cpu, optimizer_bytes=70.0, optimizer_tensor_s=2e-5)
    params = sum(b.params for b in graph.blocks)
    rate = cpu.device.memory_bandwidth * cpu.device.efficiency.memory
    (before,) = stage_costs(graph, cpu, cfg())
    (after,) = stage_costs(graph, tuned, cfg())
    assert before.tail_s == pytest.approx(params * ADAM_STEP_BYTES / rate)
    tensors = sum(len(n) for n in names)
    assert after.tail_s == pytest.approx(params * 70.0 / rate + tensors * 2e-5)
    # SGD's fused step moves 12 of Adam's 28 bytes: both fitted terms scale by 12/28
    (sgd,) = stage_costs(graph, tuned.with_optimizer(12.0), cfg())
    assert sgd.tail_s == pytest.approx((params * 70.0 / rate + tensors * 2e-5) * 12 / 28)
    with pytest.raises(ConfigError, match="positive number of bytes"):
        tuned.with_optimizer(0.0)
    two = stage_costs(graph, tuned, cfg(pp=2))
    assert sum(s.tail_s for s in two) == pytest.approx(after.tail_s)
