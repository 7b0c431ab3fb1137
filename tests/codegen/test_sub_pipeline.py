"""Sub-pipelined tensor parallelism: a stage rewritten to run its microbatch as k parts.

The parity matrix (tests/runtime/test_engine.py) trains k = 2 and 4 on gloo ranks against
one process. Here, in one process: the rewritten graph's order (each part's all-reduce runs
while the next part computes), and the k-part stage computing what the one-part stage
computes, values and gradients, in a one-rank group (where every all-reduce is the
identity, so the two programs of tensor-parallel rank 0 must agree exactly).
"""

from __future__ import annotations

import dataclasses
import datetime
import operator

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from tests.codegen.test_build import SPECS, _capture, _gpt, make_plan
from tripar.codegen.build import build
from tripar.codegen.sub_pipeline import (
    GatherFromFinished,
    GatherStarted,
    GatherToFinished,
    GradReduceStarted,
    ReduceScatterStarted,
    ReduceStarted,
    SequenceLinearsFinished,
    finish,
    joint_wait,
    pending,
)
from tripar.models import load_model


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def _stage(k: int, sp: bool = False):
    _, gm, flat = _gpt()
    plan = make_plan(gm, flat, SPECS["gpt"], pp=1, tp=2)
    plan = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, tp_overlap=k,
                                                                  sp=sp))
    (stage,) = build(gm, plan, flat, pp_rank=0, tp_rank=0).stages
    return stage.module, flat


def test_each_parts_all_reduce_runs_while_the_next_part_computes() -> None:
    module, _ = _stage(2)
    assert module.meta["tp_overlap"] == 2
    nodes = list(module.graph.nodes)
    at = {n.name: i for i, n in enumerate(nodes)}
    starts = [n for n in nodes if n.op == "call_module"
              and isinstance(module.get_submodule(n.target), ReduceStarted)]
    finishes = [n for n in nodes if n.target is finish]
    assert len(starts) == len(finishes) >= 2 * 2  # embedding, attention, MLP ... per part
    # every all-reduce but the last runs while the graph computes the other part's work
    for start in starts[:-1]:
        (done,) = [u for u in start.users if u.target is finish]
        work = [n for n in nodes[at[start.name] + 1:at[done.name]]
                if n.op in ("call_function", "call_method", "call_module") and n not in starts
                and n.target not in (finish, pending, operator.getitem)]
        assert work, f"nothing computes while {start.name} runs"
    joins = [n for n in nodes if n.target is joint_wait]
    assert joins and all(len(n.args) == 1 + 2 for n in joins)  # the handles, one x per part
    for n in joins:
        copies = [u for g in n.users for u in g.users if u.op == "call_module"]
        assert len(copies) == 2 and all(
            isinstance(module.get_submodule(c.target), GradReduceStarted) for c in copies)


FINISHED = (SequenceLinearsFinished, GatherToFinished, GatherFromFinished)


def test_sequence_parallel_entries_and_exits_are_started_too() -> None:
    """Under sp a region's entry all-gathers (fused with its column-parallel linears) and
    its exit reduce-scatters: both are started, and finished after the other part's work.
    (Their values are checked on 2 ranks in the parity matrix: a one-rank group cannot
    gather a shard it alone holds.)"""
    module, _ = _stage(2, sp=True)
    nodes = list(module.graph.nodes)
    at = {n.name: i for i, n in enumerate(nodes)}
    kind = {n.name: type(module.get_submodule(n.target)) for n in nodes
            if n.op == "call_module"}
    starts = [n for n in nodes if kind.get(n.name) is GatherStarted]
    # two entries per layer, two layers (and the head's), each in two parts
    assert len(starts) >= 2 * 2 * 2 and len(starts) % 2 == 0
    assert any(k is ReduceScatterStarted for k in kind.values())
    hidden = 0
    for start in starts:
        (done,) = [u for u in start.users if kind.get(u.name) in FINISHED]
        hidden += any(n.op in ("call_function", "call_method", "call_module")
                      and n.target not in (finish, pending, operator.getitem)
                      and kind.get(n.name) not in (GatherStarted, ReduceScatterStarted)
                      for n in nodes[at[start.name] + 1:at[done.name]])
        # the backward's reduce-scatter of the entry's gradient is started too: the
        # finishing module gets the handles of a joint wait on the parts' inputs
        grad_handles = done.args[4]
        (wait,) = [u for u in grad_handles.users if u.target is joint_wait]
        assert len(wait.args) == 1 + 2 and start.args[0].args[0] is wait
    assert hidden == len(starts) // 2   # each entry's second part, behind the first's work


def test_two_parts_compute_what_one_part_computes(one_rank) -> None:
    whole, flat = _stage(1)
    parted, _ = _stage(2)
    assert "tp_overlap" not in whole.meta
    torch.manual_seed(0)
    _assert_same_values_and_gradients(whole, parted, flat)


def _assert_same_values_and_gradients(whole, parted, flat) -> None:
    """``parted`` (given ``whole``'s weights) computes ``whole``'s output on ``flat`` and,
    backward from it, every gradient."""
    inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]
    parted.load_state_dict(whole.state_dict())
    want, got = whole(*inputs), parted(*inputs)
    assert_close(got, want)
    (want[0] if isinstance(want, tuple) else want).backward()
    (got[0] if isinstance(got, tuple) else got).backward()
    grads = dict(parted.named_parameters())
    for name, p in whole.named_parameters():
        assert_close(grads[name].grad, p.grad, msg=lambda m, name=name: f"{name}: {m}")


SEQUENCE = {"gpt": "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=16",
            "llama": "llama:layers=2,hidden=64,heads=8,kv_heads=4,vocab=64,seq=16",
            "hf_gpt2": SPECS["hf_gpt2"]}
"""Sequences of 16 tokens: no dim of an attention's output (heads, 16, head size 8) is
the sequence's size twice, so the parts come back right after it."""


def _sequence_stages(name: str, k: int):
    """Stage 0 of a tp=2 plan at micro-batch 1, whole and in ``k`` parts of the sequence."""
    spec = SEQUENCE[name]
    loaded = load_model(spec, batch_size=1, seq_len=16 if spec.startswith("hf:") else None)
    gm, flat = _capture(loaded)
    plan = make_plan(gm, flat, spec, pp=1, tp=2)
    plan = dataclasses.replace(
        plan, inputs=dataclasses.replace(plan.inputs, global_batch_size=2, seq_len=16),
        estimate=dataclasses.replace(plan.estimate, tokens_per_s=2 * 16 / 0.05),
        parallel=dataclasses.replace(plan.parallel, micro_batch_size=1))
    out = []
    for parts in (1, k):
        k_plan = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel,
                                                                        tp_overlap=parts))
        (stage,) = build(gm, k_plan, flat, pp_rank=0, tp_rank=0).stages
        out.append(stage.module)
    return (*out, flat)


@pytest.mark.parametrize(("name", "k"), [("gpt", 2), ("llama", 4), ("hf_gpt2", 2)])
def test_one_sample_in_parts_of_its_sequence_computes_what_it_computes_whole(one_rank, name, k):
    """Attention runs once on the whole sequence (a join); what is around it runs per part,
    its all-reduces started while the other part computes, and the values and every
    gradient are the whole sequence's."""
    whole, parted, flat = _sequence_stages(name, k)
    assert parted.meta["tp_overlap"] == k and "tp_overlap" not in whole.meta
    nodes = list(parted.graph.nodes)
    at = {n.name: i for i, n in enumerate(nodes)}
    chunks = [n for n in nodes if n.target is torch.chunk]
    assert chunks and all(n.args[1:] == (k, 1) for n in chunks)  # (batch, sequence): dim 1
    attention = [n for n in nodes if "scaled_dot_product_attention" in str(n.target)]
    assert attention and len(attention) == 2   # once per layer, whole, not once per part
    starts = [n for n in nodes if n.op == "call_module"
              and isinstance(parted.get_submodule(n.target), ReduceStarted)]
    assert len(starts) >= 2 * k
    hidden = 0
    for start in starts:
        (done,) = [u for u in start.users if u.target is finish]
        hidden += any(n.op in ("call_module", "call_function") and n.target not in (
            finish, pending, operator.getitem) and n not in starts
            for n in nodes[at[start.name] + 1:at[done.name]])
    assert hidden >= len(starts) // 2   # the MLP's all-reduces overlap the next part
    _assert_same_values_and_gradients(whole, parted, flat)


def test_the_backward_reduces_one_parts_gradient_while_the_other_part_computes(
        one_rank, monkeypatch) -> None:
    """The autograd engine runs the ready node made last in the forward first. Each part's
    f is made just before that part's first reader, so part 1's f (its backward starts
    the all-reduce) runs before part 0's share of the level, and the joint wait after
    both: between every started gradient all-reduce but each level's last and the wait,
    the backward computes products."""
    import tripar.codegen.sub_pipeline as sub

    parted, flat = _stage(2)
    log: list[str] = []
    started = dist.all_reduce

    def all_reduce(*args, **kwargs):
        log.append("start" if kwargs.get("async_op") else "sync")
        return started(*args, **kwargs)

    waits = sub._wait_all

    def wait_all(handles):
        if handles:
            log.append("wait")
        waits(handles)

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                log.append("mm")
            return func(*args, **(kwargs or {}))

    out = parted(*flat)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(sub, "_wait_all", wait_all)
    with Products():
        (out[0] if isinstance(out, tuple) else out).backward()
    levels = " ".join(log).split("wait")[:-1]
    assert len(levels) >= 4   # attention and MLP of two layers (and the embedding's)
    for level in levels:
        steps = level.split()
        assert steps.count("start") == 2, level   # each part's gradient all-reduce
        first = steps.index("start")
        assert "mm" in steps[first + 1:steps.index("start", first + 1)], level
