"""Pipeline schedules as data: actions, per-rank action lists, text form, validation.

A schedule says, for every pipeline rank, the order in which it runs the
computations of its (virtual) stages on each microbatch. It is plain data: the
planner embeds it in the Plan, the simulator plays it forward in time, the
runtime executes it.

Actions
-------
An action is one computation of one virtual stage on one microbatch, written
``<stage><kind><microbatch>`` (``2F3``: stage 2 runs the forward of microbatch
3), as ``torch.distributed.pipelining``'s ``_Action`` does. The kinds:

======  ====================================================================
``F``   forward, keeping the activations the backward needs
``f``   forward keeping only the stage input (activations are recomputed)
``R``   recompute: re-run the forward from the kept input, keeping activations
``B``   backward: the gradient w.r.t. the stage input; for a stage that has
        no ``W`` actions, B is the whole backward (input and weight grads)
``W``   the gradient w.r.t. the weights (zero-bubble schedules split it off)
======  ====================================================================

When every rank holds one stage (``vpp == 1``) the stage is implied by the
rank, and the schedule text writes the short form (``F3``); ``Action.parse``
reads either form.

Communication is implied by stage adjacency, not written as actions: the end of
``F``/``f`` of stage s sends that microbatch's output to stage s + 1, the end of
``B`` of stage s sends the input gradient to stage s - 1. Sends are
asynchronous (buffered); a receive blocks only the action that consumes it:
``F``/``f`` of stage s > 0 waits for stage s - 1's forward of the same
microbatch, ``B`` of stage s < last waits for stage s + 1's ``B``. ``R`` and
``W`` need nothing from other ranks. Virtual stage s lives on rank
``s % pp``, so rank r holds stages r, r + pp, r + 2 pp, ...

Text form of a schedule::

    schedule 1f1b pp=2 vpp=1 microbatches=2
    rank 0: F0 F1 B0 B1
    rank 1: F0 B0 F1 B1

Bidirectional pipelines (Chimera, ``pipelines=2``): two replicas of the pp stages run
in opposite directions over the same ranks. The first half of the microbatches take
the down pipeline (stage s on rank s), the second half the up pipeline (stage s on
rank pp - 1 - s), so rank r holds stages r and pp - 1 - r, and the rank of an action
follows from its stage and microbatch (``rank_of``). Stage numbers are the model's,
so adjacency, the order checks and the deadlock check are unchanged; the text form
writes short actions (the microbatch says which of the rank's two stages runs)::

    schedule chimera pp=2 vpp=1 microbatches=2 pipelines=2
    rank 0: F0 F1 B1 B0
    rank 1: F1 F0 B0 B1
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from tripar.errors import PlanError

__all__ = ["PIPELINE_MARKS", "Action", "ActionKind", "Schedule", "format_grid"]

PIPELINE_MARKS = ("v", "^")
"""How a grid marks the pipeline of an action under two pipelines (``Schedule.pipeline_of``):
``v`` the down pipeline (stage s on rank s), ``^`` the up one (stage s on rank pp - 1 - s)."""


class ActionKind(str, enum.Enum):
    """What an action computes; the value is its one-letter text form."""

    FORWARD = "F"
    FORWARD_INPUT_ONLY = "f"
    RECOMPUTE = "R"
    BACKWARD = "B"
    WEIGHT = "W"

    def __str__(self) -> str:
        return self.value


_KINDS = {k.value: k for k in ActionKind}
_ACTION_RE = re.compile(r"([0-9]+)?([FfRBW])([0-9]+)")
_MAX_DIGITS = 9
"""Longest number a schedule's text may hold (a billion stages is already absurd)."""


def _int(text: str, what: str) -> int:
    """A decimal number of the schedule text; PlanError when it is absurdly long."""
    if len(text) > _MAX_DIGITS:
        raise PlanError(f"{what} {text[:20]}{'...' if len(text) > 20 else ''} has "
                        f"{len(text)} digits; a schedule's numbers have at most {_MAX_DIGITS}")
    return int(text)


class Action(NamedTuple):
    """One computation of one virtual stage on one microbatch.

    A NamedTuple (immutable, cheap to build by the hundred thousand), as
    ``torch.distributed.pipelining``'s ``_Action`` is.

    >>> a = Action.parse("1F3")
    >>> a.stage, a.kind, a.microbatch
    (1, <ActionKind.FORWARD: 'F'>, 3)
    >>> str(a), a.short()
    ('1F3', 'F3')
    >>> Action.parse("B2", stage=0)
    Action(stage=0, kind=<ActionKind.BACKWARD: 'B'>, microbatch=2)
    """

    stage: int
    """Virtual stage index (0 .. pp * vpp - 1)."""
    kind: ActionKind
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    def short(self) -> str:
        """The text form without the stage (when the rank implies it)."""
        return f"{self.kind.value}{self.microbatch}"

    @staticmethod
    def parse(text: str, *, stage: int | None = None) -> Action:
        """Read ``2F3``, or ``F3`` when ``stage`` is given; raise PlanError otherwise."""
        if not isinstance(text, str):
            raise PlanError(f"an action is text such as 'F3' or '1B0', got {text!r}")
        m = _ACTION_RE.fullmatch(text.strip())
        if m is None:
            raise PlanError(
                f"cannot parse action {text!r}: write [stage]KIND MICROBATCH with KIND one of "
                f"F f R B W, e.g. 'F3' or '1B0'"
            )
        stage_text, kind, mb = m.groups()
        if stage_text is None:
            if stage is None:
                raise PlanError(
                    f"action {text!r} names no stage; with several stages per rank write it "
                    f"as <stage>{text}, e.g. '0{text}'"
                )
            return Action(stage, _KINDS[kind], _int(mb, "microbatch"))
        return Action(_int(stage_text, "stage"), _KINDS[kind], _int(mb, "microbatch"))


def format_grid(
    columns: Sequence[Sequence[object]],
    *,
    error_step: int | None = None,
    error_rank: int | None = None,
    window: int = 8,
) -> str:
    """A steps x ranks grid of actions; the row ``error_step`` is marked ``<-- ERROR HERE``.

    ``columns[r]`` is what rank r does at each step (None or "" for nothing).
    Long schedules show only ``window`` rows either side of the error step.

    >>> print(format_grid([["F0", "B0"], ["", "F0"]], error_step=1), end="")
            Rank 0 Rank 1
    Step 0: F0
    Step 1: B0     F0 <-- ERROR HERE
    """
    num_steps = max((len(c) for c in columns), default=0)
    cells = [[("" if a is None else str(a)) for a in c] + [""] * (num_steps - len(c))
             for c in columns]
    first, last = 0, num_steps
    if error_step is not None and num_steps > 2 * window + 1:
        first, last = max(0, error_step - window), min(num_steps, error_step + window + 1)
    ranks = list(range(len(columns)))
    if len(ranks) > 16 and error_rank is not None:
        ranks = [r for r in ranks if abs(r - error_rank) <= 6]
    width = len(str(max(num_steps - 1, 0)))
    col_w = {r: max([len(f"Rank {r}")] + [len(x) for x in cells[r][first:last]]) for r in ranks}
    lines = [" " * (width + 7) + " ".join(f"{'Rank ' + str(r):<{col_w[r]}}" for r in ranks)]
    if first > 0:
        lines.append(f"... ({first} earlier steps)")
    for step in range(first, last):
        row = " ".join(f"{cells[r][step]:<{col_w[r]}}" for r in ranks)
        mark = " <-- ERROR HERE" if step == error_step else ""
        lines.append(f"Step {step:0{width}d}: {row}".rstrip() + mark)
    if last < num_steps:
        lines.append(f"... ({num_steps - last} later steps)")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Schedule:
    """Every pipeline rank's ordered actions for one training step.

    ``actions[r]`` is rank r's list; rank r holds virtual stages r, r + pp, ...

    >>> s = Schedule.from_text('''
    ... schedule 1f1b pp=2 vpp=1 microbatches=2
    ... rank 0: F0 F1 B0 B1
    ... rank 1: F0 B0 F1 B1
    ... ''')
    >>> s.validate()
    >>> Schedule.from_text(s.to_text()) == s and Schedule.from_dict(s.to_dict()) == s
    True
    >>> s.actions[1][1]
    Action(stage=1, kind=<ActionKind.BACKWARD: 'B'>, microbatch=0)
    """

    name: str
    """The generator that made it (one of ``tripar.plan.config.SCHEDULES``) or a user's label."""
    pp: int
    """Pipeline ranks."""
    vpp: int
    """Virtual stages per rank; stage s runs on rank s % pp."""
    num_microbatches: int
    actions: tuple[tuple[Action, ...], ...]
    """Per rank, in execution order."""
    pipelines: int = 1
    """1: one pipeline (stage s on rank s % pp); 2: Chimera's two pipelines in opposite
    directions (even pp and microbatches, vpp 1; see ``rank_of``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[\w.+-]+", self.name):
            raise PlanError(f"schedule name {self.name!r} must be one word (letters, digits, -_.+)")
        for field in ("pp", "vpp", "num_microbatches"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise PlanError(f"Schedule.{field} must be a positive integer, got {value!r}")
        if not isinstance(self.actions, tuple) or not all(
                isinstance(acts, tuple) for acts in self.actions):
            raise PlanError(f"Schedule.actions must be a tuple of per-rank tuples of Actions, "
                            f"got {type(self.actions).__name__}")
        if len(self.actions) != self.pp:
            raise PlanError(
                f"schedule {self.name!r} has action lists for {len(self.actions)} ranks but "
                f"pp={self.pp}; give one list per pipeline rank"
            )
        _check_pipelines(self)
        num_stages = self.num_stages
        for rank, rank_actions in enumerate(self.actions):
            for step, a in enumerate(rank_actions):
                if not isinstance(a, Action) or type(a.kind) is not ActionKind \
                        or type(a.stage) is not int or type(a.microbatch) is not int:
                    raise PlanError(f"rank {rank} step {step}: {a!r} is not an Action of "
                                    f"(int stage, ActionKind, int microbatch)")
                if not 0 <= a.microbatch < self.num_microbatches:
                    raise PlanError(
                        f"rank {rank} step {step}: action {a} names microbatch {a.microbatch}, "
                        f"but the schedule has {self.num_microbatches} (0..{self.num_microbatches - 1})"
                    )
                if not 0 <= a.stage < num_stages or self.rank_of(a.stage, a.microbatch) != rank:
                    where = (f" for microbatch {a.microbatch} (the "
                             f"{'down' if self.pipeline_of(a.microbatch) == 0 else 'up'} "
                             f"pipeline)" if self.pipelines == 2 else "")
                    raise PlanError(
                        f"rank {rank} step {step}: action {a} names stage {a.stage}, but rank "
                        f"{rank} holds stages {self._held(rank, a.microbatch)}{where} "
                        f"(pp={self.pp}, vpp={self.vpp})"
                    )

    @property
    def num_stages(self) -> int:
        """Virtual stages in all: pp * vpp."""
        return self.pp * self.vpp

    def pipeline_of(self, microbatch: int) -> int:
        """0 (down) or, under two pipelines, 1 (up) for the second half of the microbatches."""
        return int(self.pipelines == 2 and 2 * microbatch >= self.num_microbatches)

    def cell(self, a: Action) -> str:
        """``a`` as a grid cell: its text token and, under two pipelines, the mark of its
        pipeline (``PIPELINE_MARKS``: ``v`` down, ``^`` up).

        >>> s = Schedule("chimera", 2, 1, 2, ((),) * 2, pipelines=2)
        >>> s.cell(Action(0, ActionKind.FORWARD, 0)), s.cell(Action(1, ActionKind.FORWARD, 1))
        ('F0v', 'F1^')
        """
        token = self._token(a)
        if self.pipelines == 2:
            token += PIPELINE_MARKS[self.pipeline_of(a.microbatch)]
        return token

    def rank_of(self, stage: int, microbatch: int = 0) -> int:
        """The rank that runs virtual stage ``stage`` on ``microbatch``: ``stage % pp``; on
        the up pipeline of two, ``pp - 1 - stage``.

        >>> s = Schedule("chimera", 4, 1, 4, ((),) * 4, pipelines=2)
        >>> [s.rank_of(0, j) for j in range(4)], s.stages_of(1)
        ([0, 0, 3, 3], (1, 2))
        """
        if self.pipeline_of(microbatch):
            return self.pp - 1 - stage
        return stage % self.pp

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages ``rank`` holds, ascending: r, r + pp, ...; with two pipelines r and
        pp - 1 - r."""
        if self.pipelines == 2:
            return tuple(sorted({rank, self.pp - 1 - rank}))
        return tuple(range(rank, self.num_stages, self.pp))

    def _held(self, rank: int, microbatch: int) -> list[int]:
        if self.pipelines == 2:
            return [rank if self.pipeline_of(microbatch) == 0 else self.pp - 1 - rank]
        return list(self.stages_of(rank))

    # ---- text and plain data -------------------------------------------------------------

    def _token(self, a: Action) -> str:
        return a.short() if self.vpp == 1 else str(a)

    def to_text(self) -> str:
        """The text form (header line, then one line per rank); ``from_text`` reads it back."""
        lines = [f"schedule {self.name} pp={self.pp} vpp={self.vpp} "
                 f"microbatches={self.num_microbatches}"
                 + (f" pipelines={self.pipelines}" if self.pipelines != 1 else "")]
        for rank, rank_actions in enumerate(self.actions):
            lines.append(f"rank {rank}: " + " ".join(self._token(a) for a in rank_actions))
        return "\n".join(line.rstrip() for line in lines) + "\n"

    @staticmethod
    def from_text(text: str) -> Schedule:
        """Parse ``to_text``'s form; blank lines and ``#`` comments are ignored."""
        if not isinstance(text, str):
            raise PlanError(f"schedule text must be a str, got {type(text).__name__}")
        lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln]
        if not lines:
            raise PlanError("empty schedule text: expected 'schedule NAME pp=P vpp=V microbatches=M'")
        head = re.fullmatch(r"schedule\s+(\S+)\s+pp=([0-9]+)\s+vpp=([0-9]+)\s+"
                            r"microbatches=([0-9]+)(?:\s+pipelines=([0-9]+))?", lines[0])
        if head is None:
            raise PlanError(
                f"bad schedule header {lines[0]!r}: expected "
                f"'schedule NAME pp=P vpp=V microbatches=M [pipelines=2]'"
            )
        name = head.group(1)
        pp, vpp, m = (_int(head.group(i), k) for i, k in ((2, "pp"), (3, "vpp"),
                                                          (4, "microbatches")))
        pipelines = _int(head.group(5), "pipelines") if head.group(5) else 1
        if len(lines) - 1 != pp:
            raise PlanError(f"schedule header says pp={pp} but {len(lines) - 1} rank lines follow")
        ranks: list[tuple[Action, ...]] = []
        for rank, line in enumerate(lines[1:]):
            body = re.fullmatch(r"rank\s+([0-9]+)\s*:(.*)", line)
            if body is None or _int(body.group(1), "rank") != rank:
                raise PlanError(f"expected a line 'rank {rank}: ACTIONS...', got {line!r}")
            ranks.append(_parse_actions(body.group(2).split(), rank, pp, vpp, m, pipelines))
        return Schedule(name, pp, vpp, m, tuple(ranks), pipelines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able plain data: actions as text tokens per rank."""
        return {
            "name": self.name,
            "pp": self.pp,
            "vpp": self.vpp,
            "num_microbatches": self.num_microbatches,
            "actions": [[self._token(a) for a in acts] for acts in self.actions],
            **({"pipelines": self.pipelines} if self.pipelines != 1 else {}),
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Schedule:
        """Inverse of ``to_dict``; PlanError names a missing or mistyped field."""
        if not isinstance(data, dict):
            raise PlanError(f"schedule data must be an object, got {type(data).__name__}")
        for key, kinds, words in (("name", str, "a string"), ("pp", int, "an integer"),
                                  ("vpp", int, "an integer"),
                                  ("num_microbatches", int, "an integer"),
                                  ("actions", (list, tuple), "a list of lists")):
            if key not in data:
                raise PlanError(f"schedule data is missing or has a malformed field: it lacks "
                                f"{key!r}")
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise PlanError(f"schedule data is missing or has a malformed field: {key!r} "
                                f"must be {words}, got {repr(value)[:60]}")
        pp, vpp, m = data["pp"], data["vpp"], data["num_microbatches"]
        ranks, name = data["actions"], data["name"]
        pipelines = data.get("pipelines", 1)
        if isinstance(pipelines, bool) or not isinstance(pipelines, int):
            raise PlanError(f"schedule data's 'pipelines' must be 1 or 2, got {pipelines!r}")
        if len(ranks) != pp or not all(isinstance(t, (list, tuple)) for t in ranks):
            raise PlanError(f"schedule data has pp={pp} but its 'actions' is not {pp} lists")
        return Schedule(name, pp, vpp, m, tuple(
            _parse_actions(tokens, rank, pp, vpp, m, pipelines)
            for rank, tokens in enumerate(ranks)), pipelines)

    def format_grid(self, error_step: int | None = None, error_rank: int | None = None) -> str:
        """This schedule as a steps x ranks grid (step = position in the rank's list)."""
        return format_grid([[self._token(a) for a in acts] for acts in self.actions],
                           error_step=error_step, error_rank=error_rank)

    # ---- validation ----------------------------------------------------------------------

    def validate(self) -> None:
        """Raise PlanError unless the schedule is complete, well ordered and deadlock-free.

        Checks, per stage and microbatch: exactly one forward (``F``, or ``f`` and later one
        ``R``), exactly one ``B`` after it, and, on a stage that splits its backward, one ``W``
        after the ``B``; every send implied by adjacency has its receiver (stage s + 1 runs the
        forward, stage s - 1 the backward); and, playing all ranks in order without costs,
        that no rank waits forever.
        """
        _check_orders(self)
        _check_deadlock(self)


def _parse_actions(tokens: Sequence[str], rank: int, pp: int, vpp: int, m: int,
                   pipelines: int = 1) -> tuple[Action, ...]:
    implied = rank if vpp == 1 else None
    out = []
    for tok in tokens:
        if not isinstance(tok, str):
            raise PlanError(f"rank {rank}: action {tok!r} is not text")
        a = Action.parse(tok, stage=implied)
        short = not tok.strip()[:1].isdigit()
        if pipelines == 2 and short and 2 * a.microbatch >= m:
            a = a._replace(stage=pp - 1 - rank)  # the up pipeline: rank r holds stage pp-1-r
        out.append(a)
    return tuple(out)


def _check_pipelines(s: Schedule) -> None:
    """Two pipelines need even pp and microbatches and one stage per rank per direction."""
    if s.pipelines == 1:
        return
    if s.pipelines != 2:
        raise PlanError(f"schedule {s.name!r} has pipelines={s.pipelines!r}; a schedule runs "
                        f"one pipeline, or two in opposite directions (Chimera): use 1 or 2")
    if s.pp % 2 or s.num_microbatches % 2 or s.vpp != 1:
        raise PlanError(
            f"schedule {s.name!r} runs two pipelines in opposite directions, which needs an "
            f"even pp (got {s.pp}), an even number of microbatches (got {s.num_microbatches}) "
            f"and vpp=1 (got {s.vpp}): rank r holds stage r of one and stage pp-1-r of the "
            f"other, and each takes half the microbatches")


_FWD, _FWD_INPUT, _RECOMP, _BWD, _WGT = 1, 2, 4, 8, 16
_BIT = {ActionKind.FORWARD: _FWD, ActionKind.FORWARD_INPUT_ONLY: _FWD_INPUT,
        ActionKind.RECOMPUTE: _RECOMP, ActionKind.BACKWARD: _BWD, ActionKind.WEIGHT: _WGT}


def _order_error(s: Schedule, rank: int, step: int, why: str) -> PlanError:
    a = s.actions[rank][step]
    return PlanError(f"schedule {s.name!r}: rank {rank} step {step} ({a}: stage {a.stage}, "
                     f"microbatch {a.microbatch}): {why}\n"
                     + s.format_grid(error_step=step, error_rank=rank))


def _check_orders(s: Schedule) -> None:
    """Per-rank order of each (stage, microbatch), then completeness (implied sends matched)."""
    m = s.num_microbatches
    state: dict[int, int] = {}
    for rank, acts in enumerate(s.actions):
        for step, a in enumerate(acts):
            key = a.stage * m + a.microbatch
            st = state.get(key, 0)
            kind = a.kind
            if kind is ActionKind.FORWARD or kind is ActionKind.FORWARD_INPUT_ONLY:
                if st & (_FWD | _FWD_INPUT):
                    raise _order_error(s, rank, step, "a second forward of this microbatch")
            elif kind is ActionKind.RECOMPUTE:
                if not st & _FWD_INPUT:
                    raise _order_error(s, rank, step, "R needs an earlier f (forward keeping "
                                       "only the input) of the same microbatch on this stage")
                if st & (_RECOMP | _BWD):
                    raise _order_error(s, rank, step, "R after this microbatch's R or B")
            elif kind is ActionKind.BACKWARD:
                if st & _BWD:
                    raise _order_error(s, rank, step, "a second B of this microbatch")
                if not (st & _FWD or st & _RECOMP):
                    need = "its R (it was run as f)" if st & _FWD_INPUT else "its forward"
                    raise _order_error(s, rank, step, f"B runs before {need}")
            else:
                if st & _WGT:
                    raise _order_error(s, rank, step, "a second W of this microbatch")
                if not st & _BWD:
                    raise _order_error(s, rank, step, "W runs before this microbatch's B")
            state[key] = st | _BIT[kind]
    last = s.num_stages - 1
    for stage in range(s.num_stages):
        with_w = [j for j in range(m) if state.get(stage * m + j, 0) & _WGT]
        for j in range(m):
            rank = s.rank_of(stage, j)
            st = state.get(stage * m + j, 0)
            if not st & (_FWD | _FWD_INPUT):
                src = (f"stage {stage - 1} sends microbatch {j}'s activations to stage {stage}, "
                       f"but rank {rank} never receives them: " if stage > 0 else "")
                raise PlanError(f"schedule {s.name!r}: {src}stage {stage} has no forward "
                                f"(F or f) of microbatch {j}; add {stage}F{j} to rank {rank}")
            if st & _FWD_INPUT and not st & _RECOMP:
                raise PlanError(f"schedule {s.name!r}: stage {stage} runs f{j} but never R{j}; "
                                f"its backward would have no activations. Add {stage}R{j} "
                                f"before {stage}B{j} on rank {rank}")
            if not st & _BWD:
                src = (f"stage {stage + 1} sends microbatch {j}'s input gradient to stage "
                       f"{stage}, but rank {rank} never receives it: " if stage < last else "")
                raise PlanError(f"schedule {s.name!r}: {src}stage {stage} has no B{j}; add "
                                f"{stage}B{j} to rank {rank}")
        if with_w and len(with_w) != m:
            rank = s.rank_of(stage)
            missing = sorted(set(range(m)) - set(with_w))
            raise PlanError(f"schedule {s.name!r}: stage {stage} splits its backward (W for "
                            f"microbatches {with_w[:8]}) but has no W for {missing[:8]}; a stage "
                            f"runs W for every microbatch or for none")


def _check_deadlock(s: Schedule) -> None:
    """Play every rank in lock-step rounds, no costs: an action runs once what it receives
    was produced in an earlier round. No rank able to move while some are unfinished is a
    deadlock; the error shows the rounds as a grid."""
    m, last = s.num_microbatches, s.num_stages - 1
    fwd_done = bytearray(s.num_stages * m)
    bwd_done = bytearray(s.num_stages * m)
    ptr = [0] * s.pp
    ran_at: list[list[int]] = [[] for _ in range(s.pp)]
    active = [r for r in range(s.pp) if s.actions[r]]
    rnd = 0
    while active:
        moved = []
        for r in active:
            a = s.actions[r][ptr[r]]
            kind, st = a.kind, a.stage
            if kind is ActionKind.FORWARD or kind is ActionKind.FORWARD_INPUT_ONLY:
                ok = st == 0 or fwd_done[(st - 1) * m + a.microbatch]
            elif kind is ActionKind.BACKWARD:
                ok = st == last or bwd_done[(st + 1) * m + a.microbatch]
            else:
                ok = True
            if ok:
                moved.append(a)
                ran_at[r].append(rnd)
                ptr[r] += 1
        if not moved:
            raise _deadlock_error(s, ptr, ran_at, rnd)
        for a in moved:
            if a.kind is ActionKind.FORWARD or a.kind is ActionKind.FORWARD_INPUT_ONLY:
                fwd_done[a.stage * m + a.microbatch] = 1
            elif a.kind is ActionKind.BACKWARD:
                bwd_done[a.stage * m + a.microbatch] = 1
        active = [r for r in active if ptr[r] < len(s.actions[r])]
        rnd += 1


def _deadlock_error(s: Schedule, ptr: list[int], ran_at: list[list[int]], rnd: int) -> PlanError:
    columns: list[list[str]] = []
    waits = []
    for r, acts in enumerate(s.actions):
        col = [""] * (rnd + 1)
        for i, t in enumerate(ran_at[r]):
            col[t] = s._token(acts[i])
        if ptr[r] < len(acts):
            a = acts[ptr[r]]
            need = (Action(a.stage - 1, ActionKind.FORWARD, a.microbatch)
                    if a.kind is not ActionKind.BACKWARD
                    else Action(a.stage + 1, ActionKind.BACKWARD, a.microbatch))
            need_text = (f"stage {need.stage}'s forward of microbatch {a.microbatch}"
                         if a.kind is not ActionKind.BACKWARD
                         else f"stage {need.stage}'s B{a.microbatch}")
            col[rnd] = f"{s._token(a)}?"
            waits.append(f"rank {r} waits at {a} for {need_text}")
        columns.append(col)
    first = next(r for r in range(s.pp) if ptr[r] < len(s.actions[r]))
    shown = "; ".join(waits[:8]) + (f"; ... ({len(waits) - 8} more)" if len(waits) > 8 else "")
    return PlanError(
        f"schedule {s.name!r} deadlocks at round {rnd}: no rank can proceed ({shown}). "
        f"Reorder the actions so that each waited-for action comes earlier on its rank.\n"
        + format_grid(columns, error_step=rnd, error_rank=first)
    )
