"""Alpha-beta collectives: ring formulas, the hierarchical all-reduce, group layouts."""

from __future__ import annotations

import dataclasses

import pytest

from tripar.errors import ConfigError
from tripar.partitioner.cost.collectives import (
    GroupLayout,
    all_gather_time,
    all_reduce_time,
    reduce_scatter_time,
)
from tripar.partitioner.hardware import Cluster


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


def _links(cluster: Cluster, **fractions: float) -> Cluster:
    eff = dataclasses.replace(cluster.device.efficiency, **fractions)
    return dataclasses.replace(cluster, device=dataclasses.replace(cluster.device,
                                                                   efficiency=eff))


def test_gather_and_scatter_use_their_measured_link():
    cpu = Cluster.builtin("cpu", nodes=1, gpus_per_node=2)
    lat, bw = cpu.link(False)   # bw: the all-reduce's fraction of the link
    # a profile of gloo, whose all-gather reaches a quarter of its all-reduce's bandwidth
    gloo = _links(cpu, link_all_gather=cpu.device.efficiency.link / 4,
                  link_reduce_scatter=cpu.device.efficiency.link / 2)
    assert all_gather_time(gloo, 8e6, 2) == pytest.approx(lat + 4e6 / (bw / 4))
    assert reduce_scatter_time(gloo, 8e6, 2) == pytest.approx(lat + 4e6 / (bw / 2))
    assert all_reduce_time(gloo, 8e6, 2) == all_reduce_time(cpu, 8e6, 2)
    # unmeasured (0): the all-reduce's fraction, the ring's equal halves
    assert all_gather_time(cpu, 8e6, 2) == reduce_scatter_time(cpu, 8e6, 2) == pytest.approx(
        lat + 4e6 / bw)
    with pytest.raises(ConfigError, match="link_all_gather must be in"):
        _links(cpu, link_all_gather=1.5)
