"""The JSON form of a plan: round trips, schema version, and errors that name the path."""

from __future__ import annotations

import json

import pytest
from example_plans import make_plan
from hypothesis import given, settings
from hypothesis import strategies as st

from tripar.errors import PlanError
from tripar.plan import (
    SCHEDULES,
    Alternative,
    Binding,
    ClusterInfo,
    Estimate,
    Inputs,
    ModelInfo,
    ParallelConfig,
    Plan,
    SolverRun,
    StagePlan,
    TPShard,
)
from tripar.plan.codec import SCHEMA_VERSION


def test_a_valid_plan_validates_and_round_trips():
    plan = make_plan()
    assert plan.validate() is plan
    assert Plan.from_json(plan.to_json()) == plan
    data = json.loads(plan.to_json())
    # the fields the CLI's --format json promises
    assert {"dp", "tp", "pp", "vpp", "micro_batch_size", "num_microbatches", "schedule",
            "recompute", "zero"} <= set(data["parallel"])
    assert {"step_time_s", "tokens_per_s", "peak_memory_bytes",
            "bubble_fraction"} <= set(data["estimate"])
    assert {"blocks", "time_s", "memory_bytes", "recompute"} <= set(data["stages"][0])
    assert data["solve_time_s"] == 0.6 and len(data["alternatives"]) == 2
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["alternatives"][0]["binding"] == "memory"


@pytest.mark.parametrize("cut", [10, 200, -3])
def test_truncated_json_is_refused_with_a_position(cut):
    text = make_plan().to_json()
    with pytest.raises(PlanError, match="corrupt or truncated at line"):
        Plan.from_json(text[:cut])


def test_wrong_schema_version_and_not_a_plan():
    data = make_plan().to_dict()
    data["schema_version"] = 99
    with pytest.raises(PlanError, match="schema version 99; this tripar reads version 1"):
        Plan.from_dict(data)
    with pytest.raises(PlanError, match="no 'schema_version'"):
        Plan.from_json('{"stages": []}')
    with pytest.raises(PlanError, match="a plan is a JSON object, got list"):
        Plan.from_json("[1, 2]")


def test_corrupt_fields_name_their_path():
    data = make_plan().to_dict()
    data["stages"][1]["time_s"] = "fast"
    with pytest.raises(PlanError, match=r"plan.stages\[1\].time_s: expected a number"):
        Plan.from_dict(data)
    data = make_plan().to_dict()
    del data["estimate"]["step_time_s"]
    with pytest.raises(PlanError, match=r"plan.estimate: missing field 'step_time_s'"):
        Plan.from_dict(data)
    data = make_plan().to_dict()
    data["parallel"]["schedule"] = "fastest"
    with pytest.raises(PlanError, match=r"plan.parallel: unknown schedule 'fastest'"):
        Plan.from_dict(data)
    data = make_plan().to_dict()
    data["parallel"]["zero"] = 3
    with pytest.raises(PlanError, match=r"plan.parallel: zero must be one of 0, 1, 2 \(the ZeRO "
                                        r"stage\), got 3"):
        Plan.from_dict(data)
    data = make_plan().to_dict()
    data["alternatives"][0]["binding"] = "luck"
    with pytest.raises(PlanError, match=r"'luck' is not one of 'memory'"):
        Plan.from_dict(data)
    data = make_plan().to_dict()
    data["stages"][0]["colour"] = "red"
    with pytest.raises(PlanError, match=r"plan.stages\[0\]: unknown field 'colour'"):
        Plan.from_dict(data)
    data = make_plan().to_dict()
    data["stages"][0]["memory_bytes"] = 1.5
    with pytest.raises(PlanError, match=r"memory_bytes: expected an integer, got 1.5"):
        Plan.from_dict(data)


def test_plans_written_before_regions_were_numbered_still_load():
    data = make_plan().to_dict()
    for region in data["tp_regions"]:
        del region["index"]
    old = Plan.from_dict(data)
    assert old == make_plan() and [r.index for r in old.tp_regions] == [0, 0]
    assert old.schema_version == SCHEMA_VERSION == 1
    data["tp_regions"][0]["index"] = "first"
    with pytest.raises(PlanError, match=r"plan.tp_regions\[0\].index: expected an integer"):
        Plan.from_dict(data)


# ---- hypothesis: any well-formed plan survives the JSON round trip -------------------------

names = st.text("abcdefghij.0123456789_", min_size=1, max_size=12)
floats = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
ints = st.integers(min_value=0, max_value=2**62)
pos = st.integers(min_value=1, max_value=1024)


@st.composite
def parallel_configs(draw):
    schedule = draw(st.sampled_from(SCHEDULES))
    even = 2 if schedule == "chimera" else 1  # chimera: even pp and microbatches
    return ParallelConfig(
        dp=draw(pos), tp=draw(pos), pp=draw(pos) * even, micro_batch_size=draw(pos),
        num_microbatches=draw(pos) * even,
        vpp=draw(pos) if schedule == "interleaved-1f1b" else 1, schedule=schedule,
        recompute=draw(st.sampled_from(("none", "full", "stage-aware"))),
        zero=draw(st.sampled_from((0, 1, 2))))


@st.composite
def estimates(draw):
    mem = tuple(draw(st.lists(ints, max_size=4)))
    return Estimate(draw(floats), draw(floats), max(mem) if mem else draw(ints),
                    draw(floats), mem, draw(floats), draw(floats))


@st.composite
def stage_plans(draw):
    blocks = tuple(draw(st.lists(names, min_size=1, max_size=4, unique=True)))
    rec = tuple(draw(st.lists(st.sampled_from(blocks), unique=True)))
    return StagePlan(draw(ints), draw(ints), draw(ints), blocks, rec, draw(floats), draw(ints),
                     draw(pos))


@st.composite
def plans(draw):
    return Plan(
        model=ModelInfo(draw(st.text(max_size=20)), draw(names),
                        tuple(draw(st.lists(names, min_size=1, max_size=6, unique=True))),
                        draw(ints)),
        cluster=ClusterInfo(draw(names), draw(pos), draw(pos), draw(pos), draw(floats),
                            draw(floats), draw(floats), draw(floats), draw(floats),
                            draw(st.text(max_size=8)), draw(st.text(max_size=30))),
        inputs=Inputs(draw(pos), draw(pos), draw(st.sampled_from(("bf16", "fp32")))),
        parallel=draw(parallel_configs()),
        stages=tuple(draw(st.lists(stage_plans(), min_size=1, max_size=3))),
        estimate=draw(estimates()),
        tp_regions=tuple(draw(st.lists(st.builds(
            TPShard, names, st.sampled_from(("mlp", "attention")),
            st.lists(names, max_size=3).map(tuple),
            st.lists(st.tuples(names, st.integers(0, 3)), max_size=2).map(tuple)),
            max_size=2))),
        schedule=tuple(draw(st.lists(st.text(max_size=15), max_size=3))),
        solvers=tuple(draw(st.lists(st.builds(SolverRun, names, names, names, floats, floats),
                                    max_size=2))),
        solve_time_s=draw(floats),
        alternatives=tuple(draw(st.lists(st.builds(
            Alternative, parallel_configs(), st.none() | estimates(),
            st.text(min_size=1, max_size=30), st.sampled_from(list(Binding))), max_size=2))),
        notes=tuple(draw(st.lists(st.text(max_size=20), max_size=2))),
    )


@settings(max_examples=25, deadline=None)
@given(plans())
def test_json_round_trip_of_any_plan(plan):
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_json(plan.to_json(indent=None)) == plan


@pytest.mark.parametrize("text", ["[" * 100_000,
                                  '{"schema_version": 1, "model": ' + "9" * 5000 + "}"])
def test_plan_json_that_breaks_the_json_reader(text):
    with pytest.raises(PlanError, match="corrupt"):
        Plan.from_json(text)
