"""Stage split: running the stages in pipeline order reproduces the model's loss and
every parameter gradient (replicas of tied weights summed)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.codegen.conftest import SPECS, captured, reference_grads, run_pipeline, stage_grads
from tripar.codegen.split import (
    block_nodes,
    even_stage_blocks,
    rank_stages,
    split_by_blocks,
    split_stages,
)
from tripar.errors import PlanError


def _check_model(name: str, pp: int) -> None:
    loaded, gm, flat = captured(name)
    blocks = list(block_nodes(gm))
    split = split_by_blocks(gm, even_stage_blocks(blocks, pp), flat)
    assert len(split.stages) == pp
    modules = [copy.deepcopy(s.module) for s in split.stages]  # each stage its own weights
    loss = run_pipeline(split, modules, flat)
    ref_loss, ref = reference_grads(loaded)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    originals = dict(loaded.model.named_parameters(remove_duplicate=False))
    got = stage_grads(split, modules, originals)
    assert set(got) == set(ref), "a parameter's gradient is missing on every stage"
    names = {id(p): n for n, p in originals.items()}
    for key, grad in ref.items():
        torch.testing.assert_close(got[key], grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, k=key: f"{name} pp={pp} {names[k]}: {m}")


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("name", list(SPECS))
def test_stages_reproduce_loss_and_grads(name: str, pp: int) -> None:
    _check_model(name, pp)


def test_late_inputs_go_to_the_stage_that_reads_them() -> None:
    _, gm, flat = captured("gpt")
    split = split_by_blocks(gm, even_stage_blocks(list(block_nodes(gm)), 4), flat)
    first, last = split.stages[0], split.stages[-1]
    assert [t.name for t in first.graph_inputs] == ["input_ids"]
    assert [t.name for t in last.graph_inputs] == ["targets"]
    assert last.graph_input_positions == (1,)
    for middle in split.stages[1:-1]:
        assert middle.graph_inputs == ()
        # only the hidden state crosses: (B, T, h) float32
        assert [(t.shape, t.dtype_name) for t in middle.received] == [((2, 8, 32), "float32")]
        assert middle.sent == middle.received or len(middle.sent) == 1


def test_tied_embedding_and_head_are_replicas_on_both_ends() -> None:
    _, gm, flat = captured("gpt")
    split = split_by_blocks(gm, even_stage_blocks(list(block_nodes(gm)), 2), flat)
    group = next(g for g in split.tied if "wte.weight" in g.fqns)
    assert set(group.fqns) == {"wte.weight", "lm_head.weight"}
    assert group.stages == (0, 1)
    assert "wte.weight" in split.stages[0].replicas
    assert "lm_head.weight" in split.stages[1].replicas
    assert dict(split.stages[1].params)["lm_head.weight"] == "lm_head.weight"
    # an untied parameter is nobody's replica
    assert "blocks.0.attn.c_attn.weight" not in split.stages[0].replicas


def test_skip_values_are_forwarded_through_middle_stages() -> None:
    class Skip(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)
            self.c = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return ((self.c(self.b(h)) + h - y) ** 2).mean()

    model = Skip()
    gm = torch.fx.symbolic_trace(model)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    order = [n.name for n in gm.graph.nodes if n.op == "call_module"]
    rest = [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    split = split_stages(gm, [[order[0]], [order[1]], [order[2], *rest]], [x, y])
    assert [t.name for t in split.stages[1].received] == ["a"]
    assert [t.name for t in split.stages[1].sent] == ["a", "b"]  # 'a' skips stage 1
    assert [t.name for t in split.stages[2].graph_inputs] == ["y"]
    modules = [s.module for s in split.stages]
    loss = run_pipeline(split, modules, [x, y])
    torch.testing.assert_close(loss, model(x, y).detach())


def test_derived_values_are_recomputed_not_sent() -> None:
    _, gm, flat = captured("hf_llama")
    split = split_by_blocks(gm, even_stage_blocks(list(block_nodes(gm)), 4), flat)
    for stage in split.stages[1:]:
        # rotary tables and masks are rebuilt from the inputs; only activations arrive
        assert all(t.dtype_name == "float32" and len(t.shape) == 3 for t in stage.received)
    layer1 = next(s for s in split.stages if "model.model.layers.1" in s.blocks)
    assert layer1.index > 0 and layer1.recomputed, "a later llama stage rebuilds rotary tables"


def test_rank_stages_interleaved() -> None:
    _, gm, flat = captured("gpt")
    split = split_by_blocks(gm, even_stage_blocks(list(block_nodes(gm)), 4), flat)
    assert [s.index for s in rank_stages(split, 2, 0)] == [0, 2]
    assert [s.index for s in rank_stages(split, 2, 1)] == [1, 3]
    with pytest.raises(PlanError, match="pp_rank=2"):
        rank_stages(split, 2, 2)


def test_bad_assignments_are_refused() -> None:
    _, gm, flat = captured("gpt")
    blocks = list(block_nodes(gm))
    with pytest.raises(PlanError, match="in no stage"):
        split_by_blocks(gm, [blocks[:2]], flat)
    with pytest.raises(PlanError, match="does not have"):
        split_by_blocks(gm, [["nope"], blocks], flat)
    table = block_nodes(gm)
    backwards = [list(table[blocks[1]]), [n for b in blocks if b != blocks[1] for n in table[b]]]
    with pytest.raises(PlanError, match="data flow"):
        split_stages(gm, backwards, flat)
    with pytest.raises(PlanError, match="no stage"):
        split_stages(gm, [list(table[blocks[0]])], flat)


def _plan(blocks: list[str], stage_blocks: list[list[str]], vpp: int = 1):
    from tripar.plan.config import ParallelConfig
    from tripar.plan.plan import ClusterInfo, Estimate, Inputs, ModelInfo, Plan, StagePlan

    pp = len(stage_blocks) // vpp
    stages = tuple(StagePlan(i, i % pp, i // pp, tuple(b), (), 0.01, 10**9)
                   for i, b in enumerate(stage_blocks))
    return Plan(
        model=ModelInfo("gpt:tiny", "0" * 16, tuple(blocks), 10**5),
        cluster=ClusterInfo("cpu", 1, pp, 10**10, 1e11, 1e10, 1e9),
        inputs=Inputs(global_batch_size=4, seq_len=8),
        parallel=ParallelConfig(dp=1, tp=1, pp=pp, micro_batch_size=2, num_microbatches=2,
                                vpp=vpp, schedule="interleaved" if vpp > 1 else "1f1b"),
        stages=stages,
        estimate=Estimate(0.05, 4 * 8 / 0.05, 10**9, 0.2, (10**9,) * pp),
    )


def test_split_for_a_hand_written_plan() -> None:
    from tripar.codegen.split import split_for_plan

    loaded, gm, flat = captured("gpt")
    blocks = list(block_nodes(gm))
    plan = _plan(blocks, [blocks[:2], blocks[2:4], blocks[4:]])
    split = split_for_plan(gm, plan, flat)
    assert [s.blocks for s in split.stages] == [tuple(blocks[:2]), tuple(blocks[2:4]),
                                                tuple(blocks[4:])]
    modules = [copy.deepcopy(s.module) for s in split.stages]
    ref_loss, _ = reference_grads(loaded)
    torch.testing.assert_close(run_pipeline(split, modules, flat), ref_loss, rtol=1e-5, atol=0)
    other = _plan(["a", *blocks[1:]], [["a", *blocks[1:3]], blocks[3:]])
    with pytest.raises(PlanError, match="re-plan"):
        split_for_plan(gm, other, flat)


def test_receive_shapes_follow_the_microbatch() -> None:
    loaded, gm, _ = captured("gpt")  # an FX graph: sizes are read at run time
    ids, targets = loaded.example_inputs
    split = split_by_blocks(gm, even_stage_blocks(list(block_nodes(gm)), 2),
                            [ids[:1], targets[:1]])
    assert [t.shape for t in split.stages[1].received] == [(1, 8, 32)]
    assert [t.shape for t in split.stages[1].graph_inputs] == [(1, 8)]
    _, exported, _ = captured("hf_gpt2")  # export baked the batch of 2 in
    with pytest.raises(PlanError, match="microbatch-sized example"):
        split_by_blocks(exported, even_stage_blocks(list(block_nodes(exported)), 2),
                        [ids[:1], targets[:1]])
