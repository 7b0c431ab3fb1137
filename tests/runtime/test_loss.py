"""The model's own loss, whatever its output type (``tripar.runtime.loss.model_loss``)."""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch

from tripar.errors import ConfigError
from tripar.runtime.loss import model_loss

LOSS = torch.tensor(1.5)
LOGITS = torch.zeros(2, 3, 8)


@pytest.mark.parametrize("output", [
    LOSS, LOSS.reshape(1), LOSS.reshape(1, 1),
    {"loss": LOSS, "logits": LOGITS}, OrderedDict(logits=LOGITS, loss=LOSS),
    SimpleNamespace(loss=LOSS, logits=LOGITS),
    (LOSS, LOGITS), [LOSS.reshape(1), LOGITS],
], ids=["scalar", "1-elem", "1x1", "dict", "ordered", "attribute", "tuple", "list"])
def test_the_loss_is_found_in_every_output_form(output):
    loss = model_loss(output)
    assert loss.shape == () and loss.item() == 1.5


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers")
def test_a_transformers_model_output_gives_its_loss():
    from transformers.modeling_outputs import CausalLMOutput

    out = CausalLMOutput(loss=LOSS, logits=LOGITS)
    assert model_loss(out) is not None and model_loss(out).item() == 1.5
    with pytest.raises(ConfigError, match=r"CausalLMOutput with keys \['logits'\].*"
                                          r"out\[\"logits\"\]"):
        model_loss(CausalLMOutput(logits=LOGITS))  # no labels, no loss


def test_loss_fn_decides_when_given():
    batch = {"labels": torch.zeros(2, 3, dtype=torch.long)}
    loss = model_loss({"logits": LOGITS}, batch, lambda out, mb: out["logits"].sum() + 2)
    assert loss.item() == 2.0
    with pytest.raises(ConfigError, match="loss_fn.*scalar tensor, got a tensor of shape"):
        model_loss(LOGITS, batch, lambda out, mb: out)


@pytest.mark.parametrize("output, named, fix", [
    ({"logits": LOGITS}, r"a dict with keys \['logits'\]", r'out\["logits"\]'),
    ((LOGITS, LOSS), r"a tuple of 2 whose first element is a tensor of shape \(2, 3, 8\)",
     r"out\[0\]"),
    (LOGITS, r"a tensor of shape \(2, 3, 8\)", r"cross_entropy\(out\.flatten"),
    (SimpleNamespace(logits=LOGITS), "a SimpleNamespace", r"out\.logits"),
    ("text", "a str", "loss_fn=lambda out, mb:"),
    ({"loss": None, "logits": LOGITS}, "a dict", r'out\["logits"\]'),
])
def test_no_loss_names_the_type_and_shows_a_loss_fn(output, named, fix):
    with pytest.raises(ConfigError, match=f"the last stage \\(1\\) returned {named}") as info:
        model_loss(output, where="the last stage (1)")
    assert "loss_fn=lambda out, mb:" in str(info.value)
    assert info.match(fix)


def test_the_suggested_loss_fn_works():
    """The suggestion is code: it runs on the output and a batch with labels."""
    output = {"logits": torch.randn(2, 3, 8)}
    batch = {"labels": torch.randint(0, 8, (2, 3))}
    with pytest.raises(ConfigError) as info:
        model_loss(output)
    code = str(info.value).split("loss_fn=", 1)[1].split(" (or,", 1)[0]
    fn = eval(code, {"torch": torch})  # noqa: S307 - the message's own example
    assert model_loss(output, batch, fn).shape == ()
