"""What one search computes once and reads many times: block costs and uniform splits.

The keys are typed, one kind of key per kind of value: :class:`CostPoint` (a
tensor-parallel degree and a microbatch size) and :class:`ShardedCosts` (the same with
the regions sharded) for block costs; the other parts of the search keep their own
caches under their own key types (:class:`ScheduleKey`, :class:`PartitionKey`,
:class:`RegionChoiceKey`).
"""

from __future__ import annotations

from typing import NamedTuple

from tripar.errors import ConfigError
from tripar.graph.proxy import ProxyGraph
from tripar.partitioner.cost.blocks import BlockCost, block_costs
from tripar.partitioner.cost.stages import uniform_boundaries
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.partition.problem import PartitionProblem
from tripar.plan.config import ParallelConfig


class CostPoint(NamedTuple):
    """What block costs depend on besides the regions sharded."""

    tp: int
    micro_batch_size: int
    tp_overlap: int = 1


class ShardedCosts(NamedTuple):
    """The block costs at a degree and microbatch size with ``shard`` sharded."""

    tp: int
    micro_batch_size: int
    shard: frozenset[str]
    sp: bool = False
    """Sequence parallelism on (``ParallelConfig.sp``)."""
    tp_overlap: int = 1
    """Parts a microbatch runs as inside a tensor-parallel block (``ParallelConfig.tp_overlap``)."""


class ScheduleKey(NamedTuple):
    """A built schedule: what ``build_schedule`` takes."""

    schedule: str
    pp: int
    num_microbatches: int
    vpp: int
    recompute: str

    @classmethod
    def of(cls, cfg: ParallelConfig, recompute: str) -> ScheduleKey:
        return cls(cfg.schedule, cfg.pp, cfg.num_microbatches, cfg.vpp, recompute)


class PartitionKey(NamedTuple):
    """A solved stage partition: the DP's (``split`` None) or a fixed split's."""

    problem: PartitionProblem
    split: tuple[int, ...] | None


class RegionChoiceKey(NamedTuple):
    """What the tensor-parallel ILP's choice for a configuration depends on."""

    tp: int
    micro_batch_size: int
    pp: int
    vpp: int
    dp: int
    zero: int
    rank0_in_flight: int | tuple[int, ...]
    """Microbatches pipeline rank 0 holds (per virtual stage when vpp > 1)."""
    pipelines: int = 1
    """2 under chimera: every rank holds two stages' weights."""


class BlockCostCache:
    """``block_costs`` of one graph on one cluster in one dtype, per :class:`ShardedCosts`
    (blocks of equal signature are costed once inside each call)."""

    def __init__(self, graph: ProxyGraph, cluster: Cluster, dtype: str) -> None:
        self.graph, self.cluster, self.dtype = graph, cluster, dtype
        self._costs: dict[ShardedCosts, list[BlockCost]] = {}

    def get(self, tp: int, micro_batch_size: int, shard: frozenset[str], sp: bool = False,
            tp_overlap: int = 1) -> list[BlockCost]:
        """Block costs at degree ``tp`` and microbatch ``micro_batch_size`` with the
        regions ``shard`` sharded (and sequence parallelism when ``sp``; the microbatch
        in ``tp_overlap`` parts inside tensor-parallel blocks)."""
        key = ShardedCosts(tp, micro_batch_size, shard, sp and tp > 1,
                           tp_overlap if tp > 1 else 1)
        if key not in self._costs:
            cfg = ParallelConfig(dp=1, tp=tp, pp=1, micro_batch_size=micro_batch_size,
                                 num_microbatches=1, sp=key.sp, tp_overlap=key.tp_overlap)
            self._costs[key] = block_costs(self.graph, self.cluster, cfg, dtype=self.dtype,
                                           tp_regions=shard)
        return self._costs[key]


class UniformSplits:
    """``uniform_boundaries`` of one graph per stage count, None when the layers are too
    few for that many stages."""

    def __init__(self, graph: ProxyGraph) -> None:
        self.graph = graph
        self._splits: dict[int, tuple[int, ...] | None] = {}

    def __call__(self, stages: int) -> tuple[int, ...] | None:
        if stages not in self._splits:
            try:
                self._splits[stages] = uniform_boundaries(self.graph, stages)
            except ConfigError:
                self._splits[stages] = None
        return self._splits[stages]
