"""``export_checkpoint`` / ``tripar export``: a tripar checkpoint as transformers, torch and
DCP checkpoints.

Here, on a checkpoint written by hand (one weight cut into two tensor-parallel pieces in
two shard files, a tied alias, a buffer): the state dict comes out whole under every
name, the three formats load back, and wrong requests fail with the fix. Checkpoints a
real job wrote (pipeline and tensor parallel, fused QKV, tied embeddings, a transformers
GPT-2) are exported inside the job of ``tests/runtime/test_checkpoint.py`` by
:func:`check_export`; the README's Llama goes through ``tripar export --to hf`` in
``tests/test_readme.py``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from tripar.cli import main
from tripar.commands import export as export_command
from tripar.errors import ConfigError
from tripar.runtime import export_checkpoint
from tripar.runtime.checkpoint import read_state_dict
from tripar.runtime.export import FORMATS


def check_export(pm: Any, directory: str, full: dict[str, torch.Tensor], batch: Any) -> int:
    """In a job that has just saved ``pm`` to ``directory`` (``full``: its
    ``full_state_dict()``): rank 0 exports the checkpoint to torch and DCP (and, for a
    transformers model, to transformers) and checks every tensor equal to ``full`` under
    the original names; a transformers export's loss on ``batch`` is ``pm.eval_step``'s
    (every rank calls this: the eval is a collective). Returns the tensors compared."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    source = pm.transformers
    want = pm.eval_step(batch) if source else None
    if dist.get_rank() != 0:
        return 0
    prefix = source["prefix"] if source else ""
    names = {k.removeprefix(prefix): v for k, v in full.items()}
    compared = 0
    with tempfile.TemporaryDirectory() as out:
        export_checkpoint(directory, "torch", f"{out}/model.pt")
        state = torch.load(f"{out}/model.pt", weights_only=True)
        assert state.keys() == names.keys()
        export_checkpoint(directory, "dcp", f"{out}/dcp")
        loaded = {k: torch.zeros_like(v) for k, v in names.items()}
        dcp.load(loaded, checkpoint_id=f"{out}/dcp", no_dist=True)
        for name, tensor in names.items():
            assert torch.equal(state[name], tensor) and torch.equal(loaded[name], tensor), name
            compared += 1
        if source:
            import transformers

            export_checkpoint(directory, "hf", f"{out}/hf")
            model = getattr(transformers, source["class"]).from_pretrained(f"{out}/hf")
            for name, tensor in model.state_dict().items():
                assert torch.equal(tensor, names[name]), name
            with torch.no_grad():
                got = model.eval()(**batch).loss
            assert_close(got.item(), want, rtol=1e-5, atol=1e-6)
    return compared


def _handmade(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint as two tensor-parallel ranks write it: ``w`` (4 x 3) cut in rows
    across two shard files, tied to ``v``; a buffer ``b`` on rank 0. Returns the whole
    tensors."""
    w, b = torch.arange(12.0).reshape(4, 3), torch.tensor([0.5, 1.5])
    path.mkdir()
    torch.save([("w", "param", ((0, 2), (0, 3)), (0, 6), w[:2].clone()),
                ("b", "param", ((0, 2),), (0, 2), b.clone())], path / "shard-ab12-00000.pt")
    torch.save([("w", "param", ((2, 4), (0, 3)), (0, 6), w[2:].clone())],
               path / "shard-ab12-00001.pt")
    manifest = {"format": "tripar-checkpoint", "version": 1, "save_id": "ab12",
                "model": {"spec": "mine.py:build", "fingerprint": "f"}, "steps": 1,
                "shapes": {"w": [4, 3], "b": [2]}, "aliases": {"w": ["w", "v"]},
                "files": {"w|param": ["shard-ab12-00000.pt", "shard-ab12-00001.pt"],
                          "b|param": ["shard-ab12-00000.pt"]}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return {"w": w, "v": w, "b": b}


def test_a_checkpoint_comes_out_whole_as_torch_and_dcp(tmp_path: Path):
    import torch.distributed.checkpoint as dcp

    whole = _handmade(tmp_path / "ckpt")
    state = read_state_dict(tmp_path / "ckpt")
    assert state.keys() == whole.keys() and state["w"] is state["v"]  # tied: one tensor
    assert main(["export", str(tmp_path / "ckpt"), "--to", "torch", str(tmp_path / "m.pt")]) == 0
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    assert export_checkpoint(tmp_path / "ckpt", "dcp", tmp_path / "dcp") == tmp_path / "dcp"
    loaded = {k: torch.zeros_like(v) for k, v in whole.items()}
    dcp.load(loaded, checkpoint_id=tmp_path / "dcp", no_dist=True)
    for name, tensor in whole.items():
        assert torch.equal(saved[name], tensor) and torch.equal(loaded[name], tensor), name
    module = torch.nn.Module()
    module.w, module.v = torch.nn.Parameter(torch.zeros(4, 3)), None
    module.v = module.w
    module.register_buffer("b", torch.zeros(2))
    module.load_state_dict(saved)  # strict: the original names, no more, no less
    assert torch.equal(module.w, whole["w"])


def test_wrong_requests_name_the_fix(tmp_path: Path, capsys):
    _handmade(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="not a transformers model.*--to torch"):
        export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "hf")
    with pytest.raises(ConfigError, match="give one of hf, torch, dcp"):
        export_checkpoint(tmp_path / "ckpt", "onnx", tmp_path / "x")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="is a directory; --to torch writes a file"):
        export_checkpoint(tmp_path / "ckpt", "torch", tmp_path / "taken")
    assert main(["export", str(tmp_path / "nowhere"), "--to", "torch", "m.pt"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
    assert export_command.FORMATS == FORMATS  # the CLI offers what the function writes
