"""The cost model on hand-built proxy graphs (no tracing, no process group)."""

from __future__ import annotations

import dataclasses

import pytest

from tripar.errors import ConfigError
from tripar.partitioner import cost_model
from tripar.partitioner.collectives import (
    GroupLayout,
    all_gather_time,
    all_reduce_time,
    p2p_time,
    reduce_scatter_time,
)
from tripar.partitioner.cost_model import (
    block_costs,
    bytes_per_param,
    example_graph,
    stage_costs,
    uniform_boundaries,
)
from tripar.partitioner.hardware import Cluster
from tripar.plan.config import ParallelConfig

A100 = Cluster.builtin("a100-80g", nodes=1, gpus_per_node=8)


def cfg(**kw) -> ParallelConfig:
    base = dict(dp=1, tp=1, pp=1, micro_batch_size=1, num_microbatches=4)
    base.update(kw)
    return ParallelConfig(**base)


def test_repeated_blocks_are_costed_once(monkeypatch):
    calls = []
    real = cost_model._block_cost

    def counting(block, *args):
        calls.append(block.signature)
        return real(block, *args)

    monkeypatch.setattr(cost_model, "_block_cost", counting)
    costs = block_costs(example_graph(layers=12), A100, cfg())
    assert len(costs) == 14
    assert sorted(calls) == ["emb", "head", "layer"]
    assert len({id(c) for c in costs[1:13]}) == 1


def test_microbatch_scales_bytes_and_flops_linearly():
    graph = example_graph(layers=2, hidden=1024, seq=1024)
    one = block_costs(graph, A100, cfg(micro_batch_size=1))[1]
    four = block_costs(graph, A100, cfg(micro_batch_size=4))[1]
    assert four.saved_bytes == 4 * one.saved_bytes
    assert four.input_bytes == 4 * one.input_bytes
    # 4x the FLOPs on bigger (more efficient) products: between 3x and 4x the time.
    assert 3.0 * one.forward_s < four.forward_s <= 4.0 * one.forward_s


def test_training_dtype_sets_bytes_and_peak():
    graph = example_graph(layers=2)
    bf16 = block_costs(graph, A100, cfg(), dtype="bf16")[1]
    fp32 = block_costs(graph, A100, cfg(), dtype="fp32")[1]
    block = graph.blocks[1]
    assert fp32.saved_bytes == block.saved_bytes  # graph annotated in fp32
    assert bf16.saved_bytes == block.saved_bytes // 2
    assert fp32.forward_s > 10 * bf16.forward_s  # 19.5 vs 312 TFLOP/s peak


def test_forward_time_matches_efficiency_curve():
    graph = example_graph(layers=1, hidden=2048, seq=2048)
    cost = block_costs(graph, A100, cfg())[1]
    spec = A100.device
    eff = spec.efficiency
    block = graph.blocks[1]
    listed = sum(2 * m * k * n for m, k, n in block.matmuls)
    listed_time = sum(2 * m * k * n / (spec.peak("bf16") * eff.matmul(m, k, n))
                      for m, k, n in block.matmuls)
    rest = (block.forward_flops - listed) * listed_time / listed
    memory = eff.memory_traffic * (block.saved_bytes / 2) / (spec.memory_bandwidth * eff.memory)
    assert cost.forward_s == pytest.approx(listed_time + rest + memory, rel=1e-9)
    assert cost.backward_input_s + cost.backward_weight_s > 1.9 * (listed_time + rest)


def test_backward_split_weight_gradient():
    graph = example_graph(layers=1, hidden=1024, seq=512)
    cost = block_costs(graph, A100, cfg())[1]
    block = graph.blocks[1]
    tokens = 512
    weight_flops = 2 * tokens * block.params
    # W carries 2*tokens*params FLOPs; B the rest (input grads of linears + attention).
    ratio = weight_flops / (block.backward_flops - weight_flops)
    seconds_per_flop = (cost.backward_weight_s) / weight_flops
    assert ratio < 1 and cost.backward_weight_s < cost.backward_input_s
    assert seconds_per_flop > 0
    embedding = block_costs(graph, A100, cfg())[0]
    assert embedding.backward_weight_s > 100 * embedding.backward_input_s  # no FLOPs
    assert embedding.weight_grad_bytes == 0 and cost.weight_grad_bytes > 0


def test_tensor_parallel_korthikanti_memory_and_collectives():
    s, h, a = 1024, 1024, 16
    graph = example_graph(layers=2, hidden=h, seq=s, heads=a)
    one = block_costs(graph, A100, cfg())[1]
    for t in (2, 4, 8):
        sharded = block_costs(graph, A100, cfg(tp=t))[1]
        # s b h (10 + 24/t + 5 a s / (h t)) bytes in bf16 (Korthikanti et al.)
        assert sharded.saved_bytes == pytest.approx(s * h * (10 + 24 / t + 5 * a * s / (h * t)),
                                                    rel=1e-6)
        assert sharded.params == one.params // t
        ring = 2 * (t - 1) / t * (4 * s * h / 2) / (A100.intra_bandwidth *
                                                    A100.device.efficiency.link)
        assert sharded.tp_comm_s == pytest.approx(4 * (ring + 2 * (t - 1) * A100.intra_latency))
        assert sharded.forward_s < one.forward_s
    # A degree the regions were not proven for keeps the block replicated.
    replicated = block_costs(example_graph(layers=2, heads=4), A100, cfg(tp=8))[1]
    assert replicated == block_costs(example_graph(layers=2, heads=4), A100, cfg())[1]


def test_static_memory_adam_and_zero():
    assert bytes_per_param("bf16", 0, 4) == (4.0, 12.0)  # 16 bytes/param mixed precision
    assert bytes_per_param("fp32", 0, 4) == (8.0, 8.0)
    graph = example_graph(layers=4)
    params = sum(b.params for b in graph.blocks)
    plain = stage_costs(graph, A100, cfg(dp=4, num_microbatches=2))[0]
    zero = stage_costs(graph, A100, cfg(dp=4, num_microbatches=2, zero=1))[0]
    bucket = min(params * 2, cost_model.BUCKET_BYTES)
    assert plain.static_bytes == pytest.approx(16 * params + bucket, abs=2)
    assert zero.static_bytes == pytest.approx((4 + 12 / 4) * params + bucket, abs=2)


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
    optimizer = params * cost_model.ADAM_STEP_BYTES / (
        cluster.device.memory_bandwidth * cluster.device.efficiency.memory)
    assert alone.tail_s == pytest.approx(optimizer)
    full = all_reduce_time(cluster, params * 2, 32)
    last = all_reduce_time(cluster, min(params * 2, cost_model.BUCKET_BYTES), 32)
    assert last <= dp.tail_s - optimizer <= full
    assert zero.tail_s > optimizer / 32


def test_collective_formulas():
    c = Cluster.builtin("a100-80g", nodes=4, gpus_per_node=8)
    lat, bw = c.link(False)
    assert all_reduce_time(c, 8e9, 8) == pytest.approx(2 * 7 * lat + 2 * 7 / 8 * 8e9 / bw)
    assert reduce_scatter_time(c, 8e9, 8) == pytest.approx(7 * lat + 7 / 8 * 8e9 / bw)
    # Hierarchical: 32 ranks, 8 per node: two intra rings and one inter ring on 1/8.
    lat_o, bw_o = c.link(True)
    expected = 2 * (7 * lat + 7 / 8 * 8e9 / bw) + 2 * (3 * lat_o + 3 / 4 * 1e9 / bw_o)
    assert all_reduce_time(c, 8e9, 32) == pytest.approx(expected)
    assert GroupLayout.of(c, 4, 8) == GroupLayout(4, 1, 4)
    assert all_reduce_time(c, 8e9, 1) == 0.0


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


def _small_memory(cluster: Cluster, gib: float) -> Cluster:
    device = dataclasses.replace(cluster.device, memory_bytes=int(gib * 2**30))
    return dataclasses.replace(cluster, device=device)


def test_step_estimate_recompute_policies():
    graph = example_graph(layers=8, hidden=1024, seq=1024, heads=16)
    config = cfg(pp=4, num_microbatches=8)
    cluster = Cluster.builtin("a100-80g", nodes=1, gpus_per_node=4)
    none = cost_model.step_estimate(graph, cluster, config, recompute="none")
    full = cost_model.step_estimate(graph, cluster, config, recompute="full")
    assert full.step_time_s > none.step_time_s
    assert full.peak_memory_bytes < none.peak_memory_bytes
    assert full.recompute == (1.0,) * 4 and none.recompute == (0.0,) * 4
    # 1F1B holds min(p - i, m) microbatches on stage i.
    assert none.sim.stage_peak_inflight == (4, 3, 2, 1)
    assert none.tokens_per_s == pytest.approx(8 * 1024 / none.step_time_s)
    # Memory between the two: stage-aware recomputes more on early stages, none on the last.
    budget = (none.peak_memory_bytes + full.peak_memory_bytes) / 2
    tight = cost_model.step_estimate(graph, _small_memory(cluster, budget / 2**30), config,
                                     recompute="stage-aware")
    assert tight.fits
    r = tight.recompute
    assert r[0] > 0 and r[-1] == 0.0 and list(r) == sorted(r, reverse=True)
    assert none.step_time_s < tight.step_time_s < full.step_time_s


def test_step_estimate_interleaved_and_zero_bubble():
    graph = example_graph(layers=8, hidden=512, seq=512)
    cluster = Cluster.builtin("a100-80g", nodes=1, gpus_per_node=4)
    plain = cost_model.step_estimate(graph, cluster, cfg(pp=4, num_microbatches=8))
    inter = cost_model.step_estimate(graph, cluster, cfg(pp=4, num_microbatches=8, vpp=2,
                                                         schedule="interleaved-1f1b"))
    zb = cost_model.step_estimate(graph, cluster, cfg(pp=4, num_microbatches=8,
                                                      schedule="zb-h1"))
    assert len(inter.stage_costs) == 8 and len(inter.rank_memory_bytes) == 4
    assert inter.bubble_fraction < plain.bubble_fraction
    assert zb.step_time_s < plain.step_time_s


def test_block_costs_shard_a_subset_of_regions():
    from tripar.commands._model_args import proxy_graph_for
    from tripar.errors import ConfigError
    from tripar.partitioner.cost_model import block_costs, shardable_regions
    from tripar.partitioner.hardware import Cluster
    from tripar.plan.config import ParallelConfig

    graph = proxy_graph_for("gpt:layers=2,hidden=256,heads=4,vocab=1000,seq=128")
    cluster = Cluster.builtin("a100-80g")
    tp2 = ParallelConfig(1, 2, 1, 1, 1)
    every = shardable_regions(graph, 2)
    full = block_costs(graph, cluster, tp2)
    assert full == block_costs(graph, cluster, tp2, tp_regions=every)
    none = block_costs(graph, cluster, tp2, tp_regions=())
    assert none[1] == block_costs(graph, cluster, ParallelConfig(1, 1, 1, 1, 1))[1]
    mlp = block_costs(graph, cluster, tp2, tp_regions=[r for r in every if r.endswith(":mlp:0")])
    attn = block_costs(graph, cluster, tp2,
                       tp_regions=[r for r in every if r.endswith(":attention:0")])
    layer = 1
    # the MLP holds 2/3 of a GPT layer's weights (8h^2 of 12h^2), attention the rest
    for part in (mlp, attn):
        assert full[layer].params < part[layer].params < none[layer].params
        assert full[layer].forward_s - full[layer].tp_comm_s / 2 < part[layer].forward_s
    saved_mlp = none[layer].params - mlp[layer].params
    saved_attn = none[layer].params - attn[layer].params
    assert 1.9 < saved_mlp / saved_attn < 2.1
    assert mlp[layer].tp_comm_s == attn[layer].tp_comm_s > 0
    # heads=4: attention is not proven at tp=8, so only the MLP shards there
    tp8 = block_costs(graph, cluster, ParallelConfig(1, 8, 1, 1, 1))
    assert "blocks.0:attention:0" not in shardable_regions(graph, 8)
    # the MLP's share split 8 ways instead of 2: (1 - 1/8) / (1 - 1/2) = 1.75 times the saving
    assert abs((none[layer].params - tp8[layer].params) / saved_mlp - 1.75) < 0.01
    with pytest.raises(ConfigError, match="not proven at that degree"):
        block_costs(graph, cluster, ParallelConfig(1, 8, 1, 1, 1),
                    tp_regions=["blocks.0:attention:0"])


def _with_host_costs(cluster: Cluster, **fields) -> Cluster:
    device = dataclasses.replace(cluster.device, efficiency=dataclasses.replace(
        cluster.device.efficiency, **fields))
    return dataclasses.replace(cluster, device=device)


def test_per_operator_overhead_is_paid_in_forward_and_backward():
    base = example_graph(layers=2)
    ops = {"embedding": 5, "layer": 22, "head": 3}  # equal signatures, equal counts
    graph = dataclasses.replace(base, blocks=[dataclasses.replace(b, ops=ops[b.kind])
                                              for b in base.blocks])
    cpu = Cluster.builtin("cpu")
    slow = _with_host_costs(cpu, op_s=1e-4)
    plain, ops0 = block_costs(graph, cpu, cfg()), block_costs(base, slow, cfg())
    charged = block_costs(graph, slow, cfg())
    assert ops0 == block_costs(base, cpu, cfg())  # no operators counted: nothing added
    for block, a, b in zip(graph.blocks, plain, charged):
        assert b.forward_s - a.forward_s == pytest.approx(block.ops * 1e-4)
        assert b.backward_input_s - a.backward_input_s == pytest.approx(block.ops * 1e-4)
        assert b.backward_weight_s == pytest.approx(a.backward_weight_s)


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
    assert before.tail_s == pytest.approx(params * cost_model.ADAM_STEP_BYTES / rate)
    tensors = sum(len(n) for n in names)
    assert after.tail_s == pytest.approx(params * 70.0 / rate + tensors * 2e-5)
    two = stage_costs(graph, tuned, cfg(pp=2))
    assert sum(s.tail_s for s in two) == pytest.approx(after.tail_s)
