"""MODEL spec parsing and load_model across every zoo family."""

from __future__ import annotations

import pytest
import torch

from tripar.errors import ConfigError, ModelSpecError
from tripar.models import LoadedModel, load_model, parse_spec
from tripar.models.spec import ZOO, build_config, normalise

SMALL = {
    "gpt": "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8",
    "llama": "llama:layers=2,hidden=32,heads=4,kv_heads=2,vocab=64,seq=8,ffn=48",
    "bert": "bert:layers=2,hidden=32,heads=4,vocab=64,seq=8",
    "vit": "vit:image=16,patch=4,layers=2,hidden=32,heads=4,classes=5",
    "resnet": "resnet:blocks=1-2,width=8,image=16,classes=5",
    "t5": "t5:enc_layers=2,dec_layers=1,hidden=32,heads=4,vocab=64,seq=8",
}


def test_every_family_has_a_small_spec():
    assert set(SMALL) == set(ZOO)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_meta_build_allocates_nothing(family):
    loaded = load_model(SMALL[family], batch_size=2, device="meta")
    tensors = [*loaded.model.parameters(), *loaded.model.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert all(t.device.type == "meta" for t in loaded.example_inputs)
    assert loaded.family == family
    assert loaded.example_inputs[0].shape[0] == 2
    loss = loaded.model(*loaded.example_inputs)
    assert loss.device.type == "meta" and loss.shape == ()
    traced = torch.fx.symbolic_trace(loaded.model)  # what graph capture does
    assert traced(*loaded.example_inputs).shape == ()


@pytest.mark.parametrize("family", sorted(SMALL))
def test_cpu_loss_backward_and_fx_trace(family):
    loaded = load_model(SMALL[family], batch_size=2)
    model = loaded.model
    assert all(p.device.type == "cpu" for p in model.parameters())
    loss = model(*loaded.example_inputs)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(*loaded.example_inputs), loss.detach())


@pytest.mark.parametrize("family", sorted(SMALL))
def test_meta_then_materialise_equals_cpu_build(family):
    cpu = load_model(SMALL[family], batch_size=2, seed=3)
    meta = load_model(SMALL[family], batch_size=2, seed=3, device="meta")
    meta.model.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.model.init_weights()
    for (name, a), (_, b) in zip(cpu.model.state_dict().items(),
                                 meta.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(meta.model(*cpu.example_inputs), cpu.model(*cpu.example_inputs))


def test_same_seed_same_model_other_seed_differs():
    a, b, c = (load_model(SMALL["gpt"], seed=s) for s in (0, 0, 1))
    assert torch.equal(a.model.wte.weight, b.model.wte.weight)
    assert torch.equal(a.example_inputs[0], b.example_inputs[0])
    assert not torch.equal(a.model.wte.weight, c.model.wte.weight)
    assert not torch.equal(a.example_inputs[0], c.example_inputs[0])


def test_loading_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model(SMALL["gpt"])
    assert torch.equal(torch.rand(3), expected)


def test_bare_family_gives_small_default():
    loaded = load_model("gpt")
    assert loaded.spec == "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32,ffn=256,dropout=0.0,attention=sdpa"
    assert sum(p.numel() for p in loaded.model.parameters()) < 1_000_000
    assert isinstance(loaded, LoadedModel) and loaded.example_kwargs == {}


def test_normalised_spec_round_trips():
    for family, spec in SMALL.items():
        loaded = load_model(spec, device="meta")
        again = load_model(loaded.spec, device="meta")
        assert again.spec == loaded.spec, family
        assert parse_spec(loaded.spec)[0] == family


def test_seq_len_overrides_spec_seq():
    loaded = load_model(SMALL["gpt"], batch_size=3, seq_len=12)
    assert loaded.example_inputs[0].shape == (3, 12)
    assert loaded.config["seq"] == 12 and "seq=12" in loaded.spec
    assert loaded.model.wpe.weight.shape[0] == 12


def test_config_sizes_are_plain_ints():
    config = load_model(SMALL["llama"], device="meta").config
    assert config == {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "head_dim": 8,
                      "vocab": 64, "seq": 8, "ffn": 48}
    assert load_model(SMALL["t5"], device="meta").config["layers"] == 3


def test_parse_spec_forms():
    assert parse_spec(" GPT:layers=2, hidden=64 ,") == ("gpt", {"layers": "2", "hidden": "64"})
    assert parse_spec("bert") == ("bert", {})
    assert parse_spec("hf:BertForMaskedLM") == ("hf", {"class": "BertForMaskedLM"})
    assert parse_spec("dir/m.py:make") == ("file", {"path": "dir/m.py", "function": "make"})
    assert parse_spec("resnet:blocks=3-4-6-3")[1] == {"blocks": "3-4-6-3"}


@pytest.mark.parametrize(
    "spec, words",
    [
        ("", ["empty"]),
        ("gpt2:layers=2", ["unknown model 'gpt2'", "llama"]),
        ("gpt:layer=2", ["'layer'", "gpt accepts: layers, hidden, heads"]),
        ("gpt:layers=two", ["layers='two'", "gpt accepts"]),
        ("gpt:layers=0", ["layers=0", "positive"]),
        ("gpt:hidden=100,heads=3", ["hidden=100", "heads=3", "hidden=99 or hidden=102",
                                    "gpt accepts"]),
        ("llama:heads=4,kv_heads=3", ["heads=4", "kv_heads=3", "llama accepts"]),
        ("gpt:layers", ["'layers' is not key=value"]),
        ("gpt:layers=2,layers=3", ["given twice"]),
        ("gpt:dropout=1.5", ["dropout=1.5"]),
        ("vit:image=30,patch=8", ["image=30", "patch=8"]),
        ("resnet:blocks=3-x", ["blocks='3-x'", "3-4-6-3"]),
        ("model.py", ["no function", "model.py:function"]),
        ("hf:", ["transformers class"]),
    ],
)
def test_spec_errors_name_the_problem(spec, words):
    with pytest.raises(ModelSpecError) as info:
        load_model(spec, device="meta")
    for word in words:
        assert word in str(info.value)


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="batch_size=0"):
        load_model("gpt", batch_size=0)
    with pytest.raises(ConfigError, match="device='gpu0'"):
        load_model("gpt", device="gpu0")


def test_build_config_and_normalise_agree():
    config = build_config("resnet", {"blocks": "3-4-6-3", "width": "64"})
    assert config.blocks == (3, 4, 6, 3)
    assert normalise("resnet", config).startswith("resnet:blocks=3-4-6-3,width=64")
