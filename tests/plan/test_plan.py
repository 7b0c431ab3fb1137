"""The Plan IR: construction checks, validate(), JSON round trip, render()."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tripar.errors import PlanError
from tripar.plan.config import SCHEDULES, ParallelConfig
from tripar.plan.plan import (
    SCHEMA_VERSION,
    Alternative,
    Binding,
    ClusterInfo,
    Estimate,
    Inputs,
    ModelInfo,
    Plan,
    SolverRun,
    StagePlan,
    TPShard,
    model_fingerprint,
)

BLOCKS = ("embed", "h.0", "h.1", "h.2", "h.3", "head")
GB = 10**9


def make_plan(**overrides) -> Plan:
    """A valid plan: 6 blocks on dp=2 tp=2 pp=2, 8 devices, 1F1B with 4 microbatches."""
    par = ParallelConfig(dp=2, tp=2, pp=2, micro_batch_size=2, num_microbatches=4,
                         recompute="stage-aware", zero=1)
    stages = (
        StagePlan(0, 0, 0, BLOCKS[:3], ("h.0",), 0.012, 60 * GB, in_flight=2),
        StagePlan(1, 1, 0, BLOCKS[3:], (), 0.013, 55 * GB, in_flight=1),
    )
    fields = dict(
        model=ModelInfo("gpt:layers=4", "0123456789abcdef", BLOCKS, 1_500_000_000),
        cluster=ClusterInfo("a100-80g", 1, 8, 80 * GB, 312e12, 300e9, 25e9, 1e-6, 5e-6,
                            "1x8 a100-80g"),
        inputs=Inputs(16, 2048),
        parallel=par,
        stages=stages,
        estimate=Estimate(step_time_s=0.2, tokens_per_s=16 * 2048 / 0.2,
                          peak_memory_bytes=60 * GB, bubble_fraction=0.2,
                          stage_memory_bytes=(60 * GB, 55 * GB), compute_s=0.15,
                          communication_s=0.01),
        tp_regions=(TPShard("h.0", "mlp", ("h_0_fc1", "h_0_fc2"),
                            (("h.0.fc1.weight", 0), ("h.0.fc2.weight", 1))),
                    TPShard("h.0", "attention", ("h_0_qkv", "h_0_proj"))),
        schedule=("F0 F1 B0 F2 B1 F3 B2 B3", "F0 B0 F1 B1 F2 B2 F3 B3"),
        solvers=(SolverRun("search", "enumeration", "optimal", 0.2, 0.5),
                 SolverRun("partition", "dp", "optimal", 0.2, 0.01)),
        solve_time_s=0.6,
        alternatives=(
            Alternative(dataclasses.replace(par, tp=1, dp=4, num_microbatches=2), None,
                        "needs 91.2 GB > 80.0 GB on pipeline rank 0", Binding.MEMORY),
            Alternative(dataclasses.replace(par, pp=1, dp=4, num_microbatches=2),
                        Estimate(0.25, 16 * 2048 / 0.25, 70 * GB, 0.0), "more communication",
                        Binding.COMMUNICATION),
        ),
        notes=("tp pinned by the user",),
    )
    fields.update(overrides)
    return Plan(**fields)


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


def test_save_and_load(tmp_path):
    plan = make_plan()
    path = plan.save(tmp_path / "plan.json")
    assert Plan.load(path) == plan
    with pytest.raises(PlanError, match="cannot read plan file"):
        Plan.load(tmp_path / "absent.json")


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


def test_constructors_reject_inconsistent_fields():
    with pytest.raises(PlanError, match="recomputes \\['h.9'\\], which it does not hold"):
        StagePlan(0, 0, 0, ("h.0",), ("h.9",), 1.0, 10)
    with pytest.raises(PlanError, match="stage 3 holds no block"):
        StagePlan(3, 0, 0, (), (), 1.0, 10)
    with pytest.raises(PlanError, match="time_s must be a finite number >= 0"):
        StagePlan(0, 0, 0, ("h.0",), (), float("nan"), 10)
    with pytest.raises(PlanError, match="names a block twice: \\['a'\\]"):
        ModelInfo("m", "f", ("a", "b", "a"), 1)
    with pytest.raises(PlanError, match="not the largest stage memory"):
        Estimate(1.0, 1.0, 5, 0.1, (7, 5))
    with pytest.raises(PlanError, match="bubble_fraction must be a finite number >= 0"):
        Estimate(1.0, 1.0, 5, -0.5)
    with pytest.raises(PlanError, match="must say why it lost"):
        Alternative(make_plan().parallel, None, "")
    with pytest.raises(PlanError, match="schema version 2"):
        make_plan(schema_version=2)
    with pytest.raises(PlanError, match="Plan.stages must be a tuple of StagePlan"):
        make_plan(stages=[make_plan().stages[0]])


def test_validate_reports_every_problem():
    plan = make_plan()
    par = plan.parallel
    bad = make_plan(
        parallel=dataclasses.replace(par, dp=1),            # 4 devices of 8, batch 8 of 16
        stages=(plan.stages[0], dataclasses.replace(plan.stages[1], blocks=("h.2", "head"),
                                                    memory_bytes=90 * GB)),
        estimate=dataclasses.replace(plan.estimate, tokens_per_s=1.0),
        tp_regions=(), alternatives=())
    with pytest.raises(PlanError) as info:
        bad.validate()
    text = str(info.value)
    assert "= 4 devices, but the cluster has 1*8 = 8" in text
    assert "= 8, but the global batch is 16" in text
    assert "no stage holds blocks ['h.3']" in text
    assert "stage 1 needs 90000000000 bytes, more than the device's 80000000000" in text
    assert "tokens_per_s 1 is not global batch * seq / step time" in text
    assert "tp = 2 but no region is sharded" in text


def test_validate_checks_contiguity_ranks_and_schedule():
    plan = make_plan()
    swapped = make_plan(stages=(
        dataclasses.replace(plan.stages[0], blocks=("embed", "h.0", "h.2")),
        dataclasses.replace(plan.stages[1], blocks=("h.1", "h.3", "head"))))
    assert any("not contiguous" in p for p in swapped.problems())
    wrong_rank = make_plan(stages=(plan.stages[0], dataclasses.replace(plan.stages[1], rank=0)))
    assert any("stage 1 says index=1 rank=0" in p for p in wrong_rank.problems())
    bad_schedule = make_plan(schedule=("F0 F1 B0 F2 B1 F3 B2", "F0 B0 F1 B1 F2 B2 F3 B3"))
    assert any(p.startswith("schedule:") for p in bad_schedule.problems())
    short = make_plan(schedule=("F0 B0",))
    assert any("action lists for 1 ranks, but pp = 2" in p for p in short.problems())
    same = make_plan(alternatives=(Alternative(plan.parallel, None, "tie"),))
    assert any("is the chosen configuration itself" in p for p in same.problems())
    none = make_plan(parallel=dataclasses.replace(plan.parallel, recompute="none"))
    assert any("recompute is 'none' but stages [0]" in p for p in none.problems())


def test_regions_are_named_block_kind_index():
    plan = make_plan()
    assert [r.name for r in plan.tp_regions] == ["h.0:mlp:0", "h.0:attention:0"]
    # two attention regions in one block (t5 self and cross) differ by their index
    cross = TPShard("h.0", "attention", ("h_0_cq", "h_0_co"), index=1)
    two = make_plan(tp_regions=(*plan.tp_regions, cross))
    assert two.validate() is two and Plan.from_json(two.to_json()) == two
    assert two.to_dict()["tp_regions"][2]["index"] == 1
    same = make_plan(tp_regions=(*plan.tp_regions, dataclasses.replace(cross, index=0)))
    with pytest.raises(PlanError, match=r"regions listed twice: \['h.0:attention:0'\]; a "
                                        r"region is named block:kind:index"):
        same.validate()
    stray = make_plan(tp_regions=(dataclasses.replace(cross, block="h.9"),))
    assert "tensor-parallel regions in unknown blocks: ['h.9:attention:1']" in stray.problems()
    for bad in (-1, True, "1"):
        with pytest.raises(PlanError, match=r"TPShard.index must be an integer >= 0 \(which "
                                            r"attention region of block 'h.0'\)"):
            dataclasses.replace(cross, index=bad)


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


def test_schedule_accessor_gives_the_schedule_ir():
    sched = make_plan().to_schedule()
    assert sched.pp == 2 and sched.num_microbatches == 4 and sched.name == "1f1b"
    assert str(sched.actions[0][2]) == "0B0"
    with pytest.raises(PlanError, match="records no schedule"):
        make_plan(schedule=()).to_schedule()


def test_model_fingerprint_and_check():
    blocks = [SimpleNamespace(name=n, signature="layer", params=7) for n in BLOCKS]
    fp = model_fingerprint(blocks)
    assert len(fp) == 16 and fp == model_fingerprint(list(blocks))
    blocks[2] = SimpleNamespace(name="h.1", signature="layer", params=8)
    assert model_fingerprint(blocks) != fp
    plan = make_plan(model=ModelInfo("gpt", fp, BLOCKS, 42))
    plan.check_model(fp)
    with pytest.raises(PlanError, match="made for model 'gpt'.*re-run `tripar plan`"):
        plan.check_model("ffffffffffffffff")


def test_render_is_a_readable_summary():
    text = make_plan().render()
    assert "dp=2 tp=2 pp=2 vpp=1 | micro-batch 2 x 4 | 1f1b | recompute stage-aware | ZeRO-1" \
        in text
    assert "peak memory 60.0 GB of 80.0 GB, bubble 20.0%" in text
    assert "embed .. h.1 (3)" in text and "1/3" in text
    assert "tensor parallel (tp=2): 2 regions sharded: 1 attention, 1 mlp" in text
    assert "\n  h.0:mlp:0, h.0:attention:0\n" in text
    assert "rank 0: F0 F1 B0" in text
    assert "needs 91.2 GB > 80.0 GB on pipeline rank 0 [memory]" in text
    assert "(+25.0%)" in text and "note: tp pinned by the user" in text
    assert all(len(line) <= 100 for line in text.splitlines())


def test_cluster_info_from_a_cluster_object():
    device = SimpleNamespace(name="h100-80g", memory_bytes=80 * GB, peak=lambda dtype: 989e12)
    cluster = SimpleNamespace(device=device, nodes=2, devices_per_node=8, intra_bandwidth=450e9,
                              inter_bandwidth=50e9, intra_latency=1e-6, inter_latency=5e-6,
                              name="2x8", to_dict=lambda: {"nodes": 2})
    info = ClusterInfo.from_cluster(cluster)
    assert info.devices == 16 and info.peak_flops == 989e12
    assert json.loads(info.profile) == {"nodes": 2}


# ---- hypothesis: any well-formed plan survives the JSON round trip -------------------------

names = st.text("abcdefghij.0123456789_", min_size=1, max_size=12)
floats = st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False)
ints = st.integers(min_value=0, max_value=2**62)
pos = st.integers(min_value=1, max_value=1024)


@st.composite
def parallel_configs(draw):
    schedule = draw(st.sampled_from(SCHEDULES))
    return ParallelConfig(
        dp=draw(pos), tp=draw(pos), pp=draw(pos), micro_batch_size=draw(pos),
        num_microbatches=draw(pos),
        vpp=draw(pos) if schedule == "interleaved-1f1b" else 1, schedule=schedule,
        recompute=draw(st.sampled_from(("none", "full", "stage-aware"))),
        zero=draw(st.sampled_from((0, 1))))


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


def test_a_binary_plan_file(tmp_path):
    (tmp_path / "p.json").write_bytes(b"\xff\xfe")
    with pytest.raises(PlanError, match="p.json"):
        Plan.load(tmp_path / "p.json")
