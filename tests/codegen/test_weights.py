"""Weights: a stage built from a meta model holds exactly its own tensors, equal to the
same tensors of a full CPU build with the same seed; the parameter map."""

from __future__ import annotations

import json

import pytest
import torch

from tests.codegen.conftest import SPECS, captured, run_pipeline
from tripar.codegen.split import block_nodes, even_stage_blocks, split_by_blocks
from tripar.codegen.weights import init_tensors, materialize_stage, param_map, param_map_json
from tripar.errors import PlanError
from tripar.graph.capture import capture, flat_graph_inputs
from tripar.models import load_model


def _meta_split(name: str, pp: int):
    spec = SPECS[name]
    seq = 8 if spec.startswith("hf:") else None
    meta = load_model(spec, batch_size=2, seq_len=seq, device="meta")
    gm = capture(meta.model, meta.example_inputs, meta.example_kwargs)
    flat = flat_graph_inputs(gm, meta.example_inputs, meta.example_kwargs)
    return meta, split_by_blocks(gm, even_stage_blocks(list(block_nodes(gm)), pp), flat)


@pytest.mark.parametrize("name", ["gpt", "llama", "resnet", "t5", "hf_gpt2", "hf_llama"])
def test_meta_stages_equal_a_full_cpu_build(name: str) -> None:
    meta, split = _meta_split(name, 2)
    full, _, flat = captured(name)  # load_model on CPU with seed 0
    reference = dict(full.model.named_parameters(remove_duplicate=False))
    reference.update(full.model.named_buffers(remove_duplicate=False))
    modules = []
    for stage in split.stages:
        module = materialize_stage(stage, meta_model=meta.model, seed=0)
        fqn = dict(stage.params)
        held = dict(module.named_parameters(remove_duplicate=False))
        assert set(held) == set(fqn)
        for local, tensor in held.items():
            assert tensor.device.type == "cpu"
            torch.testing.assert_close(tensor, reference[fqn[local]], rtol=0, atol=0,
                                       msg=lambda m, n=local: f"{name} {n}: {m}")
        for local, buffer in module.named_buffers():
            if local in reference:
                torch.testing.assert_close(buffer, reference[local], rtol=0, atol=0)
        modules.append(module)
    # and the materialised stages compute the model's loss
    loss = run_pipeline(split, modules, flat)
    expected = full.model(*full.example_inputs, **full.example_kwargs).detach()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def test_only_the_stages_parameters_are_allocated() -> None:
    meta, split = _meta_split("gpt", 4)
    middle = split.stages[1]
    module = materialize_stage(middle, meta_model=meta.model, seed=0)
    names = [n for n, _ in module.named_parameters()]
    assert names and all(n.startswith(("blocks.1.", "ln_f.")) for n in names)
    assert sum(p.numel() for p in module.parameters()) < sum(
        p.numel() for p in meta.model.parameters()) / 2
    assert all(p.device.type == "meta" for p in meta.model.parameters())  # left untouched


def test_slice_from_a_real_model_copies() -> None:
    loaded, gm, flat = captured("gpt")
    split = split_by_blocks(gm, even_stage_blocks(list(block_nodes(gm)), 2), flat)
    module = materialize_stage(split.stages[1], source=loaded.model)
    weight = module.get_parameter("lm_head.weight")
    assert torch.equal(weight, loaded.model.wte.weight)
    assert weight.data_ptr() != loaded.model.wte.weight.data_ptr()


def test_init_tensors_refuses_unknown_names() -> None:
    meta = load_model(SPECS["gpt"], batch_size=2, device="meta")
    with pytest.raises(PlanError, match="no parameter or buffer"):
        init_tensors(meta.model, ["blocks.9.ln_1.weight"])
    with pytest.raises(PlanError, match="exactly one"):
        materialize_stage(_meta_split("gpt", 2)[1].stages[0])


def test_param_map_json() -> None:
    _, gm, flat = captured("gpt")
    split = split_by_blocks(gm, even_stage_blocks(list(block_nodes(gm)), 2), flat)
    data = json.loads(param_map_json(split))
    assert data == param_map(split)
    last = data["stages"][1]["params"]
    assert last["lm_head.weight"] == {"fqn": "lm_head.weight", "shape": [64, 32],
                                      "dtype": "float32", "replica": True, "slice": None}
    assert data["tied"] == [{"fqns": ["wte.weight", "lm_head.weight"], "stages": [0, 1]}]
    held = [p for s in data["stages"] for p in s["params"].values()]
    assert len(held) == len(dict(gm.named_parameters(remove_duplicate=False)))
