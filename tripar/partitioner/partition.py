"""Contiguous stage partition with per-stage recomputation: the problem and an exact DP.

The planner cuts the chain of blocks of a proxy graph into ``k = p * v``
contiguous, non-empty (virtual) stages and decides, per stage, which of the
stage's blocks drop their activations and recompute them in the backward.
This module states that problem on plain per-block numbers
(:class:`PartitionProblem`), so it does not depend on how the cost model
produced them, and solves it exactly with a dynamic program
(:func:`solve_partition_dp`); :func:`solve_fixed_partition` gives a split fixed in
advance (the uniform one the search also simulates) the same per-stage recompute
choice. :mod:`tripar.partitioner.partition_milp` solves the same problem as a MILP; the
two must agree.

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
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tripar.errors import ConfigError, InfeasibleError

RECOMPUTE_CHOICES = ("none", "full", "stage-aware")
"""What the partitioner may do about recomputation."""

_INF = math.inf


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


# --- the per-stage recompute choice ---------------------------------------------------------


def _cover(types: list[tuple[int, float, int]], need: int) -> tuple[float, tuple[int, ...]] | None:
    """Cheapest integer counts ``r_t <= n_t`` with ``sum r_t * sigma_t >= need``.

    ``types`` are ``(sigma, rho, n)``: bytes saved, time spent, blocks available.
    Branch and bound over types in order of time per byte, bounded by the
    fractional (greedy) relaxation. Exact; fast for the few block types a
    range of a real model has.
    """
    order = sorted(range(len(types)), key=lambda t: (types[t][1] / types[t][0], t))
    best_cost, best = _INF, None
    counts = [0] * len(types)

    def bound(pos: int, remaining: int) -> float:
        extra = 0.0
        for t in order[pos:]:
            sigma, rho, cnt = types[t]
            if cnt * sigma >= remaining:
                return extra + rho * remaining / sigma
            extra += rho * cnt
            remaining -= cnt * sigma
        return _INF

    def search(pos: int, remaining: int, cost: float) -> None:
        nonlocal best_cost, best
        if remaining <= 0:
            if cost < best_cost:
                best_cost, best = cost, tuple(counts)
            return
        if pos == len(order) or cost + bound(pos, remaining) >= best_cost:
            return
        t = order[pos]
        sigma, rho, cnt = types[t]
        top = min(cnt, -(-remaining // sigma))
        for r in range(top, -1, -1):
            counts[t] = r
            search(pos + 1, remaining - r * sigma, cost + r * rho)
        counts[t] = 0

    search(0, need, 0.0)
    return None if best is None else (best_cost, best)


def _choose_recompute(types: list[tuple[int, float, int]], base: int, c: int, limit: int,
                      policy: str) -> tuple[float, tuple[int, ...], int] | None:
    """Cheapest recompute counts per type so that the stage fits.

    ``base = static + c * sum(act)`` is the stage's memory without recompute.
    Returns (recompute time, counts per type, memory) or None if nothing fits.
    """
    none = (0,) * len(types)
    if policy == "none" or not types:
        return (0.0, none, base) if base <= limit else None
    if policy == "full":
        counts = tuple(t[2] for t in types)
        memory = base - c * sum(s * n for s, _, n in types) + max(s for s, _, _ in types)
        return (sum(r * n for _, r, n in types), counts, memory) if memory <= limit else None
    if base <= limit:
        return 0.0, none, base
    best: tuple[float, tuple[int, ...], int] | None = None
    # Enumerate the type whose block is re-materialised at the peak (largest saving used).
    for top in sorted(range(len(types)), key=lambda t: -types[t][0]):
        sigma_top = types[top][0]
        usable = [t for t in range(len(types)) if types[t][0] <= sigma_top]
        # at least one block of `top`; cover the rest with any usable type
        need = base + sigma_top - limit - c * sigma_top  # bytes still to free, after one top
        sub = [(c * types[t][0], types[t][1], types[t][2] - (t == top)) for t in usable]
        sub_idx = [i for i, (_, _, cnt) in enumerate(sub) if cnt > 0]
        if need <= 0:
            found: tuple[float, tuple[int, ...]] | None = (0.0, ())
            picked = {}
        else:
            found = _cover([sub[i] for i in sub_idx], need)
            if found is None:
                continue
            picked = {usable[sub_idx[j]]: r for j, r in enumerate(found[1])}
        cost = types[top][1] + found[0]
        if best is not None and cost >= best[0]:
            continue
        counts = tuple(picked.get(t, 0) + (t == top) for t in range(len(types)))
        memory = (base - c * sum(types[t][0] * counts[t] for t in range(len(types)))
                  + sigma_top)
        best = (cost, counts, memory)
    return best


def _unique_rows(counts: np.ndarray, base: np.ndarray) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """Distinct (counts..., base) rows and each row's index among them.

    Packs the small per-type counts into one int64 when they fit, so that two
    one-dimensional sorts replace numpy's much slower row-wise ``unique``.
    """
    rows, types = counts.shape
    bits = max(1, int(counts.max(initial=0)).bit_length())
    if types * bits <= 62:
        packed = np.zeros(rows, dtype=np.int64)
        for t in range(types):
            packed = (packed << bits) | counts[:, t]
        order = np.lexsort((base, packed))
        p_sorted, b_sorted = packed[order], base[order]
        new = np.ones(rows, dtype=bool)
        new[1:] = (p_sorted[1:] != p_sorted[:-1]) | (b_sorted[1:] != b_sorted[:-1])
        group = np.cumsum(new) - 1
        inverse = np.empty(rows, dtype=np.int64)
        inverse[order] = group
        firsts = order[new]
    else:
        keys = np.column_stack([counts, base])
        _, firsts, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
    unique = [(*(int(x) for x in counts[i]), int(base[i])) for i in firsts.tolist()]
    return unique, inverse


class _StageTable:
    """Minimal stage time of every (stage, first, stop), and its recompute choice.

    Ranges that fit without recompute, and ranges that do not fit even with every
    block recomputed, are costed with numpy in one go; only the ranges between
    need a recompute choice, and those are cached by composition (how many
    blocks of each recomputable type they hold), so the many ranges of a chain
    of identical layers share one computation.
    """

    def __init__(self, problem: PartitionProblem, *, tables: bool = True) -> None:
        self.problem = problem
        n = problem.num_blocks
        type_key: dict[tuple[int, float], int] = {}
        self.block_type = [-1] * n
        for b in range(n):
            if problem.recomputable(b):
                key = (problem.saving_bytes(b), problem.recompute_s[b])
                self.block_type[b] = type_key.setdefault(key, len(type_key))
        self.types = list(type_key)
        prefix = np.zeros((n + 1, len(self.types)), dtype=np.int64)
        for b in range(n):
            prefix[b + 1] = prefix[b]
            if self.block_type[b] >= 0:
                prefix[b + 1, self.block_type[b]] += 1
        self.prefix = prefix
        self.cache: dict[tuple, tuple[float, tuple[int, ...], int] | None] = {}
        rec = [b for b in range(n) if self.block_type[b] >= 0]
        save = np.zeros(n, dtype=np.int64)
        rec_s = np.zeros(n)
        save[rec] = [problem.saving_bytes(b) for b in rec]
        rec_s[rec] = [problem.recompute_s[b] for b in rec]

        def span(values, dtype):
            cum = np.concatenate([[0], np.cumsum(values, dtype=dtype)])
            return cum[None, :] - cum[:, None]          # [first, stop]

        self.fb = span(np.add(problem.forward_s, problem.backward_s), np.float64)
        self.act = span(problem.activation_bytes, np.int64)
        self.static = span(problem.static_bytes, np.int64)
        self.save = span(save, np.int64)
        self.rec_s = span(rec_s, np.float64)
        self.top = np.zeros((n + 1, n + 1), dtype=np.int64)   # largest saving in [first, stop)
        for first in range(n):
            self.top[first, first + 1:] = np.maximum.accumulate(save[first:])
        cut = np.zeros(n + 1)
        cut[1:n] = problem.cut_s
        self.cut = cut
        self.tables = [self._stage(s) for s in range(problem.num_stages)] if tables else []

    def valid(self, s: int) -> np.ndarray:
        """Ranges stage s can hold while every other stage keeps at least one block."""
        n, k = self.problem.num_blocks, self.problem.num_stages
        first = np.arange(n + 1)[:, None]
        stop = np.arange(n + 1)[None, :]
        return (first >= s) & (stop > first) & (stop <= n - (k - 1 - s))

    def least_memory(self, s: int) -> np.ndarray:
        """Each range's memory on stage s with every recomputable block recomputed
        (the least the policy allows; see the module docstring)."""
        c = self.problem.in_flight[s]
        base = self.static + c * self.act
        if self.problem.recompute == "none":
            return base
        return base - c * self.save + self.top

    def _stage(self, s: int) -> np.ndarray:
        """(n+1) x (n+1) matrix of stage s's minimal time for [first, stop), inf if not fit."""
        p = self.problem
        c, limit = p.in_flight[s], p.memory_limit_bytes[s]
        valid = self.valid(s)
        cut = self.cut[None, :] if s + 1 < p.num_stages else 0.0
        times = np.full(valid.shape, _INF)
        fits_full = valid & (self.least_memory(s) <= limit)
        if p.recompute == "full":
            times[fits_full] = (self.fb + self.rec_s + cut)[fits_full]
            return times
        base = self.static + c * self.act
        plain = valid & (base <= limit)
        times[plain] = (self.fb + cut)[plain]
        first, stop = np.nonzero(fits_full & ~plain)
        if len(first):
            # one recompute choice per distinct (composition, base memory)
            counts = self.prefix[stop] - self.prefix[first]
            unique, inverse = _unique_rows(counts, base[first, stop])
            extra = np.empty(len(unique))
            for u, row in enumerate(unique):
                got = self._solve(row[:-1], row[-1], c, limit)
                assert got is not None, "least memory fits, so some choice fits"
                extra[u] = got[0]
            times[first, stop] = (self.fb[first, stop] + extra[inverse]
                                  + (self.cut[stop] if s + 1 < p.num_stages else 0.0))
        return times

    def choice(self, s: int, first: int, stop: int) -> tuple[float, tuple[int, ...], int] | None:
        """(recompute time, recompute count per type, memory) of the cheapest fit, or None."""
        p = self.problem
        c, limit = p.in_flight[s], p.memory_limit_bytes[s]
        base = int(self.static[first, stop] + c * self.act[first, stop])
        if base <= limit and p.recompute != "full":
            return 0.0, (0,) * len(self.types), base
        counts = tuple(int(x) for x in self.prefix[stop] - self.prefix[first])
        return self._solve(counts, base, c, limit)

    def _solve(self, counts: tuple[int, ...], base: int, c: int,
               limit: int) -> tuple[float, tuple[int, ...], int] | None:
        key = (counts, base, c, limit)
        if key not in self.cache:
            present = [t for t, cnt in enumerate(counts) if cnt]
            sub = [(self.types[t][0], self.types[t][1], counts[t]) for t in present]
            got = _choose_recompute(sub, base, c, limit, self.problem.recompute)
            if got is not None:
                full = [0] * len(self.types)
                for t, r in zip(present, got[1]):
                    full[t] = r
                got = (got[0], tuple(full), got[2])
            self.cache[key] = got
        return self.cache[key]

    def recompute_blocks(self, s: int, first: int, stop: int) -> tuple[int, ...]:
        """The blocks a stage recomputes: per type, the earliest ones of the range."""
        choice = self.choice(s, first, stop)
        assert choice is not None
        left = list(choice[1])
        out = []
        for b in range(first, stop):
            t = self.block_type[b]
            if t >= 0 and left[t] > 0:
                out.append(b)
                left[t] -= 1
        return tuple(out)


def _chain_dp(tables: list[np.ndarray], cap: float) -> tuple[float, list[np.ndarray]]:
    """min sum of stage times with every stage time <= cap; returns (sum, argmin per stage)."""
    n1 = tables[0].shape[0]
    best = np.full(n1, _INF)
    best[0] = 0.0
    args = []
    for table in tables:
        masked = np.where(table <= cap, table, _INF)
        total = best[:, None] + masked
        arg = np.argmin(total, axis=0)
        best = total[arg, np.arange(n1)]
        args.append(arg)
    return float(best[-1]), args


def _trace(args: list[np.ndarray], n: int) -> list[int]:
    bounds, stop = [], n
    for arg in reversed(args):
        stop = int(arg[stop])
        bounds.append(stop)
    return bounds[::-1]


def solve_partition_dp(problem: PartitionProblem, *, use_runs: bool = True) -> PartitionSolution:
    """Exact minimum of the step-time model over contiguous partitions and recompute sets.

    For each candidate bottleneck value ``B`` (a stage time that some stage can
    have), a chain DP finds the least sum of stage times with every stage at
    most ``B``; the optimum is ``min_B sum_B / v + (m*v - 1) * B``. Candidates
    are tried in increasing order from the smallest feasible one and the loop
    stops once ``(m*v - 1) * B`` plus the unconstrained least sum cannot win.
    Cost: ``O(n^2 k)`` per candidate (numpy), plus one recompute choice per
    distinct range composition and stage, so a chain of identical layers
    costs about as much as its length, not the square of the number of types.
    With ``use_runs`` (default), a chain with a long run of identical blocks is solved
    by layer counts instead (:mod:`tripar.partitioner.partition_runs`, same optimum,
    work linear in the run's length); ``use_runs=False`` forces the DP over ranges.

    >>> prob = PartitionProblem.uniform(6, stages=3, activation_bytes=10, input_bytes=1,
    ...                                 memory_limit_bytes=40, num_microbatches=4)
    >>> sol = solve_partition_dp(prob)
    >>> sol.boundaries, [s.recompute for s in sol.stages], sol.objective_s
    ((0, 2, 4), [(0, 1), (), ()], 44.0)
    """
    start = time.perf_counter()
    n, k = problem.num_blocks, problem.num_stages
    if n < k:
        raise InfeasibleError(
            f"cannot cut {n} blocks into {k} non-empty pipeline stages; use at most {n} "
            f"stages (pp * vpp <= {n})")
    if use_runs:
        from tripar.partitioner.partition_runs import find_run, solve_partition_runs

        run = find_run(problem)
        fast = solve_partition_runs(problem, run) if run is not None else None
        if fast is not None:
            return fast
    table = _StageTable(problem)
    cells = [k * (n + 1) ** 2]
    steady = problem.num_microbatches * problem.virtual_stages - 1
    v = problem.virtual_stages
    free_sum, free_args = _chain_dp(table.tables, _INF)
    cells[0] += k * (n + 1) ** 2
    if not math.isfinite(free_sum):
        raise diagnose_infeasible(problem)
    if steady == 0:
        best_args = free_args
    else:
        values = np.unique(np.concatenate([t[np.isfinite(t)] for t in table.tables]))
        lo, hi = 0, len(values) - 1      # smallest feasible cap, by bisection
        while lo < hi:
            mid = (lo + hi) // 2
            cells[0] += k * (n + 1) ** 2
            if math.isfinite(_chain_dp(table.tables, values[mid])[0]):
                hi = mid
            else:
                lo = mid + 1
        best_value, best_args = _INF, free_args
        for cap in values[lo:]:
            if free_sum / v + steady * cap >= best_value:
                break
            total, args = _chain_dp(table.tables, cap)
            cells[0] += k * (n + 1) ** 2
            if total / v + steady * cap < best_value:
                best_value, best_args = total / v + steady * cap, args
    bounds = _trace(best_args, n)
    rec = [table.recompute_blocks(s, bounds[s], bounds[s + 1] if s + 1 < k else n)
           for s in range(k)]
    sol = evaluate_partition(problem, bounds, rec, solver="dp", status="optimal",
                             solve_time_s=time.perf_counter() - start)
    return PartitionSolution(sol.stages, sol.objective_s, sol.bottleneck_s, sol.solver,
                             sol.status, sol.solve_time_s, work=cells[0])


def solve_fixed_partition(problem: PartitionProblem,
                          boundaries: Sequence[int]) -> PartitionSolution:
    """The cheapest recomputation for a split given by each stage's first block: per
    stage, the blocks :func:`solve_partition_dp` would recompute on that range (none when
    the stage fits, else the least recompute time that fits its budget).

    Raises ConfigError for malformed boundaries and InfeasibleError, naming the stage, its
    least memory and its budget, when a stage does not fit even with every block the
    policy allows recomputed.

    >>> prob = PartitionProblem.uniform(6, stages=3, activation_bytes=10, input_bytes=1,
    ...                                 memory_limit_bytes=40, num_microbatches=4)
    >>> sol = solve_fixed_partition(prob, (0, 2, 4))
    >>> [s.recompute for s in sol.stages], sol.objective_s, sol.status
    ([(0, 1), (), ()], 44.0, 'fixed split')
    """
    start = time.perf_counter()
    n, k = problem.num_blocks, problem.num_stages
    bounds = tuple(int(b) for b in boundaries)
    if (len(bounds) != k or bounds[0] != 0 or bounds[-1] >= n
            or any(a >= b for a, b in zip(bounds, bounds[1:]))):
        raise ConfigError(f"stage boundaries {list(bounds)} must be the first block of each "
                          f"of the {k} stages: start at 0, increase strictly, stay below {n}")
    table = _StageTable(problem, tables=False)
    stops = (*bounds[1:], n)
    rec = []
    for s, (first, stop) in enumerate(zip(bounds, stops)):
        if table.choice(s, first, stop) is None:
            least = int(table.least_memory(s)[first, stop])
            limit = problem.memory_limit_bytes[s]
            how = ("with every block recomputed" if problem.recompute != "none"
                   else "without recompute")
            raise InfeasibleError(
                f"stage {s} ({problem.blocks[first]}..{problem.blocks[stop - 1]}, "
                f"{stop - first} blocks, {problem.in_flight[s]} microbatches in flight) of "
                f"the split {list(bounds)} needs at least {least} bytes "
                f"({least / 1e9:.2f} GB) {how} but its budget is {limit} bytes "
                f"({limit / 1e9:.2f} GB), {least - limit} bytes short")
        rec.append(table.recompute_blocks(s, first, stop))
    sol = evaluate_partition(problem, bounds, rec, solver="fixed", status="fixed split",
                             solve_time_s=time.perf_counter() - start)
    return PartitionSolution(sol.stages, sol.objective_s, sol.bottleneck_s, sol.solver,
                             sol.status, sol.solve_time_s, work=k)


def diagnose_infeasible(problem: PartitionProblem) -> InfeasibleError:
    """The error for a problem no partition fits: the partition that overshoots least,
    its worst stage, the bytes it needs at least, its budget and what would help.

    >>> prob = PartitionProblem.uniform(4, stages=2, static_bytes=100, activation_bytes=8,
    ...                                 memory_limit_bytes=150, num_microbatches=4)
    >>> print(diagnose_infeasible(prob))  # doctest: +ELLIPSIS
    stage 0 (layers.0..layers.1, 2 blocks, 2 microbatches in flight) needs at least 208 bytes ...
    """
    n, k = problem.num_blocks, problem.num_stages
    if n < k:
        return InfeasibleError(f"cannot cut {n} blocks into {k} non-empty pipeline stages")
    table = _StageTable(problem, tables=False)
    least = []  # least memory of each (stage, first, stop) minus its budget
    for s in range(k):
        over = (table.least_memory(s) - problem.memory_limit_bytes[s]).astype(np.float64)
        least.append(np.where(table.valid(s), over, _INF))
    best = np.full(n + 1, _INF)
    best[0] = -_INF
    args = []
    for over in least:
        total = np.maximum(best[:, None], over)
        arg = np.argmin(total, axis=0)
        best = total[arg, np.arange(n + 1)]
        args.append(arg)
    bounds = _trace(args, n)
    worst, first, stop = 0, 0, n
    worst_over = -_INF
    for s in range(k):
        a, b = bounds[s], (bounds[s + 1] if s + 1 < k else n)
        if least[s][a, b] > worst_over:
            worst, first, stop, worst_over = s, a, b, least[s][a, b]
    limit = problem.memory_limit_bytes[worst]
    need = int(worst_over + limit)
    how = "with every block recomputed" if problem.recompute != "none" else "without recompute"
    fixes = ["more pipeline stages", "tensor parallelism", "ZeRO-1 optimizer sharding",
             "a smaller microbatch"]
    if problem.recompute == "none":
        fixes.insert(0, "allowing recomputation")
    return InfeasibleError(
        f"stage {worst} ({problem.blocks[first]}..{problem.blocks[stop - 1]}, "
        f"{stop - first} blocks, {problem.in_flight[worst]} microbatches in flight) needs at "
        f"least {need} bytes ({need / 1e9:.2f} GB) {how} but its budget is {limit} bytes "
        f"({limit / 1e9:.2f} GB), {need - limit} bytes short, in the partition into {k} "
        f"stages that fits best; try {', '.join(fixes)}")
