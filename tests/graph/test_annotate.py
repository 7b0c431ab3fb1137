"""tripar.graph.annotate: measured FLOPs, saved bytes and parameters per node."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tripar.graph import analyze
from tripar.graph.annotate import _EXTRA_FLOP_FORMULAS, annotate
from tripar.graph.capture import capture
from tripar.models.spec import load_model

SMALL_GPT = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=16"


def _infos(gm: torch.fx.GraphModule) -> dict:
    return {n.name: n.meta["tripar"] for n in gm.graph.nodes}


def test_node_flops_add_up_to_flop_counter_on_a_real_cpu_step() -> None:
    torch.manual_seed(0)
    loaded = load_model(SMALL_GPT, batch_size=2, device="cpu")
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        loss = loaded.model(*loaded.example_inputs)
        forward = counter.get_total_flops()
        loss.backward()
    backward = counter.get_total_flops() - forward
    for method in ("fx", "export"):
        gm = capture(loaded.model, loaded.example_inputs, method=method)
        annotate(gm, loaded.example_inputs)
        infos = _infos(gm).values()
        assert sum(i.forward_flops for i in infos) == forward
        assert sum(i.backward_flops for i in infos) == backward
        assert all(p.device.type == "cpu" for p in gm.parameters())  # weights untouched


def test_backward_flops_go_to_the_node_that_made_them() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    gm = torch.fx.symbolic_trace(model)
    annotate(gm, (torch.empty(3, 8),))
    infos = _infos(gm)
    # first linear: the input needs no gradient, so only dW: 2*3*8*16
    assert infos["_0"].forward_flops == 2 * 3 * 8 * 16
    assert infos["_0"].backward_flops == 2 * 3 * 8 * 16
    # second linear: dX and dW
    assert infos["_2"].backward_flops == 2 * (2 * 3 * 16 * 4)
    assert infos["_1"].forward_flops == infos["_1"].backward_flops == 0
    assert infos["_0"].matmuls == ((3, 8, 16),)
    assert infos["_2"].params == 16 * 4 + 4 and infos["_2"].param_bytes == 4 * (16 * 4 + 4)
    assert infos["_2"].shapes == ((3, 4),) and infos["_2"].dtypes == ("float32",)


def test_gpt_flops_match_megatron_formula() -> None:
    B, s, layers, h, V = 1, 128, 4, 256, 1024
    loaded = load_model(f"gpt:layers={layers},hidden={h},heads=8,vocab={V},seq={s}",
                        batch_size=B, device="meta")
    proxy = analyze(loaded.model, loaded.example_inputs)
    total = sum(b.forward_flops + b.backward_flops for b in proxy.blocks)
    expected = 72 * B * s * layers * h**2 * (1 + s / (6 * h) + V / (12 * layers * h))
    assert abs(total - expected) / expected < 0.02
    forward = sum(b.forward_flops for b in proxy.blocks)
    assert abs(forward * 3 - expected) / expected < 0.02


def _eager_saved_bytes_per_block(model: nn.Module, inputs: tuple) -> dict[str, int]:
    """Saved-for-backward bytes of a real CPU forward, attributed to the top-level blocks."""
    weights = {t.untyped_storage().data_ptr() for t in model.parameters()}
    weights |= {t.untyped_storage().data_ptr() for t in model.buffers()}
    current = ["wte+wpe+drop"]
    saved: dict[str, int] = {}
    seen: set[int] = set()
    handles = []
    for name in ("wte", "wpe", "drop", "ln_f", "lm_head"):
        block = "wte+wpe+drop" if name in ("wte", "wpe", "drop") else name
        handles.append(getattr(model, name).register_forward_pre_hook(
            lambda *_, b=block: current.__setitem__(0, b)))
    for i, layer in enumerate(model.blocks):
        handles.append(layer.register_forward_pre_hook(
            lambda *_, b=f"blocks.{i}": current.__setitem__(0, b)))
    handles.append(model.lm_head.register_forward_hook(
        lambda *_: current.__setitem__(0, "loss")))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in weights and key not in seen:
            seen.add(key)
            saved[current[0]] = saved.get(current[0], 0) + storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(*inputs)
    for handle in handles:
        handle.remove()
    loss.backward()
    return saved


@pytest.mark.parametrize("spec", [SMALL_GPT, "gpt:layers=3,hidden=96,heads=6,vocab=200,seq=24"])
def test_saved_bytes_per_block_match_a_real_cpu_forward(spec: str) -> None:
    loaded = load_model(spec, batch_size=2, device="cpu")
    reference = _eager_saved_bytes_per_block(loaded.model, loaded.example_inputs)
    meta = load_model(spec, batch_size=2, device="meta")
    proxy = analyze(meta.model, meta.example_inputs)
    measured = {b.name: b.saved_bytes for b in proxy.blocks}
    assert set(measured) == set(reference) | {b for b, v in measured.items() if v == 0}
    for name, expected in reference.items():
        assert abs(measured[name] - expected) <= 0.05 * expected, name
    assert sum(measured.values()) == sum(reference.values())


def test_saved_bytes_exclude_weights_and_count_a_storage_once() -> None:
    class TwoUses(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.tanh(x)  # saves its output y
            return self.a(y) * y  # linear and mul save y again: same storage

    gm = torch.fx.symbolic_trace(TwoUses())
    annotate(gm, (torch.empty(4, 8, requires_grad=True),))
    infos = _infos(gm)
    assert infos["tanh"].saved_bytes == 4 * 8 * 4
    assert infos["a"].saved_bytes == 0  # y already counted; the weight is not an activation
    assert infos["mul"].saved_bytes == 4 * 8 * 4  # the linear output


def test_tied_parameter_counted_once() -> None:
    loaded = load_model(SMALL_GPT, batch_size=1, device="meta")
    unique = sum(p.numel() for p in loaded.model.parameters())
    for method in ("fx", "export"):
        gm = capture(loaded.model, loaded.example_inputs, method=method)
        annotate(gm, loaded.example_inputs)
        infos = _infos(gm).values()
        assert sum(i.params for i in infos) == unique
        names = [n for i in infos for n in i.param_names]
        assert "wte.weight" in names and "lm_head.weight" not in names
        assert len(names) == len(set(names))


def test_annotate_does_not_allocate_real_memory_for_a_big_model() -> None:
    loaded = load_model("gpt:layers=2,hidden=8192,heads=64,vocab=50000,seq=2048",
                        batch_size=8, device="meta")
    gm = capture(loaded.model, loaded.example_inputs)
    annotate(gm, loaded.example_inputs)
    head = gm.graph.find_nodes(op="call_module", target="lm_head")[0].meta["tripar"]
    assert head.shapes == ((8, 2048, 50000),)
    assert head.forward_flops == 2 * 8 * 2048 * 8192 * 50000
