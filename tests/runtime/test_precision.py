"""bf16 autocast with fp32 master weights: the stage wrapper and the precision names.

Parallel bf16 training is compared with one process's autocast run in the parity matrix
(tests/runtime/test_engine.py: bf16 rows for every schedule on gpt and llama, under
pipeline, data and tensor parallelism)."""

from __future__ import annotations

import pytest
import torch

from tripar.errors import ConfigError
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
