"""The small A100 clusters of the search tests (importable by name: tests/partitioner/
conftest.py puts this folder on the path)."""

from __future__ import annotations

import dataclasses

from tripar.partitioner.hardware import Cluster

GB = 10**9


def small_cluster(memory_gb: float, nodes: int = 2, gpus: int = 4) -> Cluster:
    cluster = Cluster.builtin("a100-80g", nodes=nodes, gpus_per_node=gpus)
    device = dataclasses.replace(cluster.device, memory_bytes=int(memory_gb * GB))
    return dataclasses.replace(cluster, device=device)
