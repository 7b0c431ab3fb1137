"""The search and selective recomputation: pinned, it holds every stage to the selective
segments; unpinned, a stage uses them where memory binds and they are the cheaper way to
fit; a graph without them is planned as before."""

from __future__ import annotations

import dataclasses
import functools

import pytest

from tripar.errors import ConfigError
from tripar.graph import capture_model
from tripar.models import load_model
from tripar.partitioner import Pins, search, step_estimate
from tripar.partitioner.hardware import Cluster
from tripar.plan.config import ParallelConfig

SPEC = "gpt:layers=4,hidden=32,heads=8,vocab=64,seq=32,attention=eager"


@functools.cache
def _graph():
    loaded = load_model(SPEC, batch_size=1)
    return capture_model(loaded.model, loaded.example_inputs).graph


def _cluster(memory: int) -> Cluster:
    cpu = Cluster.builtin("cpu", gpus_per_node=2)
    return dataclasses.replace(cpu, device=dataclasses.replace(cpu.device, memory_bytes=memory))


def _peaks() -> dict[str, int]:
    cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=4)
    return {r: step_estimate(_graph(), _cluster(2**34), dataclasses.replace(cfg, recompute=r),
                             record_timeline=False).peak_memory_bytes
            for r in ("none", "selective")}


PINS = dict(dp=1, tp=1, pp=2, micro_batch_size=1, schedule="1f1b")


def test_selective_recomputation_is_what_fits_between_none_and_whole_blocks():
    peaks = _peaks()
    assert peaks["selective"] < peaks["none"]
    tight = _cluster((peaks["selective"] + peaks["none"]) // 2)
    plan = search(_graph(), tight, 4, pins=Pins(**PINS))
    assert plan.validate() is plan and plan.estimate.peak_memory_bytes <= tight.device.memory_bytes
    assert plan.stages[0].selective  # the first stage holds the most microbatches
    assert plan.stages[0].granularity.startswith("selective")
    pinned = search(_graph(), tight, 4, pins=Pins(**PINS, recompute="selective"))
    assert pinned.parallel.recompute == "selective"
    assert all(st.selective and not st.recompute for st in pinned.stages)
    assert plan.estimate.step_time_s <= pinned.estimate.step_time_s * (1 + 1e-9)
    # without selective segments the same budget takes whole blocks, never faster
    plain = dataclasses.replace(_graph(), blocks=[
        dataclasses.replace(b, selective_nodes=(), selective_bytes=0, selective_flops=0,
                            selective_ops=0) for b in _graph().blocks])
    before = search(plain, tight, 4, pins=Pins(**PINS))
    assert not any(st.selective for st in before.stages)
    assert plan.estimate.step_time_s <= before.estimate.step_time_s * (1 + 1e-9)


def test_where_memory_does_not_bind_nothing_is_recomputed():
    plan = search(_graph(), _cluster(2**34), 4, pins=Pins(**PINS))
    assert all(st.granularity == "none" for st in plan.stages)


def test_a_fused_kernel_has_nothing_to_recompute_selectively_and_a_pin_says_why():
    loaded = load_model("gpt:layers=2,hidden=32,heads=8,vocab=64,seq=32", batch_size=1)
    graph = capture_model(loaded.model, loaded.example_inputs).graph
    assert not any(b.selective_nodes for b in graph.blocks)  # no score matrix is kept
    with pytest.raises(ConfigError, match="no block of this model has a part cheap to "
                                          "recompute and costly to keep"):
        search(graph, _cluster(2**34), 4, pins=Pins(**PINS, recompute="selective"))
