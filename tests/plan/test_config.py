"""ParallelConfig: tp_overlap (sub-pipelined tensor parallelism) and its rules."""

from __future__ import annotations

import dataclasses
import json

import pytest
from example_plans import make_plan

from tripar.errors import ConfigError, PlanError
from tripar.plan import ParallelConfig, Plan


def test_tp_overlap_round_trips_through_json_and_shows_in_the_plan_text():
    plan = make_plan()
    plan = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, tp_overlap=2))
    assert json.loads(plan.to_json())["parallel"]["tp_overlap"] == 2
    assert Plan.from_json(plan.to_json()) == plan
    assert "tp-overlap 2" in plan.render()
    assert "tp-overlap" not in make_plan().render()


def test_a_plan_without_tp_overlap_reads_as_one_part():
    data = json.loads(make_plan().to_json())
    del data["parallel"]["tp_overlap"]
    assert Plan.from_json(json.dumps(data)).parallel.tp_overlap == 1


@pytest.mark.parametrize(("fields", "message"), [
    (dict(tp=1, micro_batch_size=4, tp_overlap=2), r"needs tp > 1; use tp_overlap=1 at tp=1"),
    (dict(tp=2, micro_batch_size=6, tp_overlap=4), r"micro_batch_size=6 is not divisible by 4"),
    (dict(tp=2, micro_batch_size=1, tp_overlap=2, sp=True),
     r"micro_batch_size=1 splits the sequence, which sequence parallelism \(sp=True\) "
     r"already shards .*use sp=False"),
    (dict(tp=2, micro_batch_size=4, tp_overlap=0), r"tp_overlap must be a positive integer"),
    (dict(tp=2, micro_batch_size=4, tp_overlap=True), r"tp_overlap must be a positive integer"),
])
def test_tp_overlap_rules_name_the_numbers_and_the_fix(fields, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**{"dp": 1, "pp": 1, "num_microbatches": 2, **fields})


def test_a_json_plan_with_a_bad_tp_overlap_names_the_field():
    data = json.loads(make_plan().to_json())
    data["parallel"]["tp_overlap"] = 3  # micro_batch_size is 2
    with pytest.raises(PlanError, match=r"parallel.*tp_overlap=3.*not divisible by 3"):
        Plan.from_json(json.dumps(data))


def test_one_sample_splits_its_sequence_where_the_sequence_divides():
    assert ParallelConfig(dp=1, tp=2, pp=1, micro_batch_size=1, num_microbatches=2,
                          tp_overlap=2).tp_overlap == 2
    plan = make_plan()
    one = dataclasses.replace(plan.parallel, micro_batch_size=1,
                              num_microbatches=2 * plan.parallel.num_microbatches)
    for k, bad in ((2, False), (3, plan.inputs.seq_len % 3 != 0)):
        parts = dataclasses.replace(plan, parallel=dataclasses.replace(one, tp_overlap=k))
        found = [p for p in parts.problems() if "tp_overlap" in p]
        assert bool(found) == bad, found
        if bad:
            assert f"seq_len={plan.inputs.seq_len} is not divisible by {k}" in found[0]
