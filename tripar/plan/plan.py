"""The Plan: everything the planner decided, as plain data.

A Plan is frozen dataclasses of ints, floats, strs, tuples and enums; nodes are
named by FX name and modules by FQN, never held. It round-trips through JSON
with a schema version (``Plan.from_json(p.to_json()) == p``), checks its own
consistency (``validate``) and prints a summary a person can act on
(``render``). Codegen and the runtime consume it; they do not care whether
a solver or a person wrote it. Its parts are in ``records``, its JSON form in
``codec``, its text form in ``render``.

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

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tripar.errors import PlanError
from tripar.plan._checks import check, dupes, nonneg_float, strs
from tripar.plan.codec import SCHEMA_VERSION, decode_plan, encode, parse_json
from tripar.plan.config import ParallelConfig
from tripar.plan.records import (
    Alternative,
    ClusterInfo,
    Estimate,
    Inputs,
    ModelInfo,
    SolverRun,
    StagePlan,
    TPShard,
)
from tripar.plan.render import render_plan
from tripar.plan.schedule import Schedule


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
        check(self.schema_version == SCHEMA_VERSION,
              f"plan schema version {self.schema_version!r}; this tripar reads version "
              f"{SCHEMA_VERSION}: re-create the plan with `tripar plan`")
        for name, kind in (("model", ModelInfo), ("cluster", ClusterInfo), ("inputs", Inputs),
                           ("parallel", ParallelConfig), ("estimate", Estimate)):
            check(isinstance(getattr(self, name), kind),
                  f"Plan.{name} must be a {kind.__name__}, "
                  f"got {type(getattr(self, name)).__name__}")
        for name, kind in (("stages", StagePlan), ("tp_regions", TPShard),
                           ("solvers", SolverRun), ("alternatives", Alternative)):
            value = getattr(self, name)
            check(isinstance(value, tuple) and all(isinstance(v, kind) for v in value),
                  f"Plan.{name} must be a tuple of {kind.__name__}")
        check(len(self.stages) > 0, "Plan.stages is empty")
        strs("Plan", "schedule", self.schedule)
        strs("Plan", "notes", self.notes)
        nonneg_float("Plan", solve_time_s=self.solve_time_s)

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
        if par.splits_sequence and \
                self.inputs.seq_len % par.tp_overlap:
            out.append(f"tp_overlap={par.tp_overlap} splits a one-sample microbatch along "
                       f"its sequence, but seq_len={self.inputs.seq_len} is not divisible by "
                       f"{par.tp_overlap}")
        if par.recompute == "none":
            bad = [st.index for st in self.stages if st.recompute]
            if bad:
                out.append(f"recompute is 'none' but stages {bad} recompute blocks")
            bad = [st.index for st in self.stages if st.selective]
            if bad:
                out.append(f"recompute is 'none' but stages {bad} recompute nodes selectively")
        if par.recompute == "selective":
            bad = [st.index for st in self.stages if st.recompute]
            if bad:
                out.append(f"recompute is 'selective' but stages {bad} recompute whole blocks; "
                           "use 'stage-aware' to let stages do both")
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
        twice = dupes(placed)
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
        if dupes(names):
            out.append(f"tensor-parallel regions listed twice: {dupes(names)[:5]}; a region "
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
            for rank in self.parallel.ranks_of(st.index):
                if 0 <= rank < len(used):
                    used[rank] += st.memory_bytes
        return tuple(used)

    def schedule_text(self) -> str:
        """The schedule in ``tripar.plan.schedule`` text form (header, one line per rank)."""
        par = self.parallel
        lines = [f"schedule {par.schedule} pp={par.pp} vpp={par.vpp} "
                 f"microbatches={par.num_microbatches}"
                 + (f" pipelines={par.pipelines}" if par.pipelines > 1 else "")]
        lines += [f"rank {r}: {acts}" for r, acts in enumerate(self.schedule)]
        return "\n".join(line.rstrip() for line in lines) + "\n"

    def to_schedule(self) -> Schedule:
        """The schedule as a ``tripar.plan.schedule.Schedule``."""
        if not self.schedule:
            raise PlanError("this plan records no schedule action lists")
        return Schedule.from_text(self.schedule_text())

    def render(self, *, width: int = 100) -> str:
        """A summary a person can act on (what ``tripar plan`` prints)."""
        return render_plan(self, width=width)

    # ---- JSON --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (lists for tuples, values for enums)."""
        return encode(self)

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        return decode_plan(cls, data)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse ``to_json``'s output; truncated or corrupt text raises PlanError."""
        return cls.from_dict(parse_json(text))

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
