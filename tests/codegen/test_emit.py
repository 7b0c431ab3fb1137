"""Emitted stage source: golden files for tiny GPT and Llama, and the source runs.

Regenerate the golden files after an intended codegen change with

    TRIPAR_UPDATE_GOLDEN=1 python -m pytest tests/codegen/test_emit.py -p no:xdist

and review the diff like any other change.
"""

from __future__ import annotations

import difflib
import json
import os
import types
from pathlib import Path

import pytest
import torch

from tests.codegen.conftest import captured
from tripar.codegen.emit import stage_source, write_stages
from tripar.codegen.split import block_nodes, even_stage_blocks, split_by_blocks

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("TRIPAR_UPDATE_GOLDEN") == "1"


def _split(name: str, pp: int):
    _, gm, flat = captured(name)
    return split_by_blocks(gm, even_stage_blocks(list(block_nodes(gm)), pp), flat), flat


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_stage_source_matches_golden(name: str, tmp_path: Path) -> None:
    split, _ = _split(name, 2)
    folder = GOLDEN / f"{name}_pp2"
    written = write_stages(split, tmp_path, pp=2)
    assert [p.name for p in written] == ["stage_0.py", "stage_1.py", "param_map.json"]
    for path in written:
        golden = folder / path.name
        text = path.read_text()
        if UPDATE:
            folder.mkdir(parents=True, exist_ok=True)
            golden.write_text(text)
        assert golden.exists(), f"{golden} is missing: run with TRIPAR_UPDATE_GOLDEN=1"
        expected = golden.read_text()
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            str(golden), "generated"))
        assert text == expected, f"generated source changed:\n{diff}"


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


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_emitted_forward_runs_like_the_stage(name: str) -> None:
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


def test_param_map_written(tmp_path: Path) -> None:
    split, _ = _split("llama", 2)
    write_stages(split, tmp_path, stages=[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["param_map.json", "stage_1.py"]
    data = json.loads((tmp_path / "param_map.json").read_text())
    assert "lm_head.weight" in data["stages"][1]["params"]
