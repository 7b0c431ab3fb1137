"""bf16 autocast with fp32 master weights: the stage wrapper and the precision names.

Parallel bf16 training is compared with one process's autocast run in the parity matrix
(tests/runtime/test_engine.py: bf16 rows for every schedule on gpt and llama, under
pipeline, data and tensor parallelism)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tripar import api
from tripar.errors import ConfigError
from tripar.models import load_model
from tripar.runtime.precision import Autocast, check_precision


def test_autocast_casts_what_leaves_the_stage_and_refuses_unknown_precisions():
    stage = Autocast(torch.nn.Linear(4, 4), "bf16", torch.device("cpu"))
    seen = []
    stage.module.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = stage(torch.ones(2, 4))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert check_precision("fp32") is None
    with pytest.raises(ConfigError, match="unknown precision 'fp16'.*fp32, bf16"):
        check_precision("fp16")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="needs transformers (an optional extra)")
def test_a_transformers_model_trains_under_bf16():
    """torch.export records each value's dtype in ``_assert_tensor_metadata`` checks;
    under autocast a linear's output is bf16, so the stages run without those checks."""
    spec = "hf:GPT2LMHeadModel:n_layer=1,n_embd=32,n_head=4,vocab_size=64,n_positions=16"
    loaded = load_model(spec, batch_size=2, seq_len=8)
    batch = loaded.example_kwargs
    pm = api.auto_parallel(loaded.model, 1, example_inputs=loaded.example_inputs,
                           example_kwargs=batch, precision="bf16", global_batch_size=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = float(loaded.model(**batch))
    got = pm.train_step(batch)
    pm.close()
    torch.distributed.destroy_process_group()  # the one-process group auto_parallel made
    assert got == pytest.approx(want, rel=2e-2)
