"""The one fake-tensor run of a graph: every node's value, as a real run would shape it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from tripar.graph import FakeInterpreter, node_values
from tripar.graph.capture import capture, flat_graph_inputs
from tripar.graph.values import meta_values
from tripar.models.spec import load_model

SMALL_GPT = "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8"


def _loaded(device: str = "cpu") -> tuple[Any, torch.fx.GraphModule, list[Any]]:
    loaded = load_model(SMALL_GPT, batch_size=2, device=device)
    gm = capture(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    return loaded, gm, flat_graph_inputs(gm, loaded.example_inputs, loaded.example_kwargs)


def test_every_node_has_the_shape_and_dtype_of_a_real_run() -> None:
    _, gm, flat = _loaded()
    values = node_values(gm, flat)
    ShapeProp(gm).propagate(*flat)
    tensors = [n for n in gm.graph.nodes if isinstance(n.meta.get("tensor_meta"), TensorMetadata)]
    assert len(tensors) > 50
    for node in tensors:
        real = node.meta["tensor_meta"]
        fake = values[node.name]
        assert (tuple(fake.shape), fake.dtype) == (tuple(real.shape), real.dtype), node.name
        assert isinstance(fake, FakeTensor) and fake.device.type == "cpu"


def test_a_meta_model_runs_without_memory_and_its_weights_are_left_alone() -> None:
    loaded, gm, flat = _loaded("meta")
    before = {k: v for k, v in gm.named_parameters()}
    values = node_values(gm, flat)
    assert values["output"].dim() == 0  # the loss
    assert all(v.device.type == "meta" for v in gm.parameters())
    assert {k: v for k, v in gm.named_parameters()} == before


def test_a_module_with_meta_forward_runs_that_instead_of_its_forward() -> None:
    class Collective(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("would communicate")

        def meta_forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x], -1)

    gm = capture(nn.Sequential(nn.Linear(4, 4), Collective()), leaf_modules=[Collective])
    assert tuple(node_values(gm, [torch.ones(2, 4)])["_1"].shape) == (2, 8)


def test_a_baked_meta_device_reads_as_the_fake_device() -> None:
    gm = torch.fx.symbolic_trace(lambda x: x + torch.ones(3, device=torch.device("meta")))
    assert node_values(gm, [torch.ones(3)])["add"].device.type == "cpu"
    assert node_values(gm, [torch.ones(3)], device="meta")["add"].device.type == "meta"


def test_a_pass_overrides_record_and_names_the_failing_node() -> None:
    class Shapes(FakeInterpreter):
        def __init__(self, gm: torch.fx.GraphModule) -> None:
            super().__init__(gm)
            self.shapes: dict[str, tuple[int, ...]] = {}

        def record(self, node: torch.fx.Node, value: Any) -> None:
            if isinstance(value, torch.Tensor):
                self.shapes[node.name] = tuple(value.shape)

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.Linear(4, 2)))
    run = Shapes(gm)
    with pytest.raises(RuntimeError):
        run.propagate(torch.ones(3, 4))
    assert run.shapes == {"input_1": (3, 4), "_0": (3, 8)} and run.current == "_1"
    assert run.values == {}


def test_meta_values_prefer_recorded_values_and_survive_nodes_that_cannot_run() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            n = x.sum().item()  # data-dependent: no fake value
            return x * 2, x * n

    gm = torch.fx.symbolic_trace(M())
    vals = meta_values(gm, [torch.ones(3)])
    assert vals["item"] is None and vals["mul_1"] is None  # and everything after it
    assert vals["mul"].device.type == "meta" and tuple(vals["mul"].shape) == (3,)
    next(iter(gm.graph.nodes)).meta["val"] = torch.empty(5, device="meta")
    assert tuple(meta_values(gm, [torch.ones(3)])["mul"].shape) == (5,)
