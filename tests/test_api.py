"""tripar.auto_parallel: the public entry, its errors, loss_fn, eval_step and batch checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests._ranks import run_ranks
from tripar import Pins, api
from tripar.errors import ConfigError
from tripar.models import load_model

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

    with pytest.raises(ConfigError, match="tp=3 does not divide the model's attention heads"):
        api.make_plan(captured, Cluster.builtin("cpu", gpus_per_node=3), 6, Pins(tp=3))
    with pytest.raises(ConfigError, match="not divisible by dp x num_microbatches"):
        api.make_plan(captured, Cluster.builtin("cpu", gpus_per_node=2), 6,
                      Pins(dp=2, num_microbatches=4))
    with pytest.raises(ConfigError, match="tp given both in pins= and as keywords"):
        api.auto_parallel(loaded.model, 1, example_inputs=loaded.example_inputs,
                          pins=Pins(tp=1), tp=1)


def test_pinned_tp_shards_regions_even_where_they_do_not_pay():
    """On the CPU profile a tiny model's collectives cost more than its sharded compute
    saves; a pinned tp still shards (the user asked for it), and the plan says why."""
    loaded = load_model(SPEC, batch_size=4)
    captured = api.capture_model(loaded.model, loaded.example_inputs)
    from tripar.partitioner.hardware import Cluster

    plan = api.make_plan(captured, Cluster.builtin("cpu", gpus_per_node=2), 4, Pins(tp=2))
    assert plan.parallel.tp == 2 and plan.tp_regions
    assert {r.kind for r in plan.tp_regions} >= {"attention", "mlp"}


def _logits_model(tp: int = 1) -> dict:
    """A model that returns logits, a loss_fn reading a label field, eval and bad batches.
    With ``tp=2`` the logits of the vocab-parallel head are gathered for ``loss_fn``."""
    loaded = load_model(SPEC, batch_size=2)
    ids, targets = loaded.example_inputs

    def loss_fn(logits, batch):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))

    # the model sees only ids; the batch carries the targets for loss_fn
    pm = api.auto_parallel(loaded.model, example_inputs=(ids,), loss_fn=loss_fn,
                           optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5),
                           global_batch_size=4, pp=3 - tp, tp=tp, num_microbatches=2,
                           schedule="1f1b")
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


@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "tp2"])
def test_loss_fn_eval_step_and_batch_checks_on_two_ranks(tp):
    results = run_ranks(_logits_model, 2, tp, timeout_s=90)
    for r in results:
        assert r["plan"].pp == 3 - tp and r["plan"].tp == tp and r["plan"].num_microbatches == 2
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
    from tripar.runtime import job_cluster

    loaded = load_model("gpt:layers=1,hidden=16,heads=2,vocab=32,seq=8", batch_size=2)
    pm = api.auto_parallel(loaded.model, example_inputs=loaded.example_inputs)
    assert pm.plan.parallel.devices == 1
    loss = pm.train_step(loaded.example_inputs)
    pm.close()
    # the planner costs the optimizer it is given: SGD's step moves 12 B per parameter,
    # the default AdamW's 28
    sgd = api.auto_parallel(loaded.model, example_inputs=loaded.example_inputs,
                            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    captured = api.capture_model(loaded.model, loaded.example_inputs)
    expected = api.make_plan(captured, job_cluster(1).with_optimizer(12.0), 2)
    assert sgd.plan.estimate.step_time_s == pytest.approx(expected.estimate.step_time_s)
    assert sgd.plan.estimate.step_time_s < pm.plan.estimate.step_time_s
    sgd.close()
    return loss


def _per_block_recompute() -> dict:
    """A 1F1B plan whose stages recompute some of their blocks (per-block checkpoints),
    against the same plan without: the same parameters; a forward keeps fewer bytes."""
    import dataclasses

    import torch.distributed as dist
    from torch.testing import assert_close

    from tripar.codegen.recompute import Recomputed

    loaded = load_model("gpt:layers=4,hidden=32,heads=4,vocab=64,seq=8", batch_size=4)
    captured = api.capture_model(loaded.model, loaded.example_inputs)

    def sgd(ps):
        return torch.optim.SGD(ps, lr=0.1)

    plain = api.auto_parallel(loaded.model, captured=captured, optimizer=sgd, pp=2,
                              num_microbatches=4, schedule="1f1b", recompute="none")
    stages = tuple(dataclasses.replace(s, recompute=s.blocks[1:3]) for s in plain.plan.stages)
    plan = dataclasses.replace(plain.plan, stages=stages, parallel=dataclasses.replace(
        plain.plan.parallel, recompute="stage-aware"))
    out = {}
    for name, pm in (("plain", plain), ("recompute", None)):
        if pm is None:
            pm = api.auto_parallel(loaded.model, captured=captured, optimizer=sgd, plan=plan)
        for _ in range(2):
            pm.train_step(loaded.example_inputs)
        (prog,) = pm.programs
        out[name] = (_forward_saved_bytes(prog, loaded.example_inputs), pm.full_state_dict(),
                     sum(isinstance(m, Recomputed) for m in prog.module.modules()))
        pm.close()
    for key, value in out["plain"][1].items():
        assert_close(out["recompute"][1][key], value, rtol=1e-6, atol=1e-6)
    return {"rank": dist.get_rank(), "plain": out["plain"][0], "recompute": out["recompute"][0],
            "segments": out["recompute"][2], "plain_segments": out["plain"][2]}


def _forward_saved_bytes(prog, batch) -> int:
    """Bytes one microbatch's forward of a stage keeps for its backward (each storage once,
    weights excluded)."""
    inputs = [torch.randn(spec.shape, requires_grad=True) for spec in prog.received]
    fields = [batch[k][:1] for k in prog.batch_inputs]
    weights = {p.untyped_storage().data_ptr() for p in prog.module.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        prog.module(*inputs, *fields)
    return sum(kept.values())


def test_the_plans_per_block_recompute_runs_and_changes_nothing_but_memory():
    for r in run_ranks(_per_block_recompute, 2, timeout_s=120):
        print(r)
        assert r["plain_segments"] == 0 and r["segments"] == 2, r  # two blocks per stage
        assert r["recompute"] < 0.8 * r["plain"], r  # the two blocks keep their inputs only


def _meta_model_under_tp_and_pp() -> float:
    """A model built on the meta device: each rank initialises only its own slices (tp) or
    stages (pp), under one seed; both give the same whole model, and train alike."""
    from torch.testing import assert_close

    spec = "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8"
    meta = load_model(spec, batch_size=4, device="meta")
    batch = load_model(spec, batch_size=4).example_inputs
    states, losses = [], []
    for tp, pp in ((2, 1), (1, 2)):
        pm = api.auto_parallel(meta.model, example_inputs=batch, tp=tp, pp=pp,
                               num_microbatches=2, schedule="1f1b", seed=3,
                               optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
        assert not any(p.is_meta for p in pm.parameters())
        if tp == 2:
            # slices, initialised locally
            assert any(lp.param.numel() * 2 == torch.Size(lp.shape).numel() for lp in pm.params)
        states.append(pm.full_state_dict())
        losses.append(pm.train_step(batch))
        pm.close()
    for key, value in states[1].items():
        assert torch.equal(states[0][key], value), key
    assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    return losses[0]


def test_a_meta_model_is_initialised_slice_by_slice_under_tensor_parallelism():
    losses = run_ranks(_meta_model_under_tp_and_pp, 2, timeout_s=120)
    assert losses[0] == losses[1] and 3.5 < losses[0] < 5
