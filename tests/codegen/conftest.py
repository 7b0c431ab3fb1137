"""Shared pieces of the codegen tests: tiny models captured once, and a reference
pipeline runner that executes stage programs the way the runtime does (detached
activations between stages, backward stage by stage with received gradients)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import torch

from tripar.codegen.stage import StageSplit
from tripar.graph.capture import capture, flat_graph_inputs
from tripar.models import load_model

SPECS = {
    "gpt": "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8",
    "llama": "llama:layers=2,hidden=32,heads=4,kv_heads=2,vocab=64,seq=8",
    "bert": "bert:layers=2,hidden=32,heads=4,vocab=64,seq=8",
    "vit": "vit:image=16,patch=8,layers=2,hidden=32,heads=4,classes=10",
    "resnet": "resnet:blocks=1-1-1-1,width=8,image=16,classes=10",
    "t5": "t5:layers=2,hidden=32,heads=4,vocab=64,seq=8,buckets=8,max_distance=16",
    "hf_gpt2": "hf:GPT2LMHeadModel:n_layer=2,n_embd=32,n_head=4,vocab_size=64,n_positions=16",
    "hf_llama": "hf:LlamaForCausalLM:num_hidden_layers=2,hidden_size=32,num_attention_heads=4,"
                "num_key_value_heads=2,intermediate_size=64,vocab_size=64",
    "hf_bert": "hf:BertForMaskedLM:num_hidden_layers=2,hidden_size=32,num_attention_heads=4,"
               "intermediate_size=64,vocab_size=64",
}


@functools.cache
def captured(name: str) -> tuple[Any, torch.fx.GraphModule, list[Any]]:
    """(LoadedModel on CPU, its captured graph, the flat graph inputs), built once."""
    spec = SPECS[name]
    loaded = load_model(spec, batch_size=2, seq_len=8 if spec.startswith("hf:") else None)
    gm = capture(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    flat = flat_graph_inputs(gm, loaded.example_inputs, loaded.example_kwargs)
    return loaded, gm, flat


def reference_grads(loaded: Any) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Loss and {id(param): grad} of the whole model run on one device."""
    model = copy.deepcopy(loaded.model)
    originals = dict(loaded.model.named_parameters(remove_duplicate=False))
    copies = dict(model.named_parameters(remove_duplicate=False))
    loss = model(*loaded.example_inputs, **loaded.example_kwargs)
    loss.backward()
    return loss.detach(), {id(originals[k]): copies[k].grad for k in copies
                           if copies[k].grad is not None}


def run_pipeline(split: StageSplit, modules: Sequence[torch.nn.Module],
                 flat_inputs: Sequence[Any]) -> torch.Tensor:
    """Forward every stage in order, then backward in reverse, passing only the declared
    activations and their gradients between stages. Returns the loss."""
    received: list[list[torch.Tensor]] = []
    outputs: list[Any] = []
    acts: tuple = ()
    for stage, module in zip(split.stages, modules):
        recv = [a.detach().requires_grad_(a.is_floating_point()) for a in acts]
        out = module(*stage.split_inputs(recv, flat_inputs))
        if not stage.is_last:
            assert isinstance(out, tuple) and len(out) == len(stage.sent)
            for spec, value in zip(stage.sent, out):
                assert tuple(value.shape) == spec.shape, (stage.index, spec, value.shape)
        received.append(recv)
        outputs.append(out)
        acts = out if not stage.is_last else ()
    loss = outputs[-1]
    loss.backward()
    for s in range(len(split.stages) - 2, -1, -1):
        pairs = [(o, r.grad) for o, r in zip(outputs[s], received[s + 1])
                 if o.requires_grad and r.grad is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return loss.detach()


def stage_grads(split: StageSplit, modules: Sequence[torch.nn.Module],
                originals: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """{id(original param): gradient summed over the stages holding a replica}."""
    summed: dict[int, torch.Tensor] = {}
    for stage, module in zip(split.stages, modules):
        fqn = dict(stage.params)
        for local, param in module.named_parameters():  # one entry per distinct tensor
            if param.grad is None:
                continue
            key = id(originals[fqn[local]])
            summed[key] = summed[key] + param.grad if key in summed else param.grad.clone()
    return summed
