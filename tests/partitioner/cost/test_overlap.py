"""Sub-pipelined tensor parallelism in the cost model: a block in k parts costs the
two-stage pipeline of its parts' compute and collectives, and keeps the whole
microbatch's memory."""

from __future__ import annotations

import dataclasses

import pytest
from example_graphs import example_graph

from tripar.graph import analyze
from tripar.models import load_model
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
        # under sp the exits' gradient all-gathers are read at once: every part pays them
        assert (p.tp_backward_kept_s > 0) == sp
        assert s.backward_input_s == pytest.approx(pipelined(
            p.backward_input_s - p.tp_backward_comm_s,
            p.tp_backward_comm_s - p.tp_backward_kept_s, k) + k * p.tp_backward_kept_s)
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


def test_one_sample_splits_its_sequence_and_runs_the_attention_core_whole():
    """At micro-batch 1 each part is the block at 1/k of the tokens, and the attention
    core (the products of two activations, batched over heads) runs once, whole, between
    the parts: its time is added to the pipeline of the rest and hides nothing."""
    loaded = load_model("gpt:layers=2,hidden=4096,heads=32,vocab=4000,seq=2048",
                        batch_size=1, device="meta")
    graph = analyze(loaded.model, loaded.example_inputs, loaded.example_kwargs,
                    model_config=loaded.config)

    link = dataclasses.replace(A100, intra_bandwidth=A100.intra_bandwidth / 3)

    def costs(b: int, k: int):
        cfg = ParallelConfig(dp=1, tp=8, pp=1, micro_batch_size=b, num_microbatches=1,
                             tp_overlap=k)
        return block_costs(graph, link, cfg, dtype="bf16")

    whole, split, two_samples = costs(1, 1), costs(1, 2), costs(2, 1)
    layers = [i for i, w in enumerate(whole) if w.core_s]
    assert len(layers) == 2   # the two transformer layers hold attention products
    for i in layers:
        w, s, two = whole[i], split[i], two_samples[i]
        assert s.core_s == pytest.approx(w.core_s, rel=0.05)  # the core, once, whole
        assert s.forward_s >= s.core_s + s.tp_forward_comm_s
        assert s.tp_forward_comm_s < w.tp_forward_comm_s   # part of it hidden
        assert s.forward_s < w.forward_s < two.forward_s
        assert s.saved_bytes == w.saved_bytes
    step = [sum(c.forward_s + c.backward_input_s + c.backward_weight_s for c in cs)
            for cs in (whole, split)]
    assert step[1] < step[0]   # on a slower link the parts pay at one sample too


def test_sequence_parallelism_does_not_split_a_sequence_the_parts_split():
    with pytest.raises(Exception, match=r"splits the sequence, which sequence parallelism"):
        _costs(A100, 1, 2, sp=True)
