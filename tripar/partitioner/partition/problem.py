"""The stage-partition problem on plain per-block numbers, and the cost of one partition.

The planner cuts the chain of blocks of a proxy graph into ``k = p * v``
contiguous, non-empty (virtual) stages and decides, per stage, which of the
stage's blocks drop their activations and recompute them in the backward.
:class:`PartitionProblem` states that problem on plain per-block numbers, so it does
not depend on how the cost model produced them; :func:`evaluate_partition` costs one
given partition (:class:`PartitionSolution`).

The model, for stage ``s`` holding blocks ``B_s`` of which ``R_s`` recompute:

* time ``t_s = sum_{b in B_s} (F_b + Bw_b) + sum_{b in R_s} R_b + cut_s``, where
  ``cut_s`` is the p2p time of the cut after the stage's last block (none after
  the last stage);
* memory ``M_s = sum_{B_s} static_b + c_s * (sum_{B_s} act_b - sum_{R_s} (act_b - in_b))
  + max_{R_s} (act_b - in_b)``: weights, gradients and optimizer state, plus
  ``c_s`` in-flight microbatches (from the schedule: 1F1B holds ``min(p - s, m)``
  on stage ``s``) each keeping every block's activations, or only its input
  when the block is recomputed, plus the one block re-materialised at a time
  during the backward. ``M_s <= limit_s`` must hold;
* step time ``T = (1 / v) * sum_s t_s + (m * v - 1) * max_s t_s`` (Alpa /
  DAPPLE: fill and drain plus ``m - 1`` bottleneck periods; for ``v`` virtual
  stages per rank the fill is ``1/v`` of the chunk times and the steady state
  ``m * v - 1`` chunk periods, which gives Megatron's ``(p - 1) / (v * m)``
  bubble on equal stages). The objective is ``T``.

A block is recomputable when dropping its activations saves bytes
(``act_b > in_b``). ``recompute="none"`` forbids recomputation, ``"full"``
recomputes every recomputable block, ``"stage-aware"`` chooses per stage the
cheapest set of blocks that fits (a stage that holds fewer microbatches
recomputes less), anything from none to all of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tripar.errors import ConfigError, InfeasibleError

RECOMPUTE_CHOICES = ("none", "full", "stage-aware")
"""What the partitioner may do about recomputation."""


def _tuple(values, name: str, kind: type) -> tuple:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ConfigError(f"PartitionProblem.{name} must be a sequence, got {values!r}")
    out = []
    for value in values:
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"PartitionProblem.{name} must hold integers, got {value!r}")
            out.append(int(value))
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise ConfigError(f"PartitionProblem.{name} must hold numbers, got {value!r}")
            out.append(float(value))
        if not math.isfinite(out[-1]) or out[-1] < 0:
            raise ConfigError(f"PartitionProblem.{name} must be finite and >= 0, got {value!r}")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PartitionProblem:
    """Per-block costs and per-stage limits of one partition problem.

    Times are seconds per microbatch, bytes per device. Stage ``s`` of ``k``
    is ``len(in_flight)``; ``memory_limit_bytes`` may be one int (every stage)
    and ``cut_s`` may be empty (free cuts).

    >>> prob = PartitionProblem.uniform(8, stages=2, forward_s=1.0, activation_bytes=10,
    ...                                 memory_limit_bytes=1000, num_microbatches=4)
    >>> prob.num_blocks, prob.num_stages, prob.in_flight
    (8, 2, (2, 1))
    """

    blocks: tuple[str, ...]
    """Block names (module FQNs) in order."""
    forward_s: tuple[float, ...]
    """F of each block, per microbatch."""
    backward_s: tuple[float, ...]
    """Full backward (input and weight gradients) of each block, per microbatch."""
    recompute_s: tuple[float, ...]
    """Time to recompute each block's forward (usually its F)."""
    activation_bytes: tuple[int, ...]
    """Bytes each block keeps per microbatch for its backward."""
    input_bytes: tuple[int, ...]
    """Bytes each block keeps per microbatch when it is recomputed (its input)."""
    static_bytes: tuple[int, ...]
    """Weights, gradients, optimizer state (and buffers) of each block, held all step."""
    in_flight: tuple[int, ...]
    """Microbatches each stage holds at its peak, from the schedule (one entry per stage)."""
    memory_limit_bytes: tuple[int, ...]
    """Memory budget of each stage (a virtual stage gets its share of the device)."""
    num_microbatches: int
    """m: microbatches per step."""
    virtual_stages: int = 1
    """v: stages per pipeline rank (the number of stages is p * v)."""
    cut_s: tuple[float, ...] = ()
    """p2p time per microbatch of a cut after block b (n - 1 entries; empty: all 0)."""
    recompute: str = "stage-aware"
    """One of RECOMPUTE_CHOICES."""

    def __post_init__(self) -> None:
        setter = object.__setattr__
        if isinstance(self.blocks, str) or not isinstance(self.blocks, Sequence):
            raise ConfigError(f"PartitionProblem.blocks must be a sequence of names, "
                              f"got {self.blocks!r}")
        setter(self, "blocks", tuple(str(b) for b in self.blocks))
        n = len(self.blocks)
        if n == 0:
            raise ConfigError("PartitionProblem needs at least one block")
        for name in ("forward_s", "backward_s", "recompute_s"):
            setter(self, name, _tuple(getattr(self, name), name, float))
        for name in ("activation_bytes", "input_bytes", "static_bytes"):
            setter(self, name, _tuple(getattr(self, name), name, int))
        for name in ("forward_s", "backward_s", "recompute_s", "activation_bytes",
                     "input_bytes", "static_bytes"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"PartitionProblem.{name} has {len(getattr(self, name))} "
                                  f"entries for {n} blocks")
        setter(self, "in_flight", _tuple(self.in_flight, "in_flight", int))
        k = len(self.in_flight)
        if k == 0 or min(self.in_flight) < 1:
            raise ConfigError(f"PartitionProblem.in_flight needs one count >= 1 per stage, "
                              f"got {self.in_flight!r}")
        limit = self.memory_limit_bytes
        if isinstance(limit, (int, np.integer)) and not isinstance(limit, bool):
            limit = (int(limit),) * k
        setter(self, "memory_limit_bytes", _tuple(limit, "memory_limit_bytes", int))
        if len(self.memory_limit_bytes) != k:
            raise ConfigError(f"PartitionProblem.memory_limit_bytes has "
                              f"{len(self.memory_limit_bytes)} entries for {k} stages")
        cut = _tuple(self.cut_s, "cut_s", float) if len(self.cut_s) else (0.0,) * (n - 1)
        if len(cut) != n - 1:
            raise ConfigError(f"PartitionProblem.cut_s has {len(cut)} entries; {n} blocks "
                              f"have {n - 1} cut points")
        setter(self, "cut_s", cut)
        for name in ("num_microbatches", "virtual_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"PartitionProblem.{name} must be a positive integer, "
                                  f"got {value!r}")
        if k % self.virtual_stages:
            raise ConfigError(f"{k} stages cannot be {self.virtual_stages} virtual stages "
                              f"on each pipeline rank; the stage count must be p * v")
        if self.recompute not in RECOMPUTE_CHOICES:
            raise ConfigError(f"unknown recompute choice {self.recompute!r}; choose one of "
                              f"{', '.join(RECOMPUTE_CHOICES)}")

    @classmethod
    def uniform(cls, num_blocks: int, *, stages: int, forward_s: float = 1.0,
                backward_s: float | None = None, activation_bytes: int = 0,
                input_bytes: int = 0, static_bytes: int = 0, memory_limit_bytes: int,
                num_microbatches: int, cut_s: float = 0.0, recompute: str = "stage-aware",
                prefix: str = "layers") -> PartitionProblem:
        """``num_blocks`` identical blocks under 1F1B (``in_flight = min(p - s, m)``);
        backward defaults to twice the forward, recompute to one forward.

        >>> PartitionProblem.uniform(4, stages=2, memory_limit_bytes=10,
        ...                          num_microbatches=1).blocks
        ('layers.0', 'layers.1', 'layers.2', 'layers.3')
        """
        backward = 2.0 * forward_s if backward_s is None else backward_s
        return cls(
            blocks=tuple(f"{prefix}.{i}" for i in range(num_blocks)),
            forward_s=(forward_s,) * num_blocks, backward_s=(backward,) * num_blocks,
            recompute_s=(forward_s,) * num_blocks,
            activation_bytes=(activation_bytes,) * num_blocks,
            input_bytes=(input_bytes,) * num_blocks, static_bytes=(static_bytes,) * num_blocks,
            in_flight=one_f_one_b_in_flight(stages, num_microbatches),
            memory_limit_bytes=memory_limit_bytes, num_microbatches=num_microbatches,
            cut_s=(cut_s,) * (num_blocks - 1), recompute=recompute)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_stages(self) -> int:
        return len(self.in_flight)

    def saving_bytes(self, block: int) -> int:
        """Bytes per in-flight microbatch that recomputing ``block`` frees."""
        return self.activation_bytes[block] - self.input_bytes[block]

    def recomputable(self, block: int) -> bool:
        """Whether the policy lets ``block`` be recomputed and doing so frees memory."""
        return self.recompute != "none" and self.saving_bytes(block) > 0

    def step_time(self, stage_times: Sequence[float]) -> float:
        """The objective: ``(1/v) * sum(t) + (m*v - 1) * max(t)``.

        >>> PartitionProblem.uniform(4, stages=2, memory_limit_bytes=10,
        ...                          num_microbatches=3).step_time([3.0, 4.0])
        15.0
        """
        v = self.virtual_stages
        return math.fsum(stage_times) / v + (self.num_microbatches * v - 1) * max(stage_times)


def one_f_one_b_in_flight(stages: int, num_microbatches: int) -> tuple[int, ...]:
    """Peak in-flight microbatches per stage under 1F1B: ``min(p - s, m)``.

    >>> one_f_one_b_in_flight(4, 3)
    (3, 3, 2, 1)
    """
    return tuple(min(stages - s, num_microbatches) for s in range(stages))


@dataclass(frozen=True, slots=True)
class StageAssignment:
    """One stage of a solved partition: blocks ``[first, stop)`` and what it recomputes."""

    index: int
    first: int
    stop: int
    recompute: tuple[int, ...]
    """Indices of the stage's blocks that are recomputed."""
    time_s: float
    memory_bytes: int
    memory_limit_bytes: int
    in_flight: int

    @property
    def num_blocks(self) -> int:
        return self.stop - self.first

    @property
    def recompute_fraction(self) -> float:
        return len(self.recompute) / self.num_blocks


@dataclass(frozen=True, slots=True)
class PartitionSolution:
    """A partition with its stage times and memory, and how it was found."""

    stages: tuple[StageAssignment, ...]
    objective_s: float
    """The step time model ``T`` (see the module docstring)."""
    bottleneck_s: float
    """The slowest stage's time per microbatch."""
    solver: str
    status: str
    solve_time_s: float
    work: int = 0
    """Units of work the solver did (DP cells, stage evaluations): a clock-free measure of
    its cost, for scaling checks."""

    @property
    def boundaries(self) -> tuple[int, ...]:
        """First block index of each stage."""
        return tuple(stage.first for stage in self.stages)

    def block_names(self, problem: PartitionProblem, stage: int) -> tuple[str, ...]:
        """The block names of ``stage``."""
        st = self.stages[stage]
        return problem.blocks[st.first:st.stop]


def stage_memory(problem: PartitionProblem, stage: int, first: int, stop: int,
                 recompute: Sequence[int]) -> int:
    """Peak bytes of ``stage`` holding blocks ``[first, stop)`` recomputing ``recompute``.

    >>> prob = PartitionProblem.uniform(4, stages=2, activation_bytes=10, input_bytes=2,
    ...                                 static_bytes=5, memory_limit_bytes=100,
    ...                                 num_microbatches=4)
    >>> stage_memory(prob, 0, 0, 2, []), stage_memory(prob, 0, 0, 2, [0, 1])
    (50, 26)
    """
    c = problem.in_flight[stage]
    kept = sum(problem.activation_bytes[first:stop])
    saved = [problem.saving_bytes(b) for b in recompute]
    return (sum(problem.static_bytes[first:stop]) + c * (kept - sum(saved))
            + (max(saved) if saved else 0))


def evaluate_partition(problem: PartitionProblem, boundaries: Sequence[int],
                       recompute: Sequence[Sequence[int]], *, solver: str = "given",
                       status: str = "evaluated", solve_time_s: float = 0.0,
                       check_memory: bool = True) -> PartitionSolution:
    """Cost a partition given by each stage's first block and recomputed blocks.

    Raises ConfigError when the partition is malformed and, with ``check_memory``,
    InfeasibleError when a stage exceeds its budget.

    >>> prob = PartitionProblem.uniform(4, stages=2, memory_limit_bytes=10,
    ...                                 num_microbatches=3)
    >>> evaluate_partition(prob, [0, 2], [[], []]).objective_s
    24.0
    """
    n, k = problem.num_blocks, problem.num_stages
    bounds = tuple(int(b) for b in boundaries)
    if len(bounds) != k or len(recompute) != k:
        raise ConfigError(f"a partition into {k} stages needs {k} boundaries and recompute "
                          f"sets, got {len(bounds)} and {len(recompute)}")
    if bounds[0] != 0 or any(b >= a for b, a in zip(bounds, bounds[1:])) or bounds[-1] >= n:
        raise ConfigError(f"stage boundaries {bounds} must start at 0, increase strictly "
                          f"and stay below {n} blocks")
    stages = []
    for s in range(k):
        first, stop = bounds[s], (bounds[s + 1] if s + 1 < k else n)
        rec = tuple(sorted(int(b) for b in recompute[s]))
        for b in rec:
            if not first <= b < stop:
                raise ConfigError(f"stage {s} recomputes block {b} outside its blocks "
                                  f"[{first}, {stop})")
            if not problem.recomputable(b):
                raise ConfigError(f"block {b} ({problem.blocks[b]}) is not recomputable "
                                  f"under recompute={problem.recompute!r}")
        time_s = math.fsum([*problem.forward_s[first:stop], *problem.backward_s[first:stop],
                            *(problem.recompute_s[b] for b in rec),
                            problem.cut_s[stop - 1] if s + 1 < k else 0.0])
        memory = stage_memory(problem, s, first, stop, rec)
        if check_memory and memory > problem.memory_limit_bytes[s]:
            raise InfeasibleError(
                f"stage {s} (blocks {problem.blocks[first]}..{problem.blocks[stop - 1]}) needs "
                f"{memory} bytes but has {problem.memory_limit_bytes[s]}")
        stages.append(StageAssignment(s, first, stop, rec, time_s, memory,
                                      problem.memory_limit_bytes[s], problem.in_flight[s]))
    times = [st.time_s for st in stages]
    return PartitionSolution(tuple(stages), problem.step_time(times), max(times), solver,
                             status, solve_time_s)
