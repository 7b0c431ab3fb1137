"""Alpha-beta collectives: ring formulas, the hierarchical all-reduce, group layouts."""

from __future__ import annotations

import pytest

from tripar.partitioner.cost.collectives import (
    GroupLayout,
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
