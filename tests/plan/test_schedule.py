"""The schedule IR: actions, text and plain-data round trips, validation."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tripar.errors import PlanError
from tripar.plan.schedule import Action, ActionKind, Schedule, format_grid

KINDS = list(ActionKind)


def test_action_text_forms():
    a = Action(2, ActionKind.RECOMPUTE, 13)
    assert str(a) == "2R13"
    assert a.short() == "R13"
    assert Action.parse("2R13") == a
    assert Action.parse(" R13 ", stage=2) == a
    assert Action.parse("0f7").kind is ActionKind.FORWARD_INPUT_ONLY
    assert Action.parse("3W0", stage=9).stage == 3  # an explicit stage wins over the implied one


@pytest.mark.parametrize("text", ["", "F", "3", "X3", "F-1", "F3x", "1 F3", "FF3", "F3.0", "b3"])
def test_malformed_actions_raise(text):
    with pytest.raises(PlanError, match="cannot parse action"):
        Action.parse(text, stage=0)


def test_short_form_needs_a_stage():
    with pytest.raises(PlanError, match="names no stage"):
        Action.parse("F3")


@st.composite
def schedules(draw):
    pp = draw(st.integers(1, 4))
    vpp = draw(st.integers(1, 3))
    m = draw(st.integers(1, 6))
    ranks = []
    for r in range(pp):
        n = draw(st.integers(0, 8))
        ranks.append(tuple(
            Action(r + pp * draw(st.integers(0, vpp - 1)), draw(st.sampled_from(KINDS)),
                   draw(st.integers(0, m - 1)))
            for _ in range(n)))
    name = draw(st.sampled_from(["1f1b", "gpipe", "interleaved-1f1b", "zb-h1", "scp", "my.sched"]))
    return Schedule(name, pp, vpp, m, tuple(ranks))


@settings(max_examples=150, deadline=None)
@given(schedules())
def test_text_and_dict_round_trip(s):
    assert Schedule.from_text(s.to_text()) == s
    assert Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(KINDS), st.integers(0, 10**6), st.integers(0, 10**6))
def test_action_round_trip(kind, stage, mb):
    a = Action(stage, kind, mb)
    assert Action.parse(str(a)) == a
    assert Action.parse(a.short(), stage=stage) == a


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="schedulerank:=pvmicobt 0123456789FfRBWX#\n-", max_size=80))
def test_arbitrary_text_parses_or_raises_plan_error(text):
    try:
        s = Schedule.from_text(text)
    except PlanError:
        return
    assert Schedule.from_text(s.to_text()) == s


@pytest.mark.parametrize("text, match", [
    ("", "empty schedule"),
    ("schedule 1f1b pp=2 microbatches=2\nrank 0: F0\nrank 1: F0", "bad schedule header"),
    ("schedule 1f1b pp=2 vpp=1 microbatches=2\nrank 0: F0 B0", "pp=2 but 1 rank lines"),
    ("schedule 1f1b pp=1 vpp=1 microbatches=2\nrank 1: F0", "expected a line 'rank 0"),
    ("schedule 1f1b pp=1 vpp=1 microbatches=2\nrank 0: F0 Q1", "cannot parse action"),
    ("schedule 1f1b pp=1 vpp=1 microbatches=2\nrank 0: F2", "names microbatch 2"),
    ("schedule 1f1b pp=2 vpp=1 microbatches=2\nrank 0: 1F0\nrank 1: F0", "names stage 1"),
    ("schedule x pp=2 vpp=2 microbatches=1\nrank 0: F0\nrank 1: 1F0", "names no stage"),
    ("schedule 1f1b pp=0 vpp=1 microbatches=2", "pp must be a positive integer"),
])
def test_malformed_schedules_raise(text, match):
    with pytest.raises(PlanError, match=match):
        Schedule.from_text(text)


def test_from_dict_rejects_missing_fields():
    with pytest.raises(PlanError, match="malformed field"):
        Schedule.from_dict({"name": "x", "pp": 1})
    with pytest.raises(PlanError, match="not 2 lists"):
        Schedule.from_dict({"name": "x", "pp": 2, "vpp": 1, "num_microbatches": 1,
                            "actions": [["F0", "B0"]]})


def _sched(*rank_lines: str, m: int = 2, vpp: int = 1, name: str = "t") -> Schedule:
    body = "\n".join(f"rank {r}: {line}" for r, line in enumerate(rank_lines))
    return Schedule.from_text(
        f"schedule {name} pp={len(rank_lines)} vpp={vpp} microbatches={m}\n{body}")


def test_valid_schedules_pass():
    _sched("F0 F1 B0 B1", "F0 B0 F1 B1").validate()
    _sched("f0 F1 R0 B0 W0 B1 W1", "F0 B0 W0 F1 B1 W1").validate()
    _sched("0F0 0F1 2F0 2F1 2B0 2B1 0B0 0B1", "1F0 1F1 3F0 3F1 3B0 3B1 1B0 1B1", vpp=2).validate()


@pytest.mark.parametrize("lines, rank, step, why", [
    (("F0 B1 F1 B0", "F0 B0 F1 B1"), 0, 1, "B runs before its forward"),
    (("F0 F1 B0 B1", "F0 B0 F0 B1"), 1, 2, "second forward"),
    (("f0 F1 B0 B1", "F0 B0 F1 B1"), 0, 2, "B runs before its R"),
    (("F0 R0 F1 B0 B1", "F0 B0 F1 B1"), 0, 1, "R needs an earlier f"),
    (("F0 F1 W0 B0 B1", "F0 B0 F1 B1"), 0, 2, "W runs before"),
    (("F0 F1 B0 B1 B1", "F0 B0 F1 B1"), 0, 4, "second B"),
])
def test_order_errors_point_at_the_step(lines, rank, step, why):
    with pytest.raises(PlanError, match=why) as info:
        _sched(*lines).validate()
    msg = str(info.value)
    assert f"rank {rank} step {step}" in msg
    marked = [ln for ln in msg.splitlines() if ln.endswith("<-- ERROR HERE")]
    assert len(marked) == 1 and marked[0].startswith(f"Step {step}:")


@pytest.mark.parametrize("lines, why", [
    (("F0 F1 B0 B1", "F0 B0"), "stage 0 sends microbatch 1's activations to stage 1"),
    (("F0 F1 B0", "F0 B0 F1 B1"), "stage 1 sends microbatch 1's input gradient to stage 0"),
    (("f0 F1 B1", "F0 B0 F1 B1"), "runs f0 but never R0"),
    (("F0 F1 B0 W0 B1", "F0 B0 F1 B1"), "no W for \\[1\\]"),
])
def test_missing_actions_and_unmatched_sends(lines, why):
    with pytest.raises(PlanError, match=why):
        _sched(*lines).validate()


def test_deadlock_is_found_and_drawn():
    s = _sched("F0 B0 F1 B1", "F1 B1 F0 B0")
    with pytest.raises(PlanError, match="deadlocks at round 1") as info:
        s.validate()
    msg = str(info.value)
    assert "rank 0 waits at 0B0 for stage 1's B0" in msg
    assert "rank 1 waits at 1F1 for stage 0's forward of microbatch 1" in msg
    assert "Step 1: B0?    F1? <-- ERROR HERE" in msg


def test_interleaved_deadlock():
    # rank 0 wants stage 0's backward before it runs stage 2's forward, which rank 1's
    # stage 3 needs before it can start the backward chain
    s = _sched("0F0 0B0 2F0 2B0", "1F0 3F0 3B0 1B0", m=1, vpp=2)
    with pytest.raises(PlanError, match="deadlocks at round 2") as info:
        s.validate()
    assert "rank 1 waits at 3F0 for stage 2's forward of microbatch 0" in str(info.value)


def test_grid_windows_long_schedules():
    cols = [[f"F{i}" for i in range(100)], [f"B{i}" for i in range(100)]]
    text = format_grid(cols, error_step=50)
    assert "... (42 earlier steps)" in text and "... (41 later steps)" in text
    assert "Step 50: F50    B50 <-- ERROR HERE" in text
    assert len(text.splitlines()) == 1 + 1 + 17 + 1


def test_structure_errors():
    with pytest.raises(PlanError, match="action lists for 1 ranks but pp=2"):
        Schedule("x", 2, 1, 1, ((),))
    with pytest.raises(PlanError, match="one word"):
        Schedule("two words", 1, 1, 1, ((),))
    with pytest.raises(PlanError, match="is not an Action"):
        Schedule("x", 1, 1, 1, (("F0",),))


def test_actions_must_be_typed():
    with pytest.raises(PlanError, match="is not an Action"):
        Schedule("x", 1, 1, 1, ((Action(0, "F", 0),),))


CHIMERA_4x4 = """\
schedule chimera pp=4 vpp=1 microbatches=4 pipelines=2
rank 0: F0 F1 F2 B2 F3 B3 B0 B1
rank 1: F0 F2 F1 F3 B2 B0 B3 B1
rank 2: F2 F0 F3 F1 B0 B2 B1 B3
rank 3: F2 F3 F0 B0 F1 B1 B2 B3
"""


def test_two_pipelines_place_stages_by_microbatch():
    """Chimera's text form: short actions, the microbatch says the pipeline (down: the
    first half, stage s on rank s; up: stage s on rank pp - 1 - s)."""
    s = Schedule.from_text(CHIMERA_4x4)
    s.validate()
    assert s.to_text() == CHIMERA_4x4 and Schedule.from_dict(s.to_dict()) == s
    assert [(a.stage, a.microbatch) for a in s.actions[1][:3]] == [(1, 0), (2, 2), (1, 1)]
    assert s.stages_of(0) == (0, 3) and s.rank_of(3, 0) == 3 and s.rank_of(3, 2) == 0
    with pytest.raises(PlanError, match=r"rank 0 step 0: action 1F2 names stage 1, but rank 0 "
                                        r"holds stages \[3\] for microbatch 2 \(the up pipeline\)"):
        Schedule("chimera", 4, 1, 4, ((Action(1, ActionKind.FORWARD, 2),), (), (), ()),
                 pipelines=2)
    with pytest.raises(PlanError, match="needs an even pp .got 3., an even number of "
                                        "microbatches .got 4."):
        Schedule("chimera", 3, 1, 4, ((),) * 3, pipelines=2)
    with pytest.raises(PlanError, match="pipelines=3"):
        Schedule("chimera", 4, 1, 4, ((),) * 4, pipelines=3)


def test_two_pipelines_deadlock_is_found():
    # rank 0 runs the up pipeline's backward of stage 1 first; it waits for nothing, but
    # rank 1 waits at stage 1's forward of microbatch 0 for rank 0, which waits on rank 1
    s = Schedule.from_text("schedule chimera pp=2 vpp=1 microbatches=2 pipelines=2\n"
                           "rank 0: F1 B1 F0 B0\nrank 1: F0 B0 F1 B1\n")
    with pytest.raises(PlanError, match="deadlocks at round 0") as info:
        s.validate()
    assert "rank 0 waits at 1F1 for stage 0's forward of microbatch 1" in str(info.value)
