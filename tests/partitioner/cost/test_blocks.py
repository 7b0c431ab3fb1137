"""Block costs on hand-built proxy graphs (no tracing, no process group)."""

from __future__ import annotations

import dataclasses

import pytest
from example_graphs import example_graph

from tripar.errors import ConfigError
from tripar.partitioner.cost import blocks as block_model
from tripar.partitioner.cost.blocks import block_costs, shardable_regions
from tripar.partitioner.hardware import Cluster
from tripar.plan.config import ParallelConfig

A100 = Cluster.builtin("a100-80g", nodes=1, gpus_per_node=8)


def cfg(**kw) -> ParallelConfig:
    base = dict(dp=1, tp=1, pp=1, micro_batch_size=1, num_microbatches=4)
    base.update(kw)
    return ParallelConfig(**base)


def test_repeated_blocks_are_costed_once(monkeypatch):
    calls = []
    real = block_model._block_cost

    def counting(block, *args):
        calls.append(block.signature)
        return real(block, *args)

    monkeypatch.setattr(block_model, "_block_cost", counting)
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


def test_block_costs_shard_a_subset_of_regions():
    from tripar.commands._model_args import proxy_graph_for

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
