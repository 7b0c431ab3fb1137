"""The Plan: everything the planner decided, as plain data.

A Plan is frozen dataclasses of ints, floats, strs, tuples and enums; nodes are
named by FX name and modules by FQN, never held. It round-trips through JSON
with a schema version (``Plan.from_json(p.to_json()) == p``), checks its own
consistency (``validate``) and prints a summary a person can act on
(``render``). Codegen and the runtime consume it; they do not care whether
a solver or a person wrote it.

>>> plan = Plan(
...     model=ModelInfo("gpt:layers=2", "0f0f0f0f0f0f0f0f", ("embed", "h.0", "h.1"), 10**8),
...     cluster=ClusterInfo("a100-80g", 1, 2, 80 * 10**9, 312e12, 300e9, 25e9),
...     inputs=Inputs(global_batch_size=4, seq_len=1024),
...     parallel=ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=4),
...     stages=(StagePlan(0, 0, 0, ("embed", "h.0"), (), 0.01, 20 * 10**9, in_flight=2),
...             StagePlan(1, 1, 0, ("h.1",), (), 0.01, 15 * 10**9)),
...     estimate=Estimate(0.05, 4 * 1024 / 0.05, 20 * 10**9, 0.2, (20 * 10**9, 15 * 10**9)),
...     schedule=("F0 F1 B0 F2 B1 F3 B2 B3", "F0 B0 F1 B1 F2 B2 F3 B3"))
>>> Plan.from_json(plan.validate().to_json()) == plan
True
>>> print(plan.render().splitlines()[4])
parallel: dp=1 tp=1 pp=2 vpp=1 | micro-batch 1 x 4 | 1f1b | recompute none | ZeRO-0
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tripar.errors import PlanError, TriparError
from tripar.plan.config import ParallelConfig

SCHEMA_VERSION = 1
"""Version of the JSON layout; a plan of another version is refused, not guessed at."""


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


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise PlanError(message)


def _nonneg_int(owner: str, **values: Any) -> None:
    for name, value in values.items():
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
               f"{owner}.{name} must be an integer >= 0, got {value!r}")


def _pos_int(owner: str, **values: Any) -> None:
    for name, value in values.items():
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
               f"{owner}.{name} must be a positive integer, got {value!r}")


def _nonneg_float(owner: str, **values: Any) -> None:
    for name, value in values.items():
        _check(isinstance(value, (int, float)) and not isinstance(value, bool)
               and math.isfinite(value) and value >= 0,
               f"{owner}.{name} must be a finite number >= 0, got {value!r}")


def _strs(owner: str, name: str, value: Any) -> None:
    _check(isinstance(value, tuple) and all(isinstance(v, str) for v in value),
           f"{owner}.{name} must be a tuple of strings, got {value!r}")


def model_fingerprint(blocks: Iterable[Any]) -> str:
    """A short hash of the model's blocks (name, signature, parameter count, in order).

    Takes anything with ``name``, ``signature`` and ``params`` attributes
    (``ProxyGraph.blocks``); a plan made for one model is refused for another.

    >>> from types import SimpleNamespace as B
    >>> model_fingerprint([B(name="h.0", signature="layer", params=10)])
    '4f9f31b0c5a4589d'
    """
    digest = hashlib.sha256()
    for block in blocks:
        digest.update(f"{block.name}|{block.signature}|{block.params}\n".encode())
    return digest.hexdigest()[:16]


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
        _check(isinstance(self.spec, str) and isinstance(self.fingerprint, str),
               "ModelInfo.spec and fingerprint must be strings")
        _strs("ModelInfo", "blocks", self.blocks)
        _check(len(self.blocks) > 0, "ModelInfo.blocks is empty: a model has at least one block")
        _check(len(set(self.blocks)) == len(self.blocks),
               f"ModelInfo.blocks names a block twice: {_dupes(self.blocks)}")
        _nonneg_int("ModelInfo", params=self.params)


def _dupes(names: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for name in names:
        if name in seen and name not in out:
            out.append(name)
        seen.add(name)
    return out


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
        _check(isinstance(self.device, str) and self.device != "",
               f"ClusterInfo.device must name a device, got {self.device!r}")
        _pos_int("ClusterInfo", nodes=self.nodes, devices_per_node=self.devices_per_node,
                 device_memory_bytes=self.device_memory_bytes)
        _nonneg_float("ClusterInfo", peak_flops=self.peak_flops,
                      intra_bandwidth=self.intra_bandwidth, inter_bandwidth=self.inter_bandwidth,
                      intra_latency=self.intra_latency, inter_latency=self.inter_latency)
        _check(isinstance(self.name, str) and isinstance(self.profile, str),
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
        _pos_int("Inputs", global_batch_size=self.global_batch_size, seq_len=self.seq_len)
        _check(isinstance(self.dtype, str), f"Inputs.dtype must be a string, got {self.dtype!r}")

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

    def __post_init__(self) -> None:
        _nonneg_int("StagePlan", index=self.index, rank=self.rank,
                    virtual_index=self.virtual_index, memory_bytes=self.memory_bytes)
        _pos_int("StagePlan", in_flight=self.in_flight)
        _strs("StagePlan", "blocks", self.blocks)
        _strs("StagePlan", "recompute", self.recompute)
        _check(len(self.blocks) > 0, f"stage {self.index} holds no block")
        missing = [b for b in self.recompute if b not in self.blocks]
        _check(not missing, f"stage {self.index} recomputes {missing}, which it does not hold")
        _check(len(set(self.recompute)) == len(self.recompute),
               f"stage {self.index} lists a recomputed block twice: {_dupes(self.recompute)}")
        _nonneg_float("StagePlan", time_s=self.time_s)

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
        _check(isinstance(self.block, str) and isinstance(self.kind, str) and self.kind != "",
               f"TPShard needs a block and a kind, got {self.block!r}, {self.kind!r}")
        _strs("TPShard", "nodes", self.nodes)
        _check(isinstance(self.shards, tuple) and all(
            isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str)
            and isinstance(s[1], int) and s[1] >= 0 for s in self.shards),
            f"TPShard.shards must be (parameter FQN, dim >= 0) pairs, got {self.shards!r}")
        _check(isinstance(self.index, int) and not isinstance(self.index, bool)
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
        _nonneg_float("Estimate", step_time_s=self.step_time_s, tokens_per_s=self.tokens_per_s,
                      bubble_fraction=self.bubble_fraction, compute_s=self.compute_s,
                      communication_s=self.communication_s)
        _nonneg_int("Estimate", peak_memory_bytes=self.peak_memory_bytes)
        _check(isinstance(self.stage_memory_bytes, tuple) and all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 0
            for b in self.stage_memory_bytes),
            f"Estimate.stage_memory_bytes must be a tuple of byte counts, "
            f"got {self.stage_memory_bytes!r}")
        if self.stage_memory_bytes:
            _check(max(self.stage_memory_bytes) == self.peak_memory_bytes,
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
            _check(isinstance(getattr(self, name), str) and getattr(self, name) != "",
                   f"SolverRun.{name} must be a non-empty string")
        _check(isinstance(self.objective, (int, float)) and math.isfinite(self.objective),
               f"SolverRun.objective must be a finite number, got {self.objective!r}")
        _nonneg_float("SolverRun", solve_time_s=self.solve_time_s)


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
        _check(isinstance(self.parallel, ParallelConfig),
               f"Alternative.parallel must be a ParallelConfig, got {type(self.parallel).__name__}")
        _check(self.estimate is None or isinstance(self.estimate, Estimate),
               "Alternative.estimate must be an Estimate or None")
        _check(isinstance(self.reason, str) and self.reason != "",
               "Alternative.reason must say why it lost")
        _check(isinstance(self.binding, Binding), f"Alternative.binding must be a Binding, "
                                                  f"got {self.binding!r}")


@dataclass(frozen=True, slots=True)
class Plan:
    """How to train one model on one cluster: the full output of ``tripar plan``."""

    model: ModelInfo
    cluster: ClusterInfo
    inputs: Inputs
    parallel: ParallelConfig
    stages: tuple[StagePlan, ...]
    estimate: Estimate
    tp_regions: tuple[TPShard, ...] = ()
    """Regions sharded tensor-parallel (empty when tp == 1)."""
    schedule: tuple[str, ...] = ()
    """Each pipeline rank's actions in the schedule text form (``F0 F1 B0 B1``); empty if
    not recorded. ``to_schedule`` gives the ``tripar.plan.schedule.Schedule``."""
    solvers: tuple[SolverRun, ...] = ()
    solve_time_s: float = 0.0
    """Wall time of the whole search."""
    alternatives: tuple[Alternative, ...] = ()
    """Best runners-up, best first."""
    notes: tuple[str, ...] = ()
    """Anything else a person should know (pins applied, approximations made)."""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check(self.schema_version == SCHEMA_VERSION,
               f"plan schema version {self.schema_version!r}; this tripar reads version "
               f"{SCHEMA_VERSION}: re-create the plan with `tripar plan`")
        for name, kind in (("model", ModelInfo), ("cluster", ClusterInfo), ("inputs", Inputs),
                           ("parallel", ParallelConfig), ("estimate", Estimate)):
            _check(isinstance(getattr(self, name), kind),
                   f"Plan.{name} must be a {kind.__name__}, "
                   f"got {type(getattr(self, name)).__name__}")
        for name, kind in (("stages", StagePlan), ("tp_regions", TPShard),
                           ("solvers", SolverRun), ("alternatives", Alternative)):
            value = getattr(self, name)
            _check(isinstance(value, tuple) and all(isinstance(v, kind) for v in value),
                   f"Plan.{name} must be a tuple of {kind.__name__}")
        _check(len(self.stages) > 0, "Plan.stages is empty")
        _strs("Plan", "schedule", self.schedule)
        _strs("Plan", "notes", self.notes)
        _nonneg_float("Plan", solve_time_s=self.solve_time_s)

    # ---- checks ------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every inconsistency between the plan's parts, in words (empty when valid)."""
        out: list[str] = []
        par, cl = self.parallel, self.cluster
        if par.devices != cl.devices:
            out.append(f"dp*tp*pp = {par.dp}*{par.tp}*{par.pp} = {par.devices} devices, but "
                       f"the cluster has {cl.nodes}*{cl.devices_per_node} = {cl.devices}")
        if par.global_batch_size != self.inputs.global_batch_size:
            out.append(f"dp*micro_batch_size*num_microbatches = {par.dp}*{par.micro_batch_size}"
                       f"*{par.num_microbatches} = {par.global_batch_size}, but the global "
                       f"batch is {self.inputs.global_batch_size}")
        num_stages = par.pp * par.vpp
        if len(self.stages) != num_stages:
            out.append(f"{len(self.stages)} stages, but pp*vpp = {par.pp}*{par.vpp} = "
                       f"{num_stages}")
        for i, st in enumerate(self.stages):
            want = (i, i % par.pp, i // par.pp)
            if (st.index, st.rank, st.virtual_index) != want:
                out.append(f"stage {i} says index={st.index} rank={st.rank} "
                           f"virtual_index={st.virtual_index}; stage {i} of pp={par.pp} is "
                           f"index={want[0]} rank={want[1]} virtual_index={want[2]}")
        out.extend(self._coverage_problems())
        if par.recompute == "none":
            bad = [st.index for st in self.stages if st.recompute]
            if bad:
                out.append(f"recompute is 'none' but stages {bad} recompute blocks")
        est = self.estimate
        for rank, used in enumerate(self.device_memory()):
            if used > cl.device_memory_bytes:
                out.append(f"pipeline rank {rank} needs {used} bytes ({used / 1e9:.2f} GB), "
                           f"more than the device's {cl.device_memory_bytes} bytes "
                           f"({cl.device_memory_bytes / 1e9:.2f} GB)")
        for st in self.stages:
            if st.memory_bytes > cl.device_memory_bytes:
                out.append(f"stage {st.index} needs {st.memory_bytes} bytes, more than the "
                           f"device's {cl.device_memory_bytes} bytes")
        if est.stage_memory_bytes and len(est.stage_memory_bytes) != par.pp:
            out.append(f"the estimate lists memory for {len(est.stage_memory_bytes)} pipeline "
                       f"ranks, but pp = {par.pp}")
        if est.peak_memory_bytes > cl.device_memory_bytes:
            out.append(f"the estimated peak memory {est.peak_memory_bytes} bytes exceeds the "
                       f"device's {cl.device_memory_bytes} bytes")
        if est.step_time_s > 0:
            rate = self.inputs.tokens / est.step_time_s
            if not math.isclose(rate, est.tokens_per_s, rel_tol=1e-6):
                out.append(f"tokens_per_s {est.tokens_per_s:.6g} is not global batch * seq / "
                           f"step time = {rate:.6g}")
        out.extend(self._tp_problems())
        out.extend(self._schedule_problems())
        for i, alt in enumerate(self.alternatives):
            if alt.parallel.devices != par.devices:
                out.append(f"alternative {i} uses {alt.parallel.devices} devices, not "
                           f"{par.devices}")
            if alt.parallel.global_batch_size != self.inputs.global_batch_size:
                out.append(f"alternative {i} runs a global batch of "
                           f"{alt.parallel.global_batch_size}, not "
                           f"{self.inputs.global_batch_size}")
            if alt.parallel == par:
                out.append(f"alternative {i} is the chosen configuration itself")
        return out

    def _coverage_problems(self) -> list[str]:
        placed = [b for st in self.stages for b in st.blocks]
        if placed == list(self.model.blocks):
            return []
        out = []
        known = set(self.model.blocks)
        unknown = [b for b in placed if b not in known]
        if unknown:
            out.append(f"stages hold blocks the model does not have: {unknown[:5]}")
        missing = [b for b in self.model.blocks if b not in set(placed)]
        if missing:
            out.append(f"no stage holds blocks {missing[:5]}"
                       + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
        twice = _dupes(placed)
        if twice:
            out.append(f"blocks {twice[:5]} are on more than one stage")
        if not (unknown or missing or twice):
            order = {b: i for i, b in enumerate(self.model.blocks)}
            for st in self.stages:
                idx = [order[b] for b in st.blocks]
                if idx != list(range(idx[0], idx[0] + len(idx))):
                    out.append(f"stage {st.index}'s blocks are not contiguous in model order")
            out.append("stages are not in model order")
        return out

    def _tp_problems(self) -> list[str]:
        out = []
        par = self.parallel
        if par.tp == 1 and self.tp_regions:
            out.append(f"tp = 1 but {len(self.tp_regions)} regions are marked sharded")
        if par.tp > 1 and not self.tp_regions:
            out.append(f"tp = {par.tp} but no region is sharded: the tp devices would only "
                       f"duplicate work")
        known = set(self.model.blocks)
        names = [r.name for r in self.tp_regions]
        if _dupes(names):
            out.append(f"tensor-parallel regions listed twice: {_dupes(names)[:5]}; a region "
                       f"is named block:kind:index, and two regions of one kind in a block "
                       f"(t5's self- and cross-attention) differ by their index")
        stray = [r.name for r in self.tp_regions if r.block not in known]
        if stray:
            out.append(f"tensor-parallel regions in unknown blocks: {stray[:5]}")
        return out

    def _schedule_problems(self) -> list[str]:
        if not self.schedule:
            return []
        if len(self.schedule) != self.parallel.pp:
            return [f"the schedule has action lists for {len(self.schedule)} ranks, but "
                    f"pp = {self.parallel.pp}"]
        try:
            self.to_schedule().validate()
        except PlanError as error:
            return [f"schedule: {error}"]
        return []

    def validate(self) -> Plan:
        """Raise PlanError listing every inconsistency; return the plan when there is none.

        Checks that dp*tp*pp is the cluster's device count, that dp*mbs*m is the global
        batch, that there are pp*vpp stages on the right ranks covering every block exactly
        once in order, that no device exceeds its memory, that tensor parallelism has
        regions to shard, that the schedule is complete and deadlock-free, and that the
        runners-up are real alternatives.
        """
        found = self.problems()
        if found:
            raise PlanError("invalid plan:\n  - " + "\n  - ".join(found))
        return self

    def check_model(self, fingerprint: str) -> None:
        """Refuse a plan made for another model (``model_fingerprint`` of its blocks)."""
        if fingerprint != self.model.fingerprint:
            raise PlanError(
                f"this plan was made for model {self.model.spec!r} (fingerprint "
                f"{self.model.fingerprint}), but the model given has fingerprint {fingerprint}; "
                f"re-run `tripar plan` for this model")

    # ---- derived views -----------------------------------------------------------------

    def device_memory(self) -> tuple[int, ...]:
        """Peak bytes on each pipeline rank's device: the estimate's per-rank peaks when it
        has them (virtual stages peak at different times), else the sum over its stages."""
        if len(self.estimate.stage_memory_bytes) == self.parallel.pp:
            return self.estimate.stage_memory_bytes
        used = [0] * self.parallel.pp
        for st in self.stages:
            if 0 <= st.rank < len(used):
                used[st.rank] += st.memory_bytes
        return tuple(used)

    def schedule_text(self) -> str:
        """The schedule in ``tripar.plan.schedule`` text form (header, one line per rank)."""
        par = self.parallel
        lines = [f"schedule {par.schedule} pp={par.pp} vpp={par.vpp} "
                 f"microbatches={par.num_microbatches}"]
        lines += [f"rank {r}: {acts}" for r, acts in enumerate(self.schedule)]
        return "\n".join(line.rstrip() for line in lines) + "\n"

    def to_schedule(self):
        """The schedule as a ``tripar.plan.schedule.Schedule``."""
        if not self.schedule:
            raise PlanError("this plan records no schedule action lists")
        from tripar.plan.schedule import Schedule

        return Schedule.from_text(self.schedule_text())

    def render(self, *, width: int = 100) -> str:
        """A summary a person can act on (what ``tripar plan`` prints)."""
        from tripar.plan.render import render_plan

        return render_plan(self, width=width)

    # ---- JSON --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (lists for tuples, values for enums)."""
        return _encode(self)

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"a plan is a JSON object, got {type(data).__name__}")
        if "schema_version" not in data:
            raise PlanError("not a tripar plan: the JSON has no 'schema_version'")
        version = data["schema_version"]
        if version != SCHEMA_VERSION:
            raise PlanError(f"plan schema version {version!r}; this tripar reads version "
                            f"{SCHEMA_VERSION}: re-create the plan with `tripar plan`")
        return _decode(cls, data, "plan")

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse ``to_json``'s output; truncated or corrupt text raises PlanError."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PlanError(f"plan JSON is corrupt or truncated at line {error.lineno} column "
                            f"{error.colno} ({error.msg}); re-create it with `tripar plan`"
                            ) from None
        except (ValueError, RecursionError) as error:  # absurd nesting or number lengths
            raise PlanError(f"plan JSON is corrupt ({type(error).__name__}: "
                            f"{str(error)[:80]}); re-create it with `tripar plan`") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON."""
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, *, validate: bool = False) -> Plan:
        """Read a plan written by :meth:`save` (or ``tripar plan --out``); with
        ``validate``, also check it, naming the file in any error."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise PlanError(f"cannot read plan file {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise PlanError(f"cannot read plan file {path}: not UTF-8 text; give the JSON "
                            f"file `tripar plan --out` wrote") from None
        try:
            plan = cls.from_json(text)
            return plan.validate() if validate else plan
        except PlanError as error:
            raise PlanError(f"{path}: {error}") from None


# ---- the JSON codec: dataclass fields by their type hints ----------------------------------


def _encode(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


_KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _decode(hint: Any, data: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if data is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _decode(inner[0], data, path)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(data, list):
            raise PlanError(f"{path}: expected a list, got {json.dumps(data)[:60]}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v, f"{path}[{i}]") for i, v in enumerate(data))
        if len(args) != len(data):
            raise PlanError(f"{path}: expected {len(args)} items, got {len(data)}")
        return tuple(_decode(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, data)))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(data)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in hint)
            raise PlanError(f"{path}: {data!r} is not one of {allowed}") from None
    if dataclasses.is_dataclass(hint):
        if not isinstance(data, dict):
            raise PlanError(f"{path}: expected an object, got {json.dumps(data)[:60]}")
        fields = {f.name: f for f in dataclasses.fields(hint)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise PlanError(f"{path}: unknown field {unknown[0]!r} (a newer or corrupt plan?)")
        hints = _hints(hint)
        kwargs = {}
        for name, f in fields.items():
            if name not in data:
                if (f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING):
                    raise PlanError(f"{path}: missing field {name!r}")
                continue
            kwargs[name] = _decode(hints[name], data[name], f"{path}.{name}")
        try:
            return hint(**kwargs)
        except PlanError as error:
            raise PlanError(f"{path}: {error}") from None
        except TriparError as error:  # ParallelConfig raises ConfigError
            raise PlanError(f"{path}: {error}") from None
    if hint is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise PlanError(f"{path}: expected a number, got {json.dumps(data)[:60]}")
        return float(data)
    if hint in (int, str, bool):
        if isinstance(data, bool) != (hint is bool) or not isinstance(data, hint):
            raise PlanError(f"{path}: expected {_KIND_WORDS[hint]}, got {json.dumps(data)[:60]}")
        return data
    raise AssertionError(f"no JSON decoding for {hint!r} at {path}")
