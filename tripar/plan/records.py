"""The parts of a Plan: frozen records of plain values, each checking its own fields.

Ints, floats, strs, tuples and enums only; blocks and parameters by module FQN, nodes by
FX name. A record refuses inconsistent fields when it is made (PlanError); whether the
parts agree with each other is ``Plan.validate``'s question.

>>> stage = StagePlan(0, 0, 0, ("embed", "h.0"), ("h.0",), 0.01, 20 * 10**9)
>>> stage.recompute_policy, stage.recompute_fraction
('partial', 0.5)
>>> StagePlan(1, 1, 0, ("h.1",), ("h.2",), 0.01, 10**9)
Traceback (most recent call last):
...
tripar.errors.PlanError: stage 1 recomputes ['h.2'], which it does not hold
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from typing import Any

from tripar.plan._checks import check, dupes, nonneg_float, nonneg_int, pos_int, strs
from tripar.plan.config import ParallelConfig


class Binding(str, enum.Enum):
    """What limits a configuration: why a plan is as fast as it is, or why a runner-up lost."""

    MEMORY = "memory"
    """It needs more memory than a device has (or memory forced recomputation)."""
    BUBBLE = "bubble"
    """Pipeline fill and drain (idle devices) cost more."""
    COMMUNICATION = "communication"
    """Collectives and p2p transfers cost more."""
    COMPUTE = "compute"
    """More arithmetic (recomputation, smaller, less efficient matrix products)."""
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Which model the plan is for."""

    spec: str
    """The MODEL argument it was built from (``gpt:layers=24,hidden=2304``, a file, ...)."""
    fingerprint: str
    """``model_fingerprint`` of its proxy graph's blocks."""
    blocks: tuple[str, ...]
    """Every block's module FQN, in order: the stages partition exactly these."""
    params: int
    """Parameters in all."""

    def __post_init__(self) -> None:
        check(isinstance(self.spec, str) and isinstance(self.fingerprint, str),
              "ModelInfo.spec and fingerprint must be strings")
        strs("ModelInfo", "blocks", self.blocks)
        check(len(self.blocks) > 0, "ModelInfo.blocks is empty: a model has at least one block")
        check(len(set(self.blocks)) == len(self.blocks),
              f"ModelInfo.blocks names a block twice: {dupes(self.blocks)}")
        nonneg_int("ModelInfo", params=self.params)


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """The machines, as plain values (``tripar.partitioner.hardware.Cluster`` makes it)."""

    device: str
    """Device name (``a100-80g``)."""
    nodes: int
    devices_per_node: int
    device_memory_bytes: int
    peak_flops: float
    """Dense peak FLOP/s of one device in the plan's dtype."""
    intra_bandwidth: float
    """Bytes/s between two devices of a node."""
    inter_bandwidth: float
    """Bytes/s a device sends to another node."""
    intra_latency: float = 0.0
    inter_latency: float = 0.0
    name: str = ""
    profile: str = ""
    """The cluster profile JSON it was made from (``Cluster.to_dict``), to rebuild it exactly."""

    def __post_init__(self) -> None:
        check(isinstance(self.device, str) and self.device != "",
              f"ClusterInfo.device must name a device, got {self.device!r}")
        pos_int("ClusterInfo", nodes=self.nodes, devices_per_node=self.devices_per_node,
                device_memory_bytes=self.device_memory_bytes)
        nonneg_float("ClusterInfo", peak_flops=self.peak_flops,
                     intra_bandwidth=self.intra_bandwidth, inter_bandwidth=self.inter_bandwidth,
                     intra_latency=self.intra_latency, inter_latency=self.inter_latency)
        check(isinstance(self.name, str) and isinstance(self.profile, str),
              "ClusterInfo.name and profile must be strings")

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node

    @classmethod
    def from_cluster(cls, cluster: Any, dtype: str = "bf16") -> ClusterInfo:
        """From a ``tripar.partitioner.hardware.Cluster`` (read by attribute, not imported)."""
        device = cluster.device
        return cls(device=device.name, nodes=cluster.nodes,
                   devices_per_node=cluster.devices_per_node,
                   device_memory_bytes=device.memory_bytes, peak_flops=device.peak(dtype),
                   intra_bandwidth=cluster.intra_bandwidth,
                   inter_bandwidth=cluster.inter_bandwidth,
                   intra_latency=cluster.intra_latency, inter_latency=cluster.inter_latency,
                   name=cluster.name, profile=json.dumps(cluster.to_dict(), sort_keys=True))


@dataclass(frozen=True, slots=True)
class Inputs:
    """The batch one training step consumes."""

    global_batch_size: int
    """Samples per step, over all data-parallel replicas."""
    seq_len: int
    """Tokens per sample (1 for models without a sequence)."""
    dtype: str = "bf16"
    """Compute dtype the plan was costed for."""

    def __post_init__(self) -> None:
        pos_int("Inputs", global_batch_size=self.global_batch_size, seq_len=self.seq_len)
        check(isinstance(self.dtype, str), f"Inputs.dtype must be a string, got {self.dtype!r}")

    @property
    def tokens(self) -> int:
        return self.global_batch_size * self.seq_len


@dataclass(frozen=True, slots=True)
class StagePlan:
    """One (virtual) pipeline stage: its blocks, what it recomputes, its cost."""

    index: int
    """Stage number, 0 .. pp*vpp - 1, in model order."""
    rank: int
    """Pipeline rank that runs it: index % pp."""
    virtual_index: int
    """Which of the rank's virtual stages it is: index // pp."""
    blocks: tuple[str, ...]
    """Module FQNs of its blocks, contiguous in model order."""
    recompute: tuple[str, ...]
    """FQNs of the blocks whose activations are dropped and recomputed in the backward."""
    time_s: float
    """Forward + backward (+ recompute, + p2p) of one microbatch."""
    memory_bytes: int
    """Peak bytes this stage needs on its device."""
    in_flight: int = 1
    """Microbatches it holds at its peak under the schedule."""
    selective: tuple[str, ...] = ()
    """FX names of the nodes recomputed selectively: the parts of its blocks cheap to
    recompute and costly to keep (the attention core), run under checkpointing in the
    backward; empty when the stage keeps them."""
    memory_at_device_peak_bytes: int = 0
    """Bytes it holds when its device's memory peaks: a device's stages sum to its peak
    (their own peaks, ``memory_bytes``, fall apart in time). 0: not recorded."""

    def __post_init__(self) -> None:
        strs("StagePlan", "selective", self.selective)
        nonneg_int("StagePlan", index=self.index, rank=self.rank,
                   virtual_index=self.virtual_index, memory_bytes=self.memory_bytes,
                   memory_at_device_peak_bytes=self.memory_at_device_peak_bytes)
        pos_int("StagePlan", in_flight=self.in_flight)
        strs("StagePlan", "blocks", self.blocks)
        strs("StagePlan", "recompute", self.recompute)
        check(len(self.blocks) > 0, f"stage {self.index} holds no block")
        missing = [b for b in self.recompute if b not in self.blocks]
        check(not missing, f"stage {self.index} recomputes {missing}, which it does not hold")
        check(len(set(self.recompute)) == len(self.recompute),
              f"stage {self.index} lists a recomputed block twice: {dupes(self.recompute)}")
        nonneg_float("StagePlan", time_s=self.time_s)

    @property
    def recompute_fraction(self) -> float:
        """Share of the stage's blocks that are recomputed."""
        return len(self.recompute) / len(self.blocks)

    @property
    def recompute_policy(self) -> str:
        """``none``, ``full`` (every block) or ``partial``."""
        if not self.recompute:
            return "none"
        return "full" if len(self.recompute) == len(self.blocks) else "partial"

    @property
    def granularity(self) -> str:
        """What the stage recomputes: ``none``, ``selective``, ``full``, or ``N/M`` blocks
        whole (``selective+N/M``: the others selectively).

        >>> StagePlan(0, 0, 0, ("a", "b"), ("a",), 1.0, 10, selective=("mm",)).granularity
        'selective+1/2'
        """
        whole = self.recompute_policy
        if whole == "full":
            return "full"
        part = f"{len(self.recompute)}/{len(self.blocks)}" if self.recompute else ""
        if self.selective:
            return "selective" + (f"+{part}" if part else "")
        return part or "none"


@dataclass(frozen=True, slots=True)
class TPShard:
    """A tensor-parallel region the plan shards (``tripar.graph.proxy.TPRegion`` by name).

    >>> shard = TPShard("decoder.layers.0", "attention", ("q", "k", "v", "o"), index=1)
    >>> shard.name
    'decoder.layers.0:attention:1'
    """

    block: str
    kind: str
    """``mlp``, ``attention``, ``embedding`` or ``lm_head``."""
    nodes: tuple[str, ...]
    """FX names of the region's nodes."""
    shards: tuple[tuple[str, int], ...] = ()
    """(parameter FQN, weight dim sharded)."""
    index: int = 0
    """Which region of this ``kind`` in ``block`` (``TPRegion.index``; 0 for the first, and
    for plans written before regions were numbered): a t5 decoder layer shards attention 0
    (self) and attention 1 (cross)."""

    def __post_init__(self) -> None:
        check(isinstance(self.block, str) and isinstance(self.kind, str) and self.kind != "",
              f"TPShard needs a block and a kind, got {self.block!r}, {self.kind!r}")
        strs("TPShard", "nodes", self.nodes)
        check(isinstance(self.shards, tuple) and all(
            isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str)
            and isinstance(s[1], int) and s[1] >= 0 for s in self.shards),
            f"TPShard.shards must be (parameter FQN, dim >= 0) pairs, got {self.shards!r}")
        check(isinstance(self.index, int) and not isinstance(self.index, bool)
              and self.index >= 0,
              f"TPShard.index must be an integer >= 0 (which {self.kind} region of block "
              f"{self.block!r}), got {self.index!r}")

    @property
    def name(self) -> str:
        """``block:kind:index``, the region's unique name (``TPRegion.name``)."""
        return f"{self.block}:{self.kind}:{self.index}"


@dataclass(frozen=True, slots=True)
class Estimate:
    """What the simulator predicts for one step of a configuration."""

    step_time_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    """The largest device memory over pipeline ranks."""
    bubble_fraction: float
    """Idle time inside the pipeline as a share of the busiest device's compute
    (``(p - 1) / m`` for 1F1B on equal stages; above 1 when the pipeline idles more than
    it computes)."""
    stage_memory_bytes: tuple[int, ...] = ()
    """Peak memory of each pipeline rank's device (all its virtual stages)."""
    compute_s: float = 0.0
    """Busiest device's compute (forward, backward, recompute) per step."""
    communication_s: float = 0.0
    """Exposed (not overlapped) communication per step on the critical device."""

    def __post_init__(self) -> None:
        nonneg_float("Estimate", step_time_s=self.step_time_s, tokens_per_s=self.tokens_per_s,
                     bubble_fraction=self.bubble_fraction, compute_s=self.compute_s,
                     communication_s=self.communication_s)
        nonneg_int("Estimate", peak_memory_bytes=self.peak_memory_bytes)
        check(isinstance(self.stage_memory_bytes, tuple) and all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 0
            for b in self.stage_memory_bytes),
            f"Estimate.stage_memory_bytes must be a tuple of byte counts, "
            f"got {self.stage_memory_bytes!r}")
        if self.stage_memory_bytes:
            check(max(self.stage_memory_bytes) == self.peak_memory_bytes,
                  f"Estimate.peak_memory_bytes {self.peak_memory_bytes} is not the largest "
                  f"stage memory {max(self.stage_memory_bytes)}")


@dataclass(frozen=True, slots=True)
class SolverRun:
    """Provenance of one solve: what was solved, by which solver, and how it ended."""

    problem: str
    """``search``, ``partition``, ``tp-choice``..."""
    solver: str
    """``dp``, ``HiGHS``, ``PULP_CBC_CMD``, ``enumeration``..."""
    status: str
    """``optimal`` unless said otherwise; a plan never hides a non-optimal status."""
    objective: float
    solve_time_s: float

    def __post_init__(self) -> None:
        for name in ("problem", "solver", "status"):
            check(isinstance(getattr(self, name), str) and getattr(self, name) != "",
                  f"SolverRun.{name} must be a non-empty string")
        check(isinstance(self.objective, (int, float)) and math.isfinite(self.objective),
              f"SolverRun.objective must be a finite number, got {self.objective!r}")
        nonneg_float("SolverRun", solve_time_s=self.solve_time_s)


@dataclass(frozen=True, slots=True)
class Alternative:
    """A runner-up configuration and why it lost."""

    parallel: ParallelConfig
    estimate: Estimate | None
    """None when it could not be costed (it does not fit)."""
    reason: str
    """In words, with the numbers: ``needs 91.2 GB > 80.0 GB``, ``bubble 21% vs 9%``."""
    binding: Binding = Binding.OTHER

    def __post_init__(self) -> None:
        check(isinstance(self.parallel, ParallelConfig),
              f"Alternative.parallel must be a ParallelConfig, got {type(self.parallel).__name__}")
        check(self.estimate is None or isinstance(self.estimate, Estimate),
              "Alternative.estimate must be an Estimate or None")
        check(isinstance(self.reason, str) and self.reason != "",
              "Alternative.reason must say why it lost")
        check(isinstance(self.binding, Binding), f"Alternative.binding must be a Binding, "
                                                 f"got {self.binding!r}")
