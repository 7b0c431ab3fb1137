"""TensorSpec: what crosses a cut (the transfers themselves run in test_executor)."""

from __future__ import annotations

import pytest
import torch

from tripar.errors import ConfigError
from tripar.runtime.p2p import TensorSpec


def test_spec_defaults_and_buffers():
    f, i = TensorSpec([2, 3]), TensorSpec((2,), torch.int64)
    assert f.shape == (2, 3) and f.needs_grad and not i.needs_grad
    assert not TensorSpec((1,), requires_grad=False).needs_grad
    buf = i.empty(torch.device("cpu"))
    assert buf.shape == (2,) and buf.dtype == torch.int64
    assert TensorSpec.of(torch.zeros(4, 5)) == TensorSpec((4, 5))


def test_spec_check_names_the_mismatch():
    spec = TensorSpec((2, 3))
    t = torch.zeros(2, 3)
    assert spec.check(t, "x") is t
    with pytest.raises(ConfigError, match=r"stage 1's output 0 has shape \(2, 4\)"):
        spec.check(torch.zeros(2, 4), "stage 1's output 0")
    with pytest.raises(ConfigError, match="is a tuple"):
        spec.check((t,), "y")


def test_microbatch_split_rules():
    from tripar.runtime.executor import split_microbatches

    mbs = split_microbatches({"x": torch.arange(6), "y": torch.ones(6, 2)}, 3)
    assert [mb["x"].tolist() for mb in mbs] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ConfigError, match="not divisible by num_microbatches=4"):
        split_microbatches((torch.zeros(6),), 4)
    with pytest.raises(ConfigError, match="different batch sizes"):
        split_microbatches((torch.zeros(6), torch.zeros(4)), 2)
