"""The Plan: validate(), the model check, the schedule accessor, save and load."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from example_plans import BLOCKS, GB, make_plan

from tripar.errors import PlanError
from tripar.plan import Alternative, ModelInfo, Plan, TPShard, model_fingerprint


def test_plan_constructor_rejects_inconsistent_fields():
    with pytest.raises(PlanError, match="schema version 2"):
        make_plan(schema_version=2)
    with pytest.raises(PlanError, match="Plan.stages must be a tuple of StagePlan"):
        make_plan(stages=[make_plan().stages[0]])


def test_save_and_load(tmp_path):
    plan = make_plan()
    path = plan.save(tmp_path / "plan.json")
    assert Plan.load(path) == plan
    with pytest.raises(PlanError, match="cannot read plan file"):
        Plan.load(tmp_path / "absent.json")


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


def test_a_stage_records_its_selective_recomputation():
    plan = make_plan()
    mixed = make_plan(stages=(plan.stages[0],
                              dataclasses.replace(plan.stages[1], selective=("h_2_softmax",))))
    assert mixed.validate() is mixed and Plan.from_json(mixed.to_json()) == mixed
    assert [st.granularity for st in mixed.stages] == ["1/3", "selective"]
    assert "selective" in mixed.render()
    pinned = dataclasses.replace(plan.parallel, recompute="selective")
    assert any("recompute is 'selective' but stages [0] recompute whole blocks" in p
               for p in make_plan(parallel=pinned).problems())
    none = make_plan(parallel=dataclasses.replace(plan.parallel, recompute="none"),
                     stages=mixed.stages)
    assert any("stages [1] recompute nodes selectively" in p for p in none.problems())


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


def test_a_binary_plan_file(tmp_path):
    (tmp_path / "p.json").write_bytes(b"\xff\xfe")
    with pytest.raises(PlanError, match="p.json"):
        Plan.load(tmp_path / "p.json")
