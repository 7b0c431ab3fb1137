"""Discrete-event simulation of a pipeline schedule: step time, bubble, memory, timeline.

Each rank runs its actions in the schedule's order, one at a time, never
preempted. An action starts when its rank is free and what it receives has
arrived:

- ``F``/``f`` of stage s > 0 on microbatch j: when stage s - 1's forward of j
  ended, plus ``stage_costs[s - 1].send_s`` (the activation crossing cut s-1|s);
- ``B`` of stage s < last on j: when stage s + 1's ``B`` of j ended, plus
  ``stage_costs[s].send_s`` (the gradient of that same activation coming back);
- ``R`` and ``W`` only wait for their rank.

Sends are asynchronous: they cost the sender nothing. Durations per microbatch
come from the stage's ``StageCost``: ``F`` and ``f`` take ``forward_s``, ``R``
``recompute_s``, ``W`` ``backward_weight_s``; ``B`` takes ``backward_input_s`` on a
stage whose backward is split (the schedule has ``W`` actions for it) and
``backward_input_s + backward_weight_s`` otherwise. After its last action a rank
runs the ``tail_s`` of each of its stages (gradient reduction, optimizer step).

Memory per stage: ``static_bytes`` all step; ``activation_bytes`` per microbatch
from the start of its ``F`` (or ``R``) to the end of its ``B``; ``input_bytes``
from the start of an ``f`` to the end of its ``R``; on a split stage the ``B``
leaves ``weight_grad_bytes`` held until its ``W`` ends. A rank's memory is the
sum over its stages. The in-flight count of a stage is the number of
microbatches holding ``activation_bytes`` (F or R started, B not finished).

The loop visits every action once and looks dependencies up in flat arrays, so
a schedule of N actions simulates in O(N).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np

from tripar.errors import PlanError
from tripar.partitioner.stage_cost import StageCost
from tripar.plan.schedule import Schedule

__all__ = ["EncodedSchedule", "SimResult", "TimelineEvent", "encode_schedule", "simulate"]


class TimelineEvent(NamedTuple):
    """One action as it ran."""

    rank: int
    stage: int
    kind: str
    """"F", "f", "R", "B" or "W"."""
    microbatch: int
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class SimResult:
    """What one simulated training step did. Per-rank tuples are indexed by rank, per-stage
    tuples by virtual stage."""

    step_time_s: float
    """From the first action to the end of the slowest rank's tail."""
    bubble_fraction: float
    """(pipeline_time_s - max(busy_s)) / max(busy_s): the idle time inside the pipeline of
    its busiest rank, as a share of that rank's compute (the step the pipeline would take
    with no bubble). Uniform stages, no communication: (p-1)/m for gpipe and 1f1b,
    (p-1)/(v m) for interleaved-1f1b."""
    pipeline_time_s: float
    """When the last action of any rank ends (tails excluded)."""
    busy_s: tuple[float, ...]
    """Per rank: time spent in actions (tail excluded)."""
    finish_s: tuple[float, ...]
    """Per rank: when its last action ends, plus its tail."""
    peak_memory_bytes: tuple[int, ...]
    """Per rank: peak of static + activation + input + weight-gradient bytes of its stages."""
    stage_peak_memory_bytes: tuple[int, ...]
    """Per virtual stage: the same, counting only that stage."""
    peak_inflight: tuple[int, ...]
    """Per rank: most microbatch-stages holding full activations at once (summed over the
    rank's virtual stages; divide by vpp for full-stage microbatches)."""
    stage_peak_inflight: tuple[int, ...]
    """Per virtual stage: most microbatches holding full activations at once."""
    stage_peak_pending_w: tuple[int, ...]
    """Per virtual stage: most microbatches between their B and W (0 if not split)."""
    stage_bytes_at_rank_peak: tuple[int, ...] = ()
    """Per virtual stage: its bytes when its rank's memory peaks (a rank's parts sum to
    its ``peak_memory_bytes``; its stages' own peaks, which fall apart in time, may sum
    to more)."""
    memory_timeline: tuple[tuple[tuple[float, int], ...], ...] = ()
    """Per rank: (time, bytes) at every change, starting at (0, static); empty when not
    recorded."""
    events: tuple[TimelineEvent, ...] = ()
    """Every action with its start and end; empty when not recorded."""

    @property
    def peak_memory(self) -> int:
        """The largest per-rank peak."""
        return max(self.peak_memory_bytes)


_LETTERS = "FfRBW"  # kind codes 0..4
_KIND_OF_CODE = ("F", "f", "R", "B", "W")


def simulate(
    schedule: Schedule,
    stage_costs: Sequence[StageCost],
    *,
    record_timeline: bool = True,
    encoded: EncodedSchedule | None = None,
) -> SimResult:
    """Play ``schedule`` forward in time with per-virtual-stage costs.

    ``stage_costs[s]`` is virtual stage s's cost (``len == pp * vpp``). ``encoded``:
    ``encode_schedule(schedule)``, when the caller simulates the same schedule often.

    >>> from tripar.partitioner.schedules import build_schedule
    >>> cost = StageCost(forward_s=1.0, backward_input_s=1.0, backward_weight_s=1.0)
    >>> r = simulate(build_schedule("1f1b", 4, 8), [cost] * 4)
    >>> r.step_time_s, r.bubble_fraction, r.stage_peak_inflight
    (33.0, 0.375, (4, 3, 2, 1))
    """
    num_stages = schedule.num_stages
    if len(stage_costs) != num_stages:
        raise PlanError(
            f"schedule {schedule.name!r} has {num_stages} virtual stages (pp={schedule.pp} x "
            f"vpp={schedule.vpp}) but {len(stage_costs)} stage costs were given; give one "
            f"StageCost per virtual stage"
        )
    pp = schedule.pp
    if encoded is None or encoded.schedule is not schedule:
        encoded = encode_schedule(schedule)
    g = _encode(encoded, stage_costs)
    end = _play(schedule, g)
    start = end - g.dur

    bounds = g.rank_bounds
    busy = [float(g.dur[a:b].sum()) for a, b in zip(bounds, bounds[1:])]
    free = [float(end[b - 1]) if b > a else 0.0 for a, b in zip(bounds, bounds[1:])]
    tails = [0.0] * pp
    static = [0] * pp
    for r in range(pp):
        for s in schedule.stages_of(r):
            tails[r] += stage_costs[s].tail_s
            static[r] += stage_costs[s].static_bytes
    finish = [free[r] + tails[r] for r in range(pp)]
    pipeline_time = max(free)
    max_busy = max(busy)

    # memory and in-flight counts: per rank the actions run in list order, so the sequence
    # start0, end0, start1, end1, ... is in time order (a free at t before an allocation at t)
    mem_delta = np.empty(2 * g.n, dtype=np.int64)
    mem_delta[0::2], mem_delta[1::2] = g.alloc, -g.free
    count_delta = np.empty(2 * g.n, dtype=np.int64)
    count_delta[0::2], count_delta[1::2] = g.holds, -g.releases
    pend_delta = np.zeros(2 * g.n, dtype=np.int64)
    pend_delta[1::2] = g.pending
    rank_starts = [2 * a for a in bounds[:-1]]
    peak_mem = [static[r] + v for r, v in enumerate(_segment_peaks(mem_delta, rank_starts))]
    peak_inflight = _segment_peaks(count_delta, rank_starts)
    # per stage replica (a stage of two pipelines runs on two ranks: its peak is the larger)
    copies = schedule.pipelines
    replica = g.stage * copies + (2 * g.mb >= schedule.num_microbatches) * (copies - 1)
    by_stage = np.argsort(np.repeat(replica, 2), kind="stable")
    stage_starts = np.searchsorted(np.repeat(replica, 2)[by_stage],
                                   np.arange(num_stages * copies)).tolist()

    def per_stage(delta: np.ndarray) -> list[int]:
        peaks = _segment_peaks(delta[by_stage], stage_starts)
        return [max(peaks[s * copies:(s + 1) * copies]) for s in range(num_stages)]

    stage_peak_mem = [c.static_bytes + v for c, v in zip(stage_costs, per_stage(mem_delta))]
    stage_peak_inflight = per_stage(count_delta)
    stage_peak_pending = per_stage(pend_delta)
    extra = [0] * num_stages   # what each stage holds at its rank's peak (the larger of
    entry_stage = np.repeat(g.stage, 2)   # a chimera stage's two ranks)
    for a, b in zip(rank_starts, rank_starts[1:] + [2 * g.n]):
        level = np.cumsum(mem_delta[a:b])
        if b > a and level.max() > 0:
            top = int(np.argmax(level)) + 1
            held = np.bincount(entry_stage[a:a + top], weights=mem_delta[a:a + top],
                               minlength=num_stages)
            for stage in np.nonzero(held)[0].tolist():
                extra[stage] = max(extra[stage], int(held[stage]))
    at_peak = [c.static_bytes + x for c, x in zip(stage_costs, extra)]

    timeline: tuple[tuple[tuple[float, int], ...], ...] = ()
    events: tuple[TimelineEvent, ...] = ()
    if record_timeline:
        times = np.empty(2 * g.n)
        times[0::2], times[1::2] = start, end
        tl = []
        for r, (a, b) in enumerate(zip(rank_starts, rank_starts[1:] + [2 * g.n])):
            level = np.cumsum(mem_delta[a:b]) + static[r]
            keep = mem_delta[a:b] != 0
            tl.append(((0.0, static[r]),) + tuple(zip(times[a:b][keep].tolist(),
                                                       level[keep].tolist())))
        timeline = tuple(tl)
        ranks = np.repeat(np.arange(pp), np.diff(bounds)).tolist()
        kinds = [_KIND_OF_CODE[k] for k in g.kind.tolist()]
        make = partial(tuple.__new__, TimelineEvent)
        events = tuple(map(make, zip(
            ranks, g.stage.tolist(), kinds, g.mb.tolist(), start.tolist(), end.tolist())))

    return SimResult(
        step_time_s=max(finish),
        bubble_fraction=(pipeline_time - max_busy) / max_busy if max_busy > 0 else 0.0,
        pipeline_time_s=pipeline_time,
        busy_s=tuple(busy),
        finish_s=tuple(finish),
        peak_memory_bytes=tuple(int(x) for x in peak_mem),
        stage_peak_memory_bytes=tuple(int(x) for x in stage_peak_mem),
        peak_inflight=tuple(peak_inflight),
        stage_peak_inflight=tuple(stage_peak_inflight),
        stage_peak_pending_w=tuple(stage_peak_pending),
        stage_bytes_at_rank_peak=tuple(at_peak),
        memory_timeline=timeline,
        events=events,
    )


@dataclass(frozen=True, slots=True)
class EncodedSchedule:
    """A schedule's actions as flat arrays, independent of stage costs: build it once with
    :func:`encode_schedule` and pass it to :func:`simulate` for every costing of the same
    schedule (the search simulates one schedule under many partitions)."""

    schedule: Schedule
    n: int
    rank_bounds: list[int]
    stage: np.ndarray
    kind: np.ndarray
    mb: np.ndarray
    split: np.ndarray
    """Per stage: whether its backward is split into B and W."""
    dep: list[int]
    """Index of the action whose end this one waits for; -1: none."""
    send_from: np.ndarray
    """Stage whose ``send_s`` delays this action's dependency; -1: none."""
    holds: np.ndarray
    releases: np.ndarray
    pending: np.ndarray


def encode_schedule(schedule: Schedule) -> EncodedSchedule:
    """Check ``schedule`` once and lay its actions out as arrays (see EncodedSchedule).

    >>> from tripar.partitioner.schedules import build_schedule
    >>> enc = encode_schedule(build_schedule("1f1b", 2, 4))
    >>> enc.n, enc.rank_bounds
    (16, [0, 8, 16])
    """
    m, num_stages = schedule.num_microbatches, schedule.num_stages
    last = num_stages - 1
    flat = [a for acts in schedule.actions for a in acts]
    n = len(flat)
    bounds = [0]
    for acts in schedule.actions:
        bounds.append(bounds[-1] + len(acts))
    stages, kinds, mbs = zip(*flat) if flat else ((), (), ())
    stage = np.array(stages, dtype=np.int64)
    kind = np.array(list(map(_LETTERS.index, kinds)), dtype=np.int64)
    mb = np.array(mbs, dtype=np.int64)
    split = np.zeros(num_stages, dtype=bool)
    split[stage[kind == 4]] = True
    key = stage * m + mb
    ids = np.arange(n)
    is_fwd, is_bwd = kind <= 1, kind == 3
    fwd_id = np.full(num_stages * m, -2, dtype=np.int64)
    fwd_id[key[is_fwd]] = ids[is_fwd]
    bwd_id = np.full(num_stages * m, -2, dtype=np.int64)
    bwd_id[key[is_bwd]] = ids[is_bwd]
    if not _well_formed(kind, key, ids, fwd_id, bwd_id, split[stage], num_stages * m):
        schedule.validate()  # raises, naming the rank and step
        raise PlanError(f"schedule {schedule.name!r} is malformed")
    dep = np.full(n, -1, dtype=np.int64)
    send_from = np.full(n, -1, dtype=np.int64)
    wants_fwd = is_fwd & (stage > 0)
    dep[wants_fwd] = fwd_id[key[wants_fwd] - m]
    send_from[wants_fwd] = stage[wants_fwd] - 1
    wants_bwd = is_bwd & (stage < last)
    dep[wants_bwd] = bwd_id[key[wants_bwd] + m]
    send_from[wants_bwd] = stage[wants_bwd]
    holds = ((kind == 0) | (kind == 2)).astype(np.int64)
    pending = np.select([is_bwd & split[stage], kind == 4], [1, -1], 0)
    return EncodedSchedule(schedule, n, bounds, stage, kind, mb, split, dep.tolist(),
                           send_from, holds, is_bwd.astype(np.int64), pending)


@dataclass(frozen=True, slots=True)
class _Encoded:
    """An encoded schedule with one set of stage costs applied."""

    n: int
    rank_bounds: list[int]
    stage: np.ndarray
    kind: np.ndarray
    mb: np.ndarray
    dur: np.ndarray
    dep: list[int]
    delay: list[float]
    alloc: np.ndarray
    free: np.ndarray
    holds: np.ndarray
    releases: np.ndarray
    pending: np.ndarray


def _encode(enc: EncodedSchedule, stage_costs: Sequence[StageCost]) -> _Encoded:
    stage, kind, split = enc.stage, enc.kind, enc.split
    costs = np.array([(c.forward_s, c.forward_s, c.recompute_s, c.backward_input_s,
                       c.backward_weight_s) for c in stage_costs], dtype=float)
    costs[:, 3] += np.where(split, 0.0, costs[:, 4])
    dur = costs[stage, kind]
    send = np.array([c.send_s for c in stage_costs] + [0.0])
    delay = np.where(enc.send_from >= 0, send[enc.send_from], 0.0)
    act_b = np.array([c.activation_bytes for c in stage_costs], dtype=np.int64)
    in_b = np.array([c.input_bytes for c in stage_costs], dtype=np.int64)
    wg_b = np.where(split, [c.weight_grad_bytes for c in stage_costs], 0).astype(np.int64)
    alloc = np.where(enc.holds == 1, act_b[stage], np.where(kind == 1, in_b[stage], 0))
    free = np.select([kind == 2, kind == 3, kind == 4],
                     [in_b[stage], act_b[stage] - wg_b[stage], wg_b[stage]], 0)
    return _Encoded(enc.n, enc.rank_bounds, stage, kind, enc.mb, dur, enc.dep,
                    delay.tolist(), alloc, free, enc.holds, enc.releases, enc.pending)


def _well_formed(kind: np.ndarray, key: np.ndarray, ids: np.ndarray, fwd_id: np.ndarray,
                 bwd_id: np.ndarray, on_split: np.ndarray, slots: int) -> bool:
    """Cheap vectorised form of ``Schedule.validate``'s per-stage checks: one forward and one
    B per microbatch, R after f, B after the forward, W after B, W everywhere on a split
    stage. (Placement of R before B is not checked here; ``validate`` does.)"""
    counts = [np.bincount(key[kind == k], minlength=slots) for k in range(5)]
    fwd = counts[0] + counts[1]
    w_expected = np.zeros(slots, dtype=np.int64)
    w_expected[key[on_split]] = 1
    if (fwd != 1).any() or (counts[3] != 1).any() or (counts[2] != counts[1]).any() \
            or (counts[4] != w_expected).any():
        return False
    for k, before in ((2, fwd_id), (3, fwd_id), (4, bwd_id)):
        sel = kind == k
        if (before[key[sel]] >= ids[sel]).any():
            return False
    return True


def _play(schedule: Schedule, g: _Encoded) -> np.ndarray:
    """End time of every action: each rank in order, an action starting when its rank is free
    and what it waits for has ended (plus the link's delay). O(actions)."""
    pp = schedule.pp
    dur, dep, delay = g.dur.tolist(), g.dep, g.delay
    end = [-1.0] * g.n
    bounds = g.rank_bounds
    ptr = bounds[:-1]
    free = [0.0] * pp
    waiting: dict[int, int] = {}  # action index -> rank blocked on it
    queue = deque(range(pp))
    while queue:
        r = queue.popleft()
        i, t, stop = ptr[r], free[r], bounds[r + 1]
        while i < stop:
            d = dep[i]
            if d != -1:
                e = end[d] if d >= 0 else -1.0
                if e < 0.0:
                    waiting[d] = r
                    break
                e += delay[i]
                if e > t:
                    t = e
            t += dur[i]
            end[i] = t
            if waiting:
                w = waiting.pop(i, None)
                if w is not None:
                    queue.append(w)
            i += 1
        ptr[r], free[r] = i, t
    if any(ptr[r] < bounds[r + 1] for r in range(pp)):
        schedule.validate()  # raises with the grid
        raise PlanError(f"schedule {schedule.name!r} stalled in simulation")
    return np.array(end)


def _segment_peaks(delta: np.ndarray, starts: Sequence[int]) -> list[int]:
    """Per segment [starts[i], starts[i+1]): the peak of the running sum, at least 0."""
    if len(delta) == 0:
        return [0] * len(starts)
    level = np.cumsum(delta)
    out = []
    bounds = list(starts) + [len(delta)]
    for a, b in zip(bounds, bounds[1:]):
        if b <= a:
            out.append(0)
            continue
        base = level[a - 1] if a > 0 else 0
        out.append(max(0, int(level[a:b].max() - base)))
    return out
