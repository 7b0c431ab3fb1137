"""tripar.auto_parallel: the public entry, its errors, loss_fn, eval_step and batch checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tripar import api
from tripar.errors import ConfigError
from tripar.models import load_model
from tripar.runtime.testing import run_ranks

SPEC = "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8"


def test_bad_arguments_are_refused_before_anything_runs():
    loaded = load_model(SPEC, batch_size=2)
    with pytest.raises(ConfigError, match="needs a job of 2 processes"):
        api.auto_parallel(loaded.model, 2, example_inputs=loaded.example_inputs)
    with pytest.raises(ConfigError, match="not both"):
        api.capture_model(loaded.model, loaded.example_inputs, {"x": loaded.example_inputs[0]})
    with pytest.raises(ConfigError, match="needs an example batch"):
        api.capture_model(loaded.model)
    captured = api.capture_model(loaded.model, loaded.example_inputs)
    from tripar.partitioner.hardware import Cluster

    with pytest.raises(ConfigError, match="tp=2.*use tp=1"):
        api.make_plan(captured, Cluster.builtin("cpu", gpus_per_node=2), 4, tp=2)
    with pytest.raises(ConfigError, match="not divisible by dp x num_microbatches"):
        api.make_plan(captured, Cluster.builtin("cpu", gpus_per_node=2), 6, dp=2,
                      num_microbatches=4)


def _logits_model() -> dict:
    """A model that returns logits, a loss_fn reading a label field, eval and bad batches."""
    loaded = load_model(SPEC, batch_size=2)
    ids, targets = loaded.example_inputs

    def loss_fn(logits, batch):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))

    # the model sees only ids; the batch carries the targets for loss_fn
    pm = api.auto_parallel(loaded.model, example_inputs=(ids,), loss_fn=loss_fn,
                           optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5),
                           global_batch_size=4, pp=2, num_microbatches=2, schedule="1f1b")
    g = torch.Generator().manual_seed(3)
    batch = (torch.randint(0, 64, (4, 8), generator=g), torch.randint(0, 64, (4, 8), generator=g))
    before = pm.eval_step(batch)
    losses = [pm.train_step(batch) for _ in range(5)]
    after = pm.eval_step(batch)
    ref = loaded.model(batch[0], batch[1]).item()
    errors = []
    for bad in ((batch[0][:2], batch[1][:2]), {"ids": batch[0]}, (batch[0].float(), batch[1])):
        try:
            pm.train_step(bad)
        except ConfigError as error:
            errors.append(str(error))
    return {"before": before, "ref": ref, "losses": losses, "after": after, "errors": errors,
            "plan": pm.plan.parallel}


def test_loss_fn_eval_step_and_batch_checks_on_two_ranks():
    results = run_ranks(_logits_model, 2, timeout_s=90)
    for r in results:
        assert r["plan"].pp == 2 and r["plan"].num_microbatches == 2
        assert r["before"] == pytest.approx(r["ref"], rel=1e-5)  # eval = the model's own loss
        assert r["losses"][0] == pytest.approx(r["before"], rel=1e-5)
        assert r["after"] < r["before"] - 0.05  # trained on this batch
        assert r["losses"] == results[0]["losses"]  # the same on every rank
        shape, form, dtype = r["errors"]
        assert "batch field 0 has shape (2, 8)" in shape and "global batch 4" in shape
        assert "tuple of tensors" in form
        assert "dtype torch.float32" in dtype


def test_doctest_example_runs_in_one_process():
    (loss,) = run_ranks(_one_process, 1, timeout_s=60)
    assert 3.0 < loss < 4.0


def _one_process() -> float:
    loaded = load_model("gpt:layers=1,hidden=16,heads=2,vocab=32,seq=8", batch_size=2)
    pm = api.auto_parallel(loaded.model, example_inputs=loaded.example_inputs)
    assert pm.plan.parallel.devices == 1
    return pm.train_step(loaded.example_inputs)
