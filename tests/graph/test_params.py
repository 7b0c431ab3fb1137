"""Which names a parameter goes by: one grouping, read alike by every layer."""

from __future__ import annotations

import torch
from torch import nn

from tripar.graph import canonical_names, param_groups, read_params, tied_groups
from tripar.graph.capture import capture, flat_graph_inputs
from tripar.models.spec import load_model

SMALL_GPT = "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8"


class _Shared(nn.Module):
    """One weight under three names, registered in this order: a, b.weight, c.weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(4, 4))
        self.b = nn.Linear(4, 4, bias=False)
        self.c = nn.Linear(4, 4)
        self.b.weight = self.a
        self.c.weight = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(x) @ self.a)


def test_groups_list_every_name_canonical_first_in_registration_order() -> None:
    model = _Shared()
    assert param_groups(model) == (("a", "b.weight", "c.weight"), ("c.bias",))
    assert tied_groups(model) == (("a", "b.weight", "c.weight"),)
    assert canonical_names(model) == {"a": "a", "b.weight": "a", "c.weight": "a",
                                      "c.bias": "c.bias"}


def test_an_untied_model_has_no_tied_groups() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert tied_groups(model) == ()
    assert all(name == canon for name, canon in canonical_names(model).items())


def test_read_params_names_what_a_node_reads_canonically() -> None:
    gm = torch.fx.symbolic_trace(_Shared())
    canon = canonical_names(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert [name for name, _ in read_params(gm, nodes["b"], canon)] == ["a"]
    assert [name for name, _ in read_params(gm, nodes["c"], canon)] == ["a", "c.bias"]
    assert [name for name, _ in read_params(gm, nodes["c"])] == ["c.weight", "c.bias"]
    assert read_params(gm, nodes["a"], canon)[0][1] is gm.a  # a get_attr of the parameter
    assert read_params(gm, nodes["x"], canon) == []


def test_every_layer_sees_the_same_tied_group() -> None:
    """The proxy graph, the tensor-parallel regions and the stage split all name the tied
    embedding and LM head of GPT as ``tied_groups`` does."""
    from tripar.codegen.split import block_nodes, even_stage_blocks, split_by_blocks
    from tripar.graph.annotate import annotate
    from tripar.graph.build import build_proxy_graph

    loaded = load_model(SMALL_GPT, batch_size=2)
    assert tied_groups(loaded.model) == (("wte.weight", "lm_head.weight"),)
    gm = capture(loaded.model, loaded.example_inputs)
    assert tied_groups(gm) == tied_groups(loaded.model)
    annotate(gm, loaded.example_inputs)
    proxy = build_proxy_graph(gm, batch_size=2, seq_len=8, tp_degrees=(2,))
    assert proxy.tied_weights == [("wte.weight", "lm_head.weight")]
    embedding = next(r for r in proxy.tp_regions if r.kind == "embedding")
    assert embedding.tied == ("wte.weight", "lm_head.weight")
    split = split_by_blocks(gm, even_stage_blocks(list(block_nodes(gm)), 2),
                            flat_graph_inputs(gm, loaded.example_inputs, loaded.example_kwargs))
    assert [g.fqns for g in split.tied] == [("wte.weight", "lm_head.weight")]
