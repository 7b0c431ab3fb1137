"""Property tests of every parser a user's file or text reaches: malformed input raises
PlanError (plans, schedules, actions) or ConfigError (cluster profiles), never another
exception type; well-formed input round-trips."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tripar.errors import ConfigError, PlanError
from tripar.partitioner.hardware import BUILTIN_DEVICES, Cluster
from tripar.partitioner.schedules import build_schedule
from tripar.plan import (
    SCHEDULES,
    ClusterInfo,
    Estimate,
    Inputs,
    ModelInfo,
    ParallelConfig,
    Plan,
    StagePlan,
)
from tripar.plan.schedule import Action, ActionKind, Schedule

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# ---- inputs: arbitrary JSON, text near the real forms, and mutations of valid documents ----

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
# characters the real forms use, so that the fuzz gets past the first check
schedule_chars = st.text("schedulrank pv=:0123456789FfRBW#\n\t-", max_size=120)
action_text = st.text("0123456789FfRBWx -+.", max_size=12)


def _paths(value, prefix=()):
    """Every path (tuple of keys/indices) into nested lists and dicts."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw, document):
    """``document`` (JSON-able) with one field deleted, replaced or retyped."""
    doc = json.loads(json.dumps(document))
    paths = [p for p in _paths(doc) if p]
    path = draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    how = draw(st.sampled_from(("delete", "replace", "negate", "stringify", "nest")))
    last = path[-1]
    if how == "delete":
        del parent[last]
    elif how == "replace":
        parent[last] = draw(json_values)
    elif how == "negate":
        value = parent[last]
        parent[last] = (-value - 1 if isinstance(value, (int, float))
                        and not isinstance(value, bool) else -1)
    elif how == "stringify":
        parent[last] = str(parent[last])
    else:
        parent[last] = [parent[last]]
    return doc


@st.composite
def damaged_text(draw, text: str):
    """``text`` truncated, with a slice deleted, or with characters inserted."""
    how = draw(st.sampled_from(("truncate", "cut", "insert")))
    i = draw(st.integers(0, len(text)))
    if how == "truncate":
        return text[:i]
    if how == "cut":
        return text[:i] + text[i + draw(st.integers(1, 20)):]
    return text[:i] + draw(st.text(string.printable, min_size=1, max_size=5)) + text[i:]


# ---- actions ----------------------------------------------------------------------------

@FUZZ
@given(action_text, st.none() | st.integers(0, 5))
def test_action_parse_raises_only_plan_errors(text, stage):
    try:
        a = Action.parse(text, stage=stage)
    except PlanError as error:
        assert str(error)
        return
    assert isinstance(a, Action) and a.microbatch >= 0 and a.stage >= 0
    assert Action.parse(str(a)) == a


@FUZZ
@given(st.integers(0, 10**9 - 1), st.sampled_from(list(ActionKind)), st.integers(0, 10**9 - 1))
def test_action_round_trips(stage, kind, mb):
    a = Action(stage, kind, mb)
    assert Action.parse(str(a)) == a
    assert Action.parse(a.short(), stage=stage) == a


@pytest.mark.parametrize("bad", [None, 3, b"F0", "9" * 5000 + "F0", "F" + "1" * 5000, "١F٢"])
def test_action_parse_odd_input(bad):
    with pytest.raises(PlanError):
        Action.parse(bad, stage=0)


# ---- schedules --------------------------------------------------------------------------

@st.composite
def generated(draw):
    name = draw(st.sampled_from(SCHEDULES))
    pp = draw(st.integers(1, 4))
    vpp = draw(st.integers(2, 3)) if name == "interleaved-1f1b" else 1
    m = draw(st.integers(1, 6))
    if name == "interleaved-1f1b" and m % pp:
        m = pp * draw(st.integers(1, 2))
    if name == "chimera":  # two pipelines: even pp and microbatches
        pp, m = 2 * draw(st.integers(1, 2)), 2 * draw(st.integers(1, 3))
    return build_schedule(name, pp, m, vpp=vpp)


@FUZZ
@given(generated())
def test_generated_schedules_round_trip(schedule):
    schedule.validate()
    assert Schedule.from_text(schedule.to_text()) == schedule
    assert Schedule.from_dict(schedule.to_dict()) == schedule
    assert Schedule.from_dict(json.loads(json.dumps(schedule.to_dict()))) == schedule


@FUZZ
@given(schedule_chars)
def test_schedule_text_near_the_form_raises_only_plan_errors(text):
    try:
        Schedule.from_text("schedule " + text)
    except PlanError:
        pass


@FUZZ
@given(st.data())
def test_damaged_schedule_text_raises_only_plan_errors(data):
    schedule = data.draw(generated())
    text = data.draw(damaged_text(schedule.to_text()))
    try:
        parsed = Schedule.from_text(text)
    except PlanError:
        return
    try:  # a damage that still parses is caught by validation, or is harmless
        parsed.validate()
    except PlanError:
        pass


@FUZZ
@given(st.data())
def test_damaged_schedule_data_raises_only_plan_errors(data):
    schedule = data.draw(generated())
    doc = data.draw(mutated(schedule.to_dict()) | json_values)
    try:
        Schedule.from_dict(doc)
    except PlanError:
        pass


@pytest.mark.parametrize("text", [
    "schedule x pp=" + "9" * 5000 + " vpp=1 microbatches=1",
    "schedule x pp=1 vpp=1 microbatches=1\nrank " + "0" * 5000 + ": F0 B0",
    "schedule x pp=١ vpp=1 microbatches=1\nrank 0: F0 B0",
])
def test_schedule_text_with_absurd_numbers(text):
    with pytest.raises(PlanError):
        Schedule.from_text(text)


@pytest.mark.parametrize("doc", [
    {"name": "x", "pp": float("inf"), "vpp": 1, "num_microbatches": 1, "actions": [[]]},
    {"name": "x", "pp": 1.5, "vpp": 1, "num_microbatches": 1, "actions": [["F0"]]},
    {"name": "x", "pp": True, "vpp": 1, "num_microbatches": 1, "actions": [["F0"]]},
    {"name": ["x"], "pp": 1, "vpp": 1, "num_microbatches": 1, "actions": [["F0"]]},
    {"name": "x", "pp": 1, "vpp": 1, "num_microbatches": 1, "actions": "F0 B0"},
    {"name": "x", "pp": 1, "vpp": 1, "num_microbatches": 1, "actions": [[0]]},
    ["x", 1, 1, 1],
])
def test_schedule_data_of_the_wrong_types(doc):
    with pytest.raises(PlanError, match="schedule|action"):
        Schedule.from_dict(doc)


# ---- plans ------------------------------------------------------------------------------

def _plan(pp: int, m: int, schedule: str) -> Plan:
    built = build_schedule(schedule, pp, m)
    blocks = tuple(f"h.{i}" for i in range(2 * pp))
    return Plan(
        model=ModelInfo("gpt:layers=4", "0f0f0f0f0f0f0f0f", blocks, 10**8),
        cluster=ClusterInfo("a100-80g", 1, pp, 80 * 10**9, 312e12, 300e9, 25e9),
        inputs=Inputs(global_batch_size=m, seq_len=1024),
        parallel=ParallelConfig(dp=1, tp=1, pp=pp, micro_batch_size=1, num_microbatches=m,
                                schedule=schedule),
        stages=tuple(StagePlan(s, s, 0, blocks[2 * s:2 * s + 2], (), 0.01, 10**9)
                     for s in range(pp)),
        estimate=Estimate(0.05, m * 1024 / 0.05, 10**9, 0.2, (10**9,) * pp),
        schedule=tuple(" ".join(a.short() for a in acts) for acts in built.actions))


plans = st.builds(_plan, st.integers(1, 4), st.integers(1, 6),
                  st.sampled_from(("gpipe", "1f1b", "zb-h1")))


@FUZZ
@given(plans)
def test_valid_plans_round_trip(plan):
    plan.validate()
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_json(plan.to_json(indent=None)).to_schedule() == plan.to_schedule()


def _load_plan(text: str) -> None:
    """Plan.from_json, then validate and the schedule, as ``tripar show`` does."""
    plan = Plan.from_json(text)
    plan.validate()
    if plan.schedule:
        plan.to_schedule().validate()


@FUZZ
@given(st.data())
def test_damaged_plan_json_raises_only_plan_errors(data):
    text = data.draw(plans).to_json()
    try:
        _load_plan(data.draw(damaged_text(text)))
    except PlanError:
        pass


@FUZZ
@given(st.data())
def test_mutated_plan_fields_raise_only_plan_errors(data):
    doc = data.draw(mutated(data.draw(plans).to_dict()))
    assume(doc.get("schema_version") == 1)  # a wrong version is its own case below
    try:
        _load_plan(json.dumps(doc))
    except PlanError:
        pass


@FUZZ
@given(json_values)
def test_any_json_document_raises_only_plan_errors(doc):
    try:
        Plan.from_json(json.dumps(doc))
    except PlanError as error:
        assert str(error)


def test_plan_schema_version_and_shape_errors_say_what_to_do():
    text = _plan(2, 4, "1f1b").to_json()
    for bad, words in (
        (text.replace('"schema_version": 1', '"schema_version": 2'), "schema version 2"),
        (text[: len(text) // 2], "corrupt or truncated at line"),
        ("[]", "a plan is a JSON object, got list"),
        ('{"model": {}}', "no 'schema_version'"),
    ):
        with pytest.raises(PlanError, match="re-create|JSON object|schema_version") as err:
            Plan.from_json(bad)
        assert words in str(err.value)


# ---- cluster profiles -------------------------------------------------------------------

clusters = st.builds(lambda gpu, nodes, g: Cluster.builtin(gpu, nodes=nodes, gpus_per_node=g),
                     st.sampled_from(BUILTIN_DEVICES), st.integers(1, 64), st.integers(1, 16))


@FUZZ
@given(clusters)
def test_cluster_profiles_round_trip(cluster):
    assert Cluster.from_dict(json.loads(json.dumps(cluster.to_dict()))) == cluster


@FUZZ
@given(st.data())
def test_mutated_cluster_profiles_raise_only_config_errors(data):
    doc = data.draw(mutated(data.draw(clusters).to_dict()) | json_values)
    try:
        cluster = Cluster.from_dict(doc)
    except ConfigError as error:
        assert str(error)
        return
    assert cluster.devices >= 1 and cluster.intra_bandwidth > 0  # what parsed is usable


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_damaged_cluster_files_raise_only_config_errors(tmp_path_factory, data):
    text = json.dumps(data.draw(clusters).to_dict(), indent=1)
    raw = data.draw(damaged_text(text)).encode() + data.draw(st.binary(max_size=3))
    path = tmp_path_factory.mktemp("profile") / "cluster.json"
    path.write_bytes(raw)
    try:
        Cluster.from_file(path)
    except ConfigError as error:
        assert str(path) in str(error)


@pytest.mark.parametrize("text", [
    "[" * 100_000, '{"format": "tripar-cluster", "nodes": ' + "9" * 5000 + "}",
])
def test_cluster_files_that_break_the_json_reader(tmp_path, text):
    path = tmp_path / "cluster.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid JSON"):
        Cluster.from_file(path)
