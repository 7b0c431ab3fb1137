"""The Python API raises tripar's own exceptions, with the messages the CLI prints: bad
pins, a model that does not fit or cannot be captured, a plan or checkpoint that is
corrupt or for another model, a batch unlike the example the plan was made for.

``auto_parallel`` starts a process group, so its cases run in one rank of ``run_ranks``
(each case returns the exception's type and message; the asserts run here).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace

import pytest

from tests._ranks import run_ranks
from tripar.errors import ConfigError, PlanError
from tripar.partitioner import Pins, check_pins
from tripar.plan.plan import Plan

SPEC = "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8"
OTHER = "gpt:layers=1,hidden=16,heads=2,vocab=32,seq=8"
LIMIT = 200_000
"""Device memory of the cluster the model does not fit on."""


def _error(fn, *args, **kwargs) -> tuple[str, str, str]:
    """(class name, its MRO's tripar bases, message) of what ``fn`` raises."""
    try:
        fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the test looks at the type
        bases = ",".join(c.__name__ for c in type(error).__mro__ if c.__module__.startswith(
            "tripar"))
        return type(error).__name__, bases, str(error)
    raise AssertionError(f"{fn} raised nothing")


def _cases(directory: str) -> dict:
    import torch
    from torch import nn

    from tripar import api
    from tripar.models import load_model
    from tripar.partitioner.hardware import Cluster

    loaded = load_model(SPEC, batch_size=4)
    model, example = loaded.model, loaded.example_inputs
    captured = api.capture_model(model, example)
    out: dict = {}

    def ap(**kw):
        return api.auto_parallel(model, 1, example_inputs=example, captured=captured,
                                 model_spec=SPEC, **kw)

    out["dp"] = _error(ap, dp=2)
    out["dp-expected"] = _error(check_pins, Pins(dp=2), 1, 4)
    out["batch"] = _error(ap, global_batch_size=6, num_microbatches=4)
    out["batch-expected"] = _error(check_pins, Pins(num_microbatches=4), 1, 6)
    out["tp"] = _error(api.make_plan, captured, Cluster.builtin("cpu", gpus_per_node=3), 6,
                       Pins(tp=3))

    cpu = Cluster.builtin("cpu", gpus_per_node=1)
    tiny = replace(cpu, device=replace(cpu.device, memory_bytes=LIMIT, name="tiny"))
    out["fit"] = _error(ap, cluster=tiny)

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:
                h = h * 2
            return h.square().mean()

    out["capture"] = _error(api.auto_parallel, Gate(), 1, example_inputs=(torch.randn(2, 8),))

    other = load_model(OTHER, batch_size=4)
    other_plan = api.make_plan(api.capture_model(other.model, other.example_inputs), cpu, 4,
                               model_spec=OTHER)
    out["plan-model"] = _error(ap, plan=other_plan)
    two = api.make_plan(captured, Cluster.builtin("cpu", gpus_per_node=2), 4, Pins(dp=2))
    out["plan-devices"] = _error(ap, plan=two)

    # checkpoints: save one, then load it into another model and in damaged forms
    pm = ap(optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    pm.train_step(example)
    pm.save(directory)
    wrong = api.auto_parallel(other.model, 1, example_inputs=other.example_inputs)
    out["ckpt-model"] = _error(wrong.load, directory)
    manifest_path = os.path.join(directory, "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    shard = os.path.join(directory, manifest["files"]["wte.weight|param"][0])
    raw = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(raw[: len(raw) // 2])
    out["ckpt-truncated"] = _error(pm.load, directory)
    torch.save({"not": "pieces"}, shard)
    out["ckpt-foreign"] = _error(pm.load, directory)
    with open(shard, "wb") as f:
        f.write(raw)
    for name, change in (("ckpt-version", {"version": 2}),
                         ("ckpt-fields", {"files": {"wte.weight|param": ["/etc/passwd"]}}),
                         ("ckpt-json", None)):
        with open(manifest_path, "w") as f:
            f.write(json.dumps({**manifest, **change}) if change else "{\"format\": ")
        out[name] = _error(pm.load, directory)
    with open(manifest_path, "w") as f:
        f.write(json.dumps(manifest))
    pm.load(directory)  # the undamaged checkpoint still loads
    out["ckpt-steps"] = pm.steps

    # batches unlike the example (tuple form: token ids and targets of 4 x 8)
    ids, targets = example
    for name, batch in (("shape", (ids[:, :4], targets[:, :4])),
                        ("size", (ids[:2], targets[:2])),
                        ("dtype", (ids.float(), targets)),
                        ("form", {"input_ids": ids, "targets": targets}),
                        ("fields", (ids,))):
        out[f"batch-{name}"] = _error(pm.train_step, batch)
        out[f"eval-{name}"] = _error(pm.eval_step, batch)

    # dict form: a model fed by keyword
    kw = {"input_ids": ids, "targets": targets}
    pk = api.auto_parallel(model, 1, example_kwargs=kw)
    out["kw-missing"] = _error(pk.train_step, {"input_ids": ids})
    out["kw-tuple"] = _error(pk.train_step, (ids, targets))
    out["kw-not-tensor"] = _error(pk.train_step, {"input_ids": ids, "targets": 3})
    out["kw-ok"] = pk.train_step({**kw, "extra": torch.zeros(4)})  # extra fields are fine
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    directory = str(tmp_path_factory.mktemp("ckpt"))
    (out,) = run_ranks(_cases, 1, directory, timeout_s=120, pg_timeout_s=30)
    return out


def test_pins_raise_config_errors_naming_the_keywords(cases):
    """The one pin check (``check_pins``) speaks the API's language: ``dp=2``, not ``--dp 2``."""
    assert cases["dp"] == cases["dp-expected"]
    kind, bases, message = cases["dp"]
    assert kind == "ConfigError" and "TriparError" in bases
    assert "dp=2 does not divide the 1 devices" in message and "--" not in message
    assert cases["batch"] == cases["batch-expected"]
    assert ("global_batch_size=6 is not divisible by num_microbatches=4 times any "
            "data-parallel degree" in cases["batch"][2])
    kind, _, message = cases["tp"]
    assert kind == "ConfigError" and "--" not in message
    before_capture = str(pytest.raises(ConfigError, check_pins, Pins(tp=3), 3, 6,
                                       heads=4).value)
    for text in (message, before_capture):
        assert text.startswith("tp=3 does not divide the model's attention heads (4)")
        assert text.endswith("tp=1")


def test_a_model_that_does_not_fit_raises_infeasible_with_the_shortfall(cases):
    kind, bases, message = cases["fit"]
    assert kind == "InfeasibleError" and "TriparError" in bases
    need, more = (int(x) for x in re.search(r"needs at least (\d+) bytes.*?, (\d+) bytes more "
                                            r"than", message).groups())
    assert need - more == LIMIT and f"the {LIMIT} bytes" in message


def test_an_uncapturable_model_raises_capture_error_naming_both_tracers(cases):
    kind, _, message = cases["capture"]
    assert kind == "CaptureError"
    assert "could not capture Gate with fx and export" in message
    assert "(`if h.sum() > 0:`): TraceError" in message
    assert "export: failed" in message and "GuardOnDataDependentSymNode" in message


def test_a_plan_for_another_model_or_job_raises_plan_error(cases):
    kind, _, message = cases["plan-model"]
    assert kind == "PlanError"
    assert f"this plan was made for model {OTHER!r}" in message and "re-run `tripar plan`" in (
        message)
    kind, _, message = cases["plan-devices"]
    assert kind == "PlanError" and "the plan is for 2 devices, the job has 1 ranks" in message


def test_a_corrupt_plan_text_raises_plan_error():
    for text in ('{"schema_version": 1, "model": ', "null", '{"schema_version": "1"}'):
        with pytest.raises(PlanError) as err:
            Plan.from_json(text)
        assert "plan" in str(err.value)


def test_bad_checkpoints_raise_checkpoint_errors(cases):
    for name, words in (
        ("ckpt-model", [f"is for model {SPEC!r} (fingerprint", "this model's fingerprint",
                        "load it into the model it was saved from"]),
        ("ckpt-truncated", ["cannot be read", "incomplete or corrupt"]),
        ("ckpt-foreign", ["does not hold tripar checkpoint pieces"]),
        ("ckpt-version", ["checkpoint version 2", "reads version 1"]),
        ("ckpt-fields", ["is corrupt: 'files' must map"]),
        ("ckpt-json", ["is corrupt (JSONDecodeError"]),
    ):
        kind, bases, message = cases[name]
        assert kind == "CheckpointError" and "PlanError" in bases, (name, cases[name])
        for word in words:
            assert word in message, (name, word, message)
    assert cases["ckpt-steps"] == 1


def test_a_batch_unlike_the_example_raises_config_error_naming_the_field(cases):
    expect = {
        "shape": ["batch field 0 has shape (4, 4)", "the plan is for shape (4, 8)",
                  "re-plan for the new batch shape"],
        "size": ["batch field 0 has shape (2, 8)", "global batch 4"],
        "dtype": ["dtype torch.float32", "dtype torch.int64"],
        "form": ["must be a tuple of tensors like the example", "got dict"],
        "fields": ["the batch has no field 1, which the model reads"],
    }
    for name, words in expect.items():
        kind, _, message = cases[f"batch-{name}"]
        assert kind == "ConfigError", (name, cases[f"batch-{name}"])
        assert cases[f"eval-{name}"] == cases[f"batch-{name}"]  # eval_step says the same
        for word in words:
            assert word in message, (name, word, message)
    assert "the batch has no field 'targets'" in cases["kw-missing"][2]
    assert "must be a dict of tensors like the example (keys ['input_ids', 'targets'])" in (
        cases["kw-tuple"][2])
    assert "batch field 'targets' has a int" in cases["kw-not-tensor"][2]
    assert 3.0 < cases["kw-ok"] < 5.0
