"""Emitted stage source: golden files for tiny GPT and Llama (and a GPT stage that
checkpoints its blocks), and the source runs: every file imports what its code reads,
and its functions, bound to the stage module (and each checkpointed segment's body),
compute what the module computes. ``tests/commands/test_codegen_runs.py`` trains with
the sources ``tripar codegen`` writes on real ranks.

Regenerate the golden files after an intended codegen change with

    TRIPAR_UPDATE_GOLDEN=1 python -m pytest tests/codegen/test_emit.py -p no:xdist

and review the diff like any other change.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.codegen.conftest import captured
from tripar.codegen.emit import recomputed_segments, stage_source, write_stages
from tripar.codegen.recompute import apply_recompute
from tripar.codegen.split import block_nodes, even_stage_blocks, split_by_blocks

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("TRIPAR_UPDATE_GOLDEN") == "1"


def _split(name: str, pp: int):
    _, gm, flat = captured(name)
    return split_by_blocks(gm, even_stage_blocks(list(block_nodes(gm)), pp), flat), flat


def _recomputing(name: str, blocks: tuple[str, ...] = ("blocks.0", "blocks.1")):
    """The pp=2 split of ``name`` whose stage 0 checkpoints ``blocks``, one segment each."""
    split, flat = _split(name, 2)
    first = split.stages[0]
    module = apply_recompute(first, blocks, blocks=block_nodes(captured(name)[1]))
    stages = (dataclasses.replace(first, module=module), *split.stages[1:])
    return dataclasses.replace(split, stages=stages), flat


def _check_golden(path: Path, golden: Path) -> None:
    text = path.read_text()
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"{golden} is missing: run with TRIPAR_UPDATE_GOLDEN=1"
    expected = golden.read_text()
    diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                        str(golden), "generated"))
    assert text == expected, f"generated source changed:\n{diff}"


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_stage_source_matches_golden(name: str, tmp_path: Path) -> None:
    split, _ = _split(name, 2)
    folder = GOLDEN / f"{name}_pp2"
    written = write_stages(split, tmp_path, pp=2)
    assert [p.name for p in written] == ["stage_0.py", "stage_1.py", "param_map.json"]
    for path in written:
        _check_golden(path, folder / path.name)


def test_recomputed_stage_source_matches_golden(tmp_path: Path) -> None:
    split, _ = _recomputing("gpt")
    (path, _) = write_stages(split, tmp_path, pp=2, stages=[0])
    _check_golden(path, GOLDEN / "gpt_pp2_recompute" / path.name)
    text = path.read_text()
    assert "#   self._recompute_1 runs recompute_1 below: blocks.1\n" in text
    assert "= self._recompute_0(drop)  # recompute_0 below, checkpointed\n" in text
    assert "def recompute_0(self, drop):" in text and "def recompute_1(self, " in text


def test_header_names_stage_io_and_replicas() -> None:
    split, _ = _split("gpt", 2)
    first, last = (stage_source(s, pp=2) for s in split.stages)
    assert first.startswith("# tripar stage 0 of 2 (pipeline rank 0, virtual stage 0)\n")
    assert "#   input_ids  int64[2, 8]  graph input 0" in first
    assert "# outputs (sent to stage 1):" in first
    assert "received from stage 0" in last and "graph input 1" in last
    assert "#   lm_head.weight (lm_head.weight)" in last  # the tied head is a replica
    assert "= None" not in first  # release tails are tidied away
    assert "# float32[2, 8, 32]" in first


@pytest.mark.parametrize("name", ["gpt", "llama", "hf_gpt2"])
def test_emitted_forward_runs_like_the_stage(name: str) -> None:
    """Each file, executed in an empty namespace, defines a ``forward`` equal to the
    module's (an exported Hugging Face graph reads ``device``, which the file imports)."""
    if name.startswith("hf"):
        pytest.importorskip("transformers")
    split, flat = _split(name, 2)
    acts: tuple = ()
    for stage in split.stages:
        scope: dict = {}
        exec(compile(stage_source(stage), f"stage_{stage.index}.py", "exec"), scope)
        forward = types.MethodType(scope["forward"], stage.module)
        inputs = stage.split_inputs(acts, flat)
        got, want = forward(*inputs), stage.module(*inputs)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        acts = want


def test_emitted_segments_run_under_checkpointing_like_the_stage() -> None:
    """A checkpointing stage's file, bound to the module (``forward``) and to each
    segment's body (``recompute_<k>``), gives the module's output and gradients; each
    segment's function runs twice: in the forward and again in the backward."""
    split, flat = _recomputing("gpt")
    stage = split.stages[0]
    module = stage.module
    (ids,) = stage.split_inputs((), flat)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        (out,) = module(ids)
        out.square().sum().backward()
        grads = [p.grad for p in module.parameters()]
        module.zero_grad(set_to_none=True)
        return out.detach(), grads

    want, want_grads = run()
    scope: dict = {}
    exec(compile(stage_source(stage), "stage_0.py", "exec"), scope)
    calls: Counter = Counter()

    def bind(owner: torch.nn.Module, name: str) -> None:
        def counted(*args):
            calls[name] += 1
            return scope[name](owner, *args)
        owner.forward = counted

    bind(module, "forward")
    segments = recomputed_segments(module)
    assert [w.blocks for _, w in segments] == [("blocks.0",), ("blocks.1",)]
    for child, wrapper in segments:
        bind(wrapper.body, child.lstrip("_"))
    got, got_grads = run()
    assert calls == {"forward": 1, "recompute_0": 2, "recompute_1": 2}
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_param_map_written(tmp_path: Path) -> None:
    split, _ = _split("llama", 2)
    write_stages(split, tmp_path, stages=[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["param_map.json", "stage_1.py"]
    data = json.loads((tmp_path / "param_map.json").read_text())
    assert "lm_head.weight" in data["stages"][1]["params"]
