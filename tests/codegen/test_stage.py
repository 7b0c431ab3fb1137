"""TensorSpec and StageProgram: what crosses a cut, and one stage's record (the transfers
themselves run in tests/runtime/test_executor.py)."""

from __future__ import annotations

import pytest
import torch

from tripar.codegen.stage import StageProgram, TensorSpec
from tripar.errors import ConfigError


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


def test_spec_names_dtypes_and_non_tensors():
    spec = TensorSpec((2, 8), torch.int64, name="input_ids")
    assert spec.dtype_name == "int64" and spec.is_tensor and not spec.needs_grad
    const = TensorSpec((), "int", name="n")
    assert const.dtype_name == "int" and not const.is_tensor and not const.needs_grad


def test_program_needs_a_module_and_knows_its_place():
    with pytest.raises(ConfigError, match="stage 1: module must be an nn.Module"):
        StageProgram(1, lambda x: x)
    program = StageProgram(1, torch.nn.Identity(), num_stages=2)
    assert program.is_last and not program.is_first
