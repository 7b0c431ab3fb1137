"""Pins that contradict each other, the cluster, the batch or the model; a model that
fits no configuration."""

from __future__ import annotations

import pytest
from example_graphs import example_graph
from search_clusters import small_cluster

from tripar.errors import ConfigError, InfeasibleError
from tripar.partitioner.plan_search import Pins, search


def test_contradicting_pins_and_infeasible_models():
    graph = example_graph(layers=4, hidden=512, seq=256, vocab=4000, heads=4)
    with pytest.raises(ConfigError, match="--dp 3 does not divide the 8 devices"):
        search(graph, small_cluster(80), 16, pins=Pins(dp=3))
    with pytest.raises(ConfigError, match="--tp 3.*4 attention heads.*proven degrees: 2, 4"):
        search(graph, small_cluster(80), 16, pins=Pins(tp=3))
    with pytest.raises(ConfigError, match=r"global batch 12 is not divisible by dp x "
                                          r"micro-batch = 2 x 4 = 8"):
        search(graph, small_cluster(80), 12, pins=Pins(dp=2, micro_batch_size=4))
    with pytest.raises(ConfigError, match="vpp=2 needs schedule interleaved-1f1b"):
        Pins(vpp=2, schedule="1f1b")
    with pytest.raises(InfeasibleError, match="no configuration of 8 devices fits") as info:
        search(graph, small_cluster(0.001), 16)
    message = str(info.value)
    assert "pipeline stage" in message and "bytes more than" in message and "fix:" in message
