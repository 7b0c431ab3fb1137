"""Pipeline schedule generators: one function per schedule, all producing ``Schedule``.

``build_schedule`` is the entry point. The orders follow the published
schedules:

- ``gpipe``: all forwards, then all backwards (in microbatch order).
- ``1f1b`` (PipeDream-Flush / DAPPLE, Megatron's non-interleaved schedule):
  rank r runs min(pp - 1 - r, m) warm-up forwards, then alternates one forward
  and one backward, then drains the remaining backwards.
- ``interleaved-1f1b`` (Megatron-LM, arXiv 2104.04473): vpp virtual stages per
  rank, microbatches taken in groups of pp; rank r warms up with
  2 (pp - 1 - r) + (vpp - 1) pp forwards (all of them when m == pp).
- ``zb-h1`` (arXiv 2401.10241; ``torch.distributed.pipelining``'s ZB1P with one
  stage per rank): 1F1B order with the backward split into B (input gradient)
  and W (weight gradient); rank r defers its first r W's, so W's fill the
  cool-down bubble while B's, the critical path, are not delayed.
- ``scp``: Merak's shifted critical path with stage-aware recomputation (see
  ``scp_orders``).
- ``chimera`` (Li and Hoefler, SC'21, arXiv 2107.06925): two pipelines in opposite
  directions over the same ranks (``Schedule.pipelines == 2``; see ``_chimera``).

Recomputation (``recompute=``): ``"none"``; ``"full"`` (every forward is ``f`` and
an ``R`` runs right before each ``B``, like Megatron's full recomputation); or a
per-virtual-stage sequence of booleans (True: that stage recomputes as ``"full"``
does). ``scp`` takes ``"stage-aware"`` (its default, Merak's rule), ``"full"``,
or per-stage booleans that switch its rule on and off per stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from tripar.errors import ConfigError
from tripar.plan.config import SCHEDULES
from tripar.plan.schedule import Action, ActionKind, Schedule

__all__ = ["build_schedule", "check_chimera", "scp_recomputed", "warmup_in_flight"]

_F, _f, _R = ActionKind.FORWARD, ActionKind.FORWARD_INPUT_ONLY, ActionKind.RECOMPUTE
_B, _W = ActionKind.BACKWARD, ActionKind.WEIGHT

# (kind, virtual stage, microbatch) before recomputation is applied; kind is "F", "B" or "W".
_Op = tuple[str, int, int]


def build_schedule(
    name: str,
    pp: int,
    num_microbatches: int,
    *,
    vpp: int = 1,
    recompute: str | Sequence[bool] | None = None,
) -> Schedule:
    """Generate schedule ``name`` for ``pp`` ranks and ``num_microbatches`` microbatches.

    ``recompute`` defaults to ``"none"``, and to ``"stage-aware"`` for ``scp``.

    >>> print(build_schedule("1f1b", 3, 4).to_text(), end="")
    schedule 1f1b pp=3 vpp=1 microbatches=4
    rank 0: F0 F1 F2 B0 F3 B1 B2 B3
    rank 1: F0 F1 B0 F2 B1 F3 B2 B3
    rank 2: F0 B0 F1 B1 F2 B2 F3 B3
    >>> build_schedule("gpipe", 2, 2, recompute="full").actions[0]  # doctest: +ELLIPSIS
    (Action(stage=0, kind=<ActionKind.FORWARD_INPUT_ONLY: 'f'>, microbatch=0), ...)
    >>> " ".join(map(str, build_schedule("interleaved-1f1b", 2, 2, vpp=2).actions[1]))
    '1F0 1F1 3F0 3F1 3B0 3B1 1B0 1B1'
    """
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    for label, value in (("pp", pp), ("num_microbatches", num_microbatches), ("vpp", vpp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{label} must be a positive integer, got {value!r}")
    if name == "interleaved-1f1b":
        if vpp < 2:
            raise ConfigError(
                f"interleaved-1f1b needs vpp >= 2 virtual stages per rank, got vpp={vpp}; "
                f"use schedule '1f1b' for one stage per rank"
            )
        if num_microbatches % pp:
            raise ConfigError(
                f"interleaved-1f1b needs the number of microbatches ({num_microbatches}) to be "
                f"a multiple of pp ({pp}), as in Megatron-LM; use "
                f"{(num_microbatches // pp + 1) * pp} or {max(pp, num_microbatches // pp * pp)}"
            )
    elif vpp != 1:
        raise ConfigError(
            f"vpp={vpp} needs schedule 'interleaved-1f1b', not {name!r}; set vpp=1"
        )
    if name == "chimera":
        check_chimera(pp, num_microbatches)
    num_stages = pp * vpp
    if name == "scp":
        stages_on = _scp_selection(recompute, num_stages)
        ranks = [_scp_rank(r, pp, num_microbatches, stages_on[r]) for r in range(pp)]
        return Schedule(name, pp, vpp, num_microbatches, tuple(ranks))
    per_stage = _recompute_selection(recompute, num_stages, name)
    if name == "chimera":
        return Schedule(name, pp, vpp, num_microbatches, tuple(
            _lower(ops, lambda s, j: per_stage[s], right_before_b=True)
            for ops in _chimera(pp, num_microbatches)), pipelines=2)
    generator = _GENERATORS[name]
    ranks = []
    for r in range(pp):
        ops = generator(r, pp, num_microbatches, vpp)
        ranks.append(_lower(ops, lambda s, j: per_stage[s], right_before_b=True))
    return Schedule(name, pp, vpp, num_microbatches, tuple(ranks))


def warmup_in_flight(name: str, pp: int, num_microbatches: int, vpp: int = 1
                     ) -> tuple[int, ...]:
    """Microbatches each virtual stage holds at its rank's peak under schedule ``name``,
    from the generators' warm-up depths: 1F1B-like ``min(p - s, m)``, GPipe ``m``.
    Interleaved: rank r peaks when the first forward of its steady state starts, after
    ``2 (p - 1 - r) + (v - 1) p`` warm-up forwards (all ``m v`` when ``m == p``); the
    generator hands forwards to its virtual stages ``p`` at a time, chunk 0 first, so
    at that moment chunk j holds ``g p + min(p, max(0, f - j p))`` of the ``F = g p v + f``
    forwards. Their sum is the rank's peak the simulator measures; the rank's last chunk
    (the one holding the head on the last rank) holds fewer, since its backwards start
    first. An estimate made before any schedule is built (the planner's memory budget);
    the simulator measures the real peaks.

    >>> warmup_in_flight("1f1b", 4, 3), warmup_in_flight("gpipe", 2, 4)
    ((3, 3, 2, 1), (4, 4))
    >>> warmup_in_flight("interleaved-1f1b", 2, 4, vpp=2)
    (3, 2, 2, 1)

    Under ``chimera`` both replicas of stage s hold ``min(p - s, m / 2)``; rank r holds
    stages r and p - 1 - r, so it keeps the sum of the two.
    """
    p, m, v = pp, num_microbatches, vpp
    if name == "gpipe":
        return (m,) * p
    if name == "chimera":  # each replica of stage s: 1F1B over m / 2 microbatches
        return tuple(min(p - s, m // 2) for s in range(p))
    if name == "interleaved-1f1b":
        total = m * v
        out = [0] * (p * v)
        for r in range(p):
            forwards = total if m == p else min(2 * (p - 1 - r) + (v - 1) * p + 1, total)
            rounds, rest = divmod(forwards, p * v)
            for j in range(v):
                out[j * p + r] = rounds * p + min(p, max(0, rest - j * p))
        return tuple(out)
    return tuple(min(p - s, m) for s in range(p))


def _recompute_selection(recompute: object, num_stages: int, name: str) -> list[bool]:
    if recompute is None or recompute == "none":
        return [False] * num_stages
    if recompute == "full":
        return [True] * num_stages
    if isinstance(recompute, str):
        if recompute == "stage-aware":
            raise ConfigError(
                f"recompute='stage-aware' is the rule of schedule 'scp'; for {name!r} pass "
                f"'none', 'full' or one boolean per virtual stage ({num_stages} values) saying "
                f"which stages recompute"
            )
        raise ConfigError(
            f"unknown recompute {recompute!r}; use 'none', 'full' or one boolean per stage"
        )
    flags = list(recompute)  # type: ignore[call-overload]
    if len(flags) != num_stages or not all(isinstance(x, bool) for x in flags):
        raise ConfigError(
            f"per-stage recompute must be {num_stages} booleans (one per virtual stage, "
            f"pp * vpp), got {recompute!r}"
        )
    return flags


def _lower(ops: Sequence[_Op], recomputed: Callable[[int, int], bool], *,
           right_before_b: bool) -> tuple[Action, ...]:
    """Turn (kind, stage, mb) ops into actions; a recomputed forward becomes ``f`` and an
    ``R`` is inserted right before its ``B``."""
    new = partial(tuple.__new__, Action)  # Action(...) without the Python-level __new__
    out = []
    for kind, stage, mb in ops:
        if kind == "F":
            out.append(new((stage, _f if recomputed(stage, mb) else _F, mb)))
        elif kind == "B":
            if right_before_b and recomputed(stage, mb):
                out.append(new((stage, _R, mb)))
            out.append(new((stage, _B, mb)))
        else:
            out.append(new((stage, _W, mb)))
    return tuple(out)


# ---- gpipe, 1f1b, zb-h1 ------------------------------------------------------------------


def _gpipe(rank: int, pp: int, m: int, vpp: int) -> list[_Op]:
    return [("F", rank, j) for j in range(m)] + [("B", rank, j) for j in range(m)]


def _one_f_one_b(rank: int, pp: int, m: int, vpp: int = 1, warmup: int | None = None) -> list[_Op]:
    """Warm-up forwards, then forward/backward pairs, then the remaining backwards."""
    w = min(pp - 1 - rank, m) if warmup is None else warmup
    ops: list[_Op] = [("F", rank, j) for j in range(w)]
    for i in range(m - w):
        ops += [("F", rank, w + i), ("B", rank, i)]
    ops += [("B", rank, j) for j in range(m - w, m)]
    return ops


def _zb_h1(rank: int, pp: int, m: int, vpp: int) -> list[_Op]:
    """1F1B with B/W split; the W of backward i follows backward i + rank (ZB1P)."""
    ops: list[_Op] = []
    done_b = 0
    for op in _one_f_one_b(rank, pp, m):
        ops.append(op)
        if op[0] == "B":
            if done_b >= rank:
                ops.append(("W", rank, done_b - rank))
            done_b += 1
    ops += [("W", rank, j) for j in range(max(0, m - rank), m)]
    return ops


# ---- interleaved 1f1b (Megatron-LM) ------------------------------------------------------


def _interleaved(rank: int, pp: int, m: int, vpp: int) -> list[_Op]:
    total = m * vpp
    group = pp * vpp

    def op(kind: str, k: int) -> _Op:
        chunk = (k % group) // pp
        if kind == "B":
            chunk = vpp - 1 - chunk
        return (kind, chunk * pp + rank, (k // group) * pp + k % pp)

    if m == pp:
        warmup = total
    else:
        warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    ops = [op("F", k) for k in range(warmup)]
    for i in range(total - warmup):
        ops += [op("F", warmup + i), op("B", i)]
    ops += [op("B", k) for k in range(total - warmup, total)]
    return ops


_GENERATORS: dict[str, Callable[[int, int, int, int], list[_Op]]] = {
    "gpipe": _gpipe,
    "1f1b": _one_f_one_b,
    "interleaved-1f1b": _interleaved,
    "zb-h1": _zb_h1,
}


# ---- chimera: two pipelines in opposite directions ----------------------------------------


def check_chimera(pp: int, num_microbatches: int) -> None:
    """Raise ConfigError unless Chimera can run pp stages and this many microbatches.

    >>> check_chimera(3, 4)
    Traceback (most recent call last):
    ...
    tripar.errors.ConfigError: schedule 'chimera' needs an even pp (got pp=3): rank r holds stage r of the down pipeline and stage pp-1-r of the up pipeline; use pp=2 or pp=4
    """
    if pp % 2:
        raise ConfigError(
            f"schedule 'chimera' needs an even pp (got pp={pp}): rank r holds stage r of the "
            f"down pipeline and stage pp-1-r of the up pipeline; use "
            + (f"pp={pp - 1} or " if pp > 1 else "") + f"pp={pp + 1}")
    if num_microbatches % 2:
        raise ConfigError(
            f"schedule 'chimera' needs an even number of microbatches (got "
            f"{num_microbatches}): each of its two pipelines takes half; use "
            + (f"{num_microbatches - 1} or " if num_microbatches > 1 else "")
            + f"{num_microbatches + 1}")


def _chimera(pp: int, m: int) -> list[list[_Op]]:
    """Chimera's per-rank orders: two 1F1B pipelines merged in time.

    The down pipeline runs microbatches 0 .. m/2 - 1 with stage s on rank s, the up
    pipeline m/2 .. m - 1 with stage s on rank pp - 1 - s. Each is laid out in time as
    1F1B (forward and backward one slot each, as the paper counts); every rank then runs
    its actions of both in order of their slot, and of two actions in one slot the one of
    the later stage first (it is further along its critical path). With uniform stages
    and F = B this gives the paper's bubble, (pp - 2) / (2 m + pp - 2) of the step
    against 1F1B's (pp - 1) / (m + pp - 1).
    """
    half = m // 2
    merged: list[list[tuple[int, int, _Op]]] = [[] for _ in range(pp)]
    for up, first in ((False, 0), (True, half)):
        for slot, op in _timetable(pp, half):
            kind, stage, j = op
            rank = pp - 1 - stage if up else stage
            merged[rank].append((slot, -stage, (kind, stage, first + j)))
    return [[op for _, _, op in sorted(ops)] for ops in merged]


def _timetable(pp: int, m: int) -> list[tuple[int, _Op]]:
    """(start slot, op) of every action of one 1F1B pipeline, each action one slot long,
    starting once its rank is free and what it receives is there."""
    orders = [_one_f_one_b(s, pp, m) for s in range(pp)]
    ends: dict[_Op, int] = {}
    free, ptr, out = [0] * pp, [0] * pp, []
    moved = True
    while moved:
        moved = False
        for s in range(pp):
            while ptr[s] < len(orders[s]):
                kind, _, j = op = orders[s][ptr[s]]
                dep = (("F", s - 1, j) if kind == "F" and s > 0
                       else ("B", s + 1, j) if kind == "B" and s < pp - 1 else None)
                if dep is not None and dep not in ends:
                    break
                start = max(free[s], ends[dep] if dep else 0)
                ends[op] = free[s] = start + 1
                out.append((start, op))
                ptr[s] += 1
                moved = True
    return out


# ---- scp: Merak's shifted critical path --------------------------------------------------


def _scp_selection(recompute: object, num_stages: int) -> list[str]:
    """Per stage: "rule" (Merak's selection), "full" or "none"."""
    if recompute is None or recompute == "stage-aware":
        return ["rule"] * num_stages
    if recompute == "full":
        return ["full"] * num_stages
    if recompute == "none":
        raise ConfigError(
            "schedule 'scp' is 1F1B with stage-aware recomputation; without recomputation it "
            "is plain 1F1B: use schedule '1f1b', or recompute='stage-aware' or 'full'"
        )
    if isinstance(recompute, str):
        raise ConfigError(f"unknown recompute {recompute!r} for scp; use 'stage-aware', 'full' "
                          f"or one boolean per stage")
    flags = list(recompute)  # type: ignore[call-overload]
    if len(flags) != num_stages or not all(isinstance(x, bool) for x in flags):
        raise ConfigError(f"per-stage recompute for scp must be {num_stages} booleans, "
                          f"got {recompute!r}")
    return ["rule" if x else "none" for x in flags]


def scp_recomputed(stage: int, num_stages: int, num_microbatches: int) -> frozenset[int]:
    """Microbatches that stage ``stage`` runs as ``f`` + ``R`` under Merak's rule.

    With d = num_stages - 1 - stage (hops to the last stage) and M microbatches:
    d = 0: none; d = 1: the first two; d = 2: the first one and the last two;
    d >= 3: the last d (those whose backward falls in the cool-down).

    >>> [sorted(scp_recomputed(k, 4, 6)) for k in range(4)]
    [[3, 4, 5], [0, 4, 5], [0, 1], []]
    """
    d = num_stages - 1 - stage
    m = num_microbatches
    early = {0: 0, 1: 2, 2: 1}.get(d, 0)
    chosen = set(range(min(early, m)))
    if d >= 2:
        chosen |= set(range(max(0, m - d), m))
    return frozenset(chosen)


def _scp_rank(rank: int, pp: int, m: int, mode: str) -> tuple[Action, ...]:
    """Merak's shifted critical path (S = pp stages, M = m microbatches) on one rank.

    The skeleton is 1F1B. Stage k, d = S - 1 - k hops from the last stage, then:

    - d = 0 (last stage): its forward is followed at once by its backward, so it never
      recomputes; plain 1F1B.
    - d = 1: the forward that 1F1B runs right after B0 is shifted before B0, into the
      bubble where the stage waits for the first gradient; microbatches 0 and 1 run as
      ``f``: R0 fills the rest of that bubble and R1 takes the slot the shifted forward left.
    - d = 2: microbatch 0 runs as ``f``; R0 runs in the bubble before B0.
    - d >= 2: the last d microbatches, whose backwards fall in the cool-down (where 1F1B
      idles one forward's time before each backward), run as ``f`` with R right before B.

    Every R sits right before its B; with F = R and B = 2F, every R listed above lands in
    time the rank would otherwise idle, so the step is no longer than 1F1B's without
    recomputation. This is the rule Merak's code implements (``FullCriticalPathTrainSchedule``);
    for S = 4, M = 6 it gives REFERENCE.md's orders. ``mode="full"`` recomputes every
    microbatch on every stage but the last (keeping the d = 1 shift); ``"none"`` is 1F1B.
    """
    d = pp - 1 - rank
    if mode == "none" or d == 0:
        return _lower(_one_f_one_b(rank, pp, m), lambda s, j: False, right_before_b=True)
    ops = _one_f_one_b(rank, pp, m)
    if d == 1:
        b0 = ops.index(("B", rank, 0))
        if b0 + 1 < len(ops) and ops[b0 + 1][0] == "F":
            ops[b0], ops[b0 + 1] = ops[b0 + 1], ops[b0]
    chosen = scp_recomputed(rank, pp, m) if mode == "rule" else frozenset(range(m))
    return _lower(ops, lambda s, j: j in chosen, right_before_b=True)
