"""bf16 autocast with fp32 master weights: parallel training follows one process's autocast run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from tests._ranks import run_ranks
from tripar import api
from tripar.errors import ConfigError
from tripar.runtime.precision import Autocast, check_precision


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def _reference(name: str, precision: str) -> dict[str, torch.Tensor]:
    """One process, the same one-sample microbatches, under the same autocast."""
    import test_engine as te

    loaded, _ = te._model(name)
    batches = te.batches(name)
    model = copy.deepcopy(loaded.model)
    optimizer = _sgd(list(model.parameters()))
    for batch in batches:
        for k in range(te.GLOBAL_BATCH):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = te._forward(model, te._micro(batch, k))
            (loss.float() / te.GLOBAL_BATCH).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(name: str, tp: int, pp: int) -> dict:
    import test_engine as te

    loaded, captured = te._model(name)
    batches = te.batches(name)
    pm = api.auto_parallel(loaded.model, captured=captured, example_inputs=loaded.example_inputs,
                           optimizer=_sgd, global_batch_size=te.GLOBAL_BATCH, dp=1, tp=tp,
                           pp=pp, num_microbatches=te.GLOBAL_BATCH, schedule="1f1b",
                           precision="bf16", timeout_s=30)
    assert pm.plan.inputs.dtype == "bf16"  # the plan was costed for bf16 compute
    losses = [pm.train_step(b) for b in batches]
    dtypes = {str(p.dtype) for p in pm.parameters()} | {
        str(p.grad.dtype) for p in pm.parameters() if p.grad is not None}
    full = pm.full_state_dict()
    pm.close()
    if torch.distributed.get_rank() > 0:  # rank 0 compares for all
        return {"dtypes": sorted(dtypes), "losses": losses}
    bf16, fp32 = _reference(name, "bf16"), _reference(name, "fp32")
    start = loaded.model.state_dict()
    if tp == 1:  # the same ops in the same order as one process
        for key, value in bf16.items():
            assert_close(full[key], value, rtol=1e-5, atol=1e-5,
                         msg=lambda m, key=key: f"{key}: {m}")
    return {"dtypes": sorted(dtypes), "losses": losses,
            "to_bf16": _update_error(full, bf16, start), "to_fp32": _update_error(full, fp32, start)}


def _update_error(got: dict, want: dict, start: dict) -> float:
    """||got - want|| / ||want - start|| over all parameters: how far the training updates
    differ, relative to their size."""
    diff = sum(float((got[k] - v).double().pow(2).sum()) for k, v in want.items())
    size = sum(float((v - start[k]).double().pow(2).sum()) for k, v in want.items())
    return (diff / size) ** 0.5


@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 1)], ids=["pp2", "tp2"])
def test_bf16_autocast_matches_one_process_autocast(tp, pp):
    results = run_ranks(_train, 2, "gpt", tp, pp, timeout_s=120)
    for r in results:
        assert r["dtypes"] == ["torch.float32"]  # master weights and gradients stay fp32
        assert r["losses"] == results[0]["losses"]
    r = results[0]
    print(r)
    if tp == 1:  # it really ran in bf16: its updates are the autocast run's, not fp32's
        assert r["to_bf16"] < 1e-5 and r["to_fp32"] > 100 * r["to_bf16"], r
    else:  # sharded matmuls round bf16 partial sums apart: updates agree within 1%
        assert r["to_bf16"] < 1e-2, r


def test_autocast_casts_what_leaves_the_stage_and_refuses_unknown_precisions():
    stage = Autocast(torch.nn.Linear(4, 4), "bf16", torch.device("cpu"))
    seen = []
    stage.module.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = stage(torch.ones(2, 4))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert check_precision("fp32") is None
    with pytest.raises(ConfigError, match="unknown precision 'fp16'.*fp32, bf16"):
        check_precision("fp16")
