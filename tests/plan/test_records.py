"""The plan's records: each refuses inconsistent fields when it is made."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from example_plans import GB, make_plan

from tripar.errors import PlanError
from tripar.plan import Alternative, ClusterInfo, Estimate, ModelInfo, StagePlan


def test_constructors_reject_inconsistent_fields():
    with pytest.raises(PlanError, match="recomputes \\['h.9'\\], which it does not hold"):
        StagePlan(0, 0, 0, ("h.0",), ("h.9",), 1.0, 10)
    with pytest.raises(PlanError, match="stage 3 holds no block"):
        StagePlan(3, 0, 0, (), (), 1.0, 10)
    with pytest.raises(PlanError, match="time_s must be a finite number >= 0"):
        StagePlan(0, 0, 0, ("h.0",), (), float("nan"), 10)
    with pytest.raises(PlanError, match="names a block twice: \\['a'\\]"):
        ModelInfo("m", "f", ("a", "b", "a"), 1)
    with pytest.raises(PlanError, match="not the largest stage memory"):
        Estimate(1.0, 1.0, 5, 0.1, (7, 5))
    with pytest.raises(PlanError, match="bubble_fraction must be a finite number >= 0"):
        Estimate(1.0, 1.0, 5, -0.5)
    with pytest.raises(PlanError, match="must say why it lost"):
        Alternative(make_plan().parallel, None, "")


def test_cluster_info_from_a_cluster_object():
    device = SimpleNamespace(name="h100-80g", memory_bytes=80 * GB, peak=lambda dtype: 989e12)
    cluster = SimpleNamespace(device=device, nodes=2, devices_per_node=8, intra_bandwidth=450e9,
                              inter_bandwidth=50e9, intra_latency=1e-6, inter_latency=5e-6,
                              name="2x8", to_dict=lambda: {"nodes": 2})
    info = ClusterInfo.from_cluster(cluster)
    assert info.devices == 16 and info.peak_flops == 989e12
    assert json.loads(info.profile) == {"nodes": 2}
