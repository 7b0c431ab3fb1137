"""``file.py:function`` MODEL specs."""

from __future__ import annotations

import textwrap

import pytest
import torch

from tripar.errors import ModelSpecError
from tripar.models import load_model

SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, y):
            return F.cross_entropy(self.fc(x), y)

    class WithExamples(Tiny):
        def example_inputs(self, batch_size, seq_len):
            return torch.randn(batch_size, 4), torch.zeros(batch_size, dtype=torch.long)

    def pair(batch_size):
        return Tiny(), (torch.randn(batch_size, 4), torch.zeros(batch_size, dtype=torch.long))

    def triple():
        return Tiny(), (torch.randn(2, 4),), {"y": torch.ones(2, dtype=torch.long)}

    def method():
        return WithExamples()

    def bare():
        return Tiny()

    def wrong():
        return 42

    def zoo():
        from tripar.models.gpt import GPT, GPTConfig
        return GPT(GPTConfig(layers=1, hidden=16, heads=2, vocab=20, seq=4))
    """
)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(SOURCE)
    return str(path)


def test_module_and_inputs(model_file):
    loaded = load_model(f"{model_file}:pair", batch_size=5)
    assert loaded.family == "file" and loaded.spec == f"{model_file}:pair"
    assert loaded.example_inputs[0].shape == (5, 4)
    loss = loaded.model(*loaded.example_inputs, **loaded.example_kwargs)
    assert loss.shape == () and torch.isfinite(loss)


def test_module_inputs_and_kwargs(model_file):
    loaded = load_model(f"{model_file}:triple")
    assert set(loaded.example_kwargs) == {"y"}
    assert loaded.model(*loaded.example_inputs, **loaded.example_kwargs).shape == ()


def test_module_with_example_inputs_method(model_file):
    loaded = load_model(f"{model_file}:method", batch_size=3)
    assert loaded.example_inputs[0].shape == (3, 4)


def test_meta_device_builds_under_meta(model_file):
    loaded = load_model(f"{model_file}:pair", device="meta")
    assert all(p.device.type == "meta" for p in loaded.model.parameters())
    assert all(t.device.type == "meta" for t in loaded.example_inputs)


def test_zoo_model_from_a_file_reports_its_sizes(model_file):
    loaded = load_model(f"{model_file}:zoo", batch_size=2)
    assert loaded.config["layers"] == 1 and loaded.config["vocab"] == 20
    assert loaded.example_inputs[0].shape == (2, 4)
    assert loaded.model(*loaded.example_inputs).shape == ()


def test_seed_makes_file_models_deterministic(model_file):
    a = load_model(f"{model_file}:pair", seed=7)
    b = load_model(f"{model_file}:pair", seed=7)
    assert torch.equal(a.model.fc.weight, b.model.fc.weight)
    assert torch.equal(a.example_inputs[0], b.example_inputs[0])


@pytest.mark.parametrize(
    "function, words",
    [
        ("bare", ["without an example_inputs(batch_size, seq_len) method",
                  "(module, example_inputs)"]),
        ("wrong", ["returned int", "must return an nn.Module"]),
        ("missing", ["no function 'missing'", "pair"]),
    ],
)
def test_errors_say_what_the_function_must_return(model_file, function, words):
    with pytest.raises(ModelSpecError) as info:
        load_model(f"{model_file}:{function}")
    for word in words:
        assert word in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ModelSpecError, match="not a file"):
        load_model(f"{tmp_path}/nope.py:make")


def test_import_error_is_reported(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import not_a_real_module_xyz\n")
    with pytest.raises(ModelSpecError, match="importing .* failed: ModuleNotFoundError"):
        load_model(f"{path}:make")
