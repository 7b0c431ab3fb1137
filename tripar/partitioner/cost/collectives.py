"""Alpha-beta models of collectives and point-to-point transfers.

Ring formulas (shared/REFERENCE.md) on n ranks, payload M bytes, latency
alpha, bandwidth beta: all-reduce ``2(n-1) alpha + 2 (n-1)/n M / beta``;
all-gather and reduce-scatter ``(n-1) alpha + (n-1)/n M / beta``, beta the
link's bandwidth times the fraction each kind reaches (``Efficiency.link``;
all-gather and reduce-scatter their own where ``tripar calibrate`` measured
them: gloo's are slower than its all-reduce). A group
is laid out on consecutive ranks with stride ``stride`` (tp innermost, then
dp, then pp). A group inside one node uses the intra-node link. A group
that spans nodes is reduced hierarchically: reduce-scatter among the
group's members of each node, all-reduce across nodes of the 1/local share
over each device's share of the node network, all-gather inside the node.
"""

from __future__ import annotations

from dataclasses import dataclass

from tripar.partitioner.hardware import Cluster


@dataclass(frozen=True, slots=True)
class GroupLayout:
    """How a communication group of ``size`` ranks sits on the nodes."""

    size: int
    local: int
    """Members of the group in one node."""
    nodes: int
    """Nodes the group spans."""

    @classmethod
    def of(cls, cluster: Cluster, size: int, stride: int) -> GroupLayout:
        """Layout of a group of ``size`` ranks ``stride`` apart.

        >>> from tripar.partitioner.hardware import Cluster
        >>> c = Cluster.builtin("a100-80g", nodes=4, gpus_per_node=8)
        >>> GroupLayout.of(c, 8, 1), GroupLayout.of(c, 4, 8)
        (GroupLayout(size=8, local=8, nodes=1), GroupLayout(size=4, local=1, nodes=4))
        """
        per_node = cluster.devices_per_node
        span = size * stride
        if span <= per_node:
            return cls(size=size, local=size, nodes=1)
        local = max(1, per_node // stride)
        local = min(local, size)
        return cls(size=size, local=local, nodes=max(1, -(-size // local)))


def _ring(n: int, steps_factor: float, payload: float, latency: float, bandwidth: float) -> float:
    if n <= 1 or payload <= 0:
        return 0.0
    return steps_factor * ((n - 1) * latency + (n - 1) / n * payload / bandwidth)


def all_reduce_time(cluster: Cluster, payload: float, size: int, stride: int = 1) -> float:
    """Seconds to all-reduce ``payload`` bytes over ``size`` ranks ``stride`` apart.

    >>> from tripar.partitioner.hardware import Cluster
    >>> c = Cluster.builtin("a100-80g", nodes=2, gpus_per_node=8)
    >>> all_reduce_time(c, 1e9, 8) < all_reduce_time(c, 1e9, 2, stride=8)
    True
    """
    layout = GroupLayout.of(cluster, size, stride)
    if layout.size <= 1:
        return 0.0
    if layout.nodes == 1:
        lat, bw = cluster.link(False)
        return _ring(layout.size, 2.0, payload, lat, bw)
    lat_in, bw_in = cluster.link(False)
    lat_out, bw_out = cluster.link(True)
    inner = _ring(layout.local, 1.0, payload, lat_in, bw_in)  # reduce-scatter in the node
    outer = _ring(layout.nodes, 2.0, payload / layout.local, lat_out, bw_out)
    return 2 * inner + outer  # + all-gather in the node


def _half_ring(cluster: Cluster, kind: str, payload: float, size: int, stride: int) -> float:
    """A reduce-scatter's or all-gather's ring (one pass), at the link ``kind`` reaches."""
    layout = GroupLayout.of(cluster, size, stride)
    if layout.size <= 1:
        return 0.0
    if layout.nodes == 1:
        lat, bw = cluster.link(False, kind)
        return _ring(layout.size, 1.0, payload, lat, bw)
    lat_in, bw_in = cluster.link(False, kind)
    lat_out, bw_out = cluster.link(True, kind)
    return (_ring(layout.local, 1.0, payload, lat_in, bw_in)
            + _ring(layout.nodes, 1.0, payload / layout.local, lat_out, bw_out))


def reduce_scatter_time(cluster: Cluster, payload: float, size: int, stride: int = 1) -> float:
    """Seconds to reduce-scatter ``payload`` bytes (the whole buffer) over a group."""
    return _half_ring(cluster, "reduce_scatter", payload, size, stride)


def all_gather_time(cluster: Cluster, payload: float, size: int, stride: int = 1) -> float:
    """Seconds to all-gather a ``payload``-byte buffer (the gathered size) over a group: on
    the ring a reduce-scatter's time, unless the profile measured the two apart.

    >>> from tripar.partitioner.hardware import Cluster
    >>> c = Cluster.builtin("a100-80g", nodes=1, gpus_per_node=8)
    >>> all_gather_time(c, 1e9, 8) == reduce_scatter_time(c, 1e9, 8)
    True
    """
    return _half_ring(cluster, "all_gather", payload, size, stride)


def collective_time(cluster: Cluster, kind: str, payload: float, size: int,
                    stride: int = 1) -> float:
    """Dispatch on ``all_reduce``, ``all_gather``, ``reduce_scatter`` or ``none``."""
    if kind == "none" or size <= 1:
        return 0.0
    if kind == "all_reduce":
        return all_reduce_time(cluster, payload, size, stride)
    if kind == "all_gather":
        return all_gather_time(cluster, payload, size, stride)
    if kind == "reduce_scatter":
        return reduce_scatter_time(cluster, payload, size, stride)
    raise ValueError(f"unknown collective {kind!r}")


def p2p_time(cluster: Cluster, payload: float, crosses_nodes: bool) -> float:
    """Seconds to send ``payload`` bytes to one peer: latency + bytes / bandwidth.

    >>> from tripar.partitioner.hardware import Cluster
    >>> c = Cluster.builtin("a100-80g", nodes=2, gpus_per_node=8)
    >>> p2p_time(c, 0, True)
    0.0
    """
    if payload <= 0:
        return 0.0
    lat, bw = cluster.link(crosses_nodes)
    return lat + payload / bw
