"""Checkpoints: save under one plan, load under another, continue; atomic saves; bad files;
each saved checkpoint exported (test_export.check_export) in the same job."""

from __future__ import annotations

import functools
import json
import os
import tempfile

import pytest
import torch
from torch.testing import assert_close

from tests._ranks import run_ranks

STEPS = 3


def _setup(name: str = "gpt"):
    import test_engine as te

    return te, (*te._model(name), te.batches(name))


def _build(layout: tuple[int, int, int, str, int], name: str = "gpt"):
    """(dp, tp, pp, schedule, zero) -> a fresh ParallelModel of a small model with AdamW."""
    te, (loaded, captured, _) = _setup(name)
    from tripar import api

    dp, tp, pp, schedule, zero = layout
    return api.auto_parallel(loaded.model, captured=captured,
                             example_inputs=loaded.example_inputs,
                             example_kwargs=loaded.example_kwargs,
                             optimizer=te.OPTIMIZERS["adamw"][0], global_batch_size=te.GLOBAL_BATCH,
                             dp=dp, tp=tp, pp=pp, num_microbatches=te.GLOBAL_BATCH // dp,
                             schedule=schedule, zero=zero, timeout_s=30)


def _resume(directory: str, first: tuple, second: tuple, name: str = "gpt") -> dict:
    """Train 3 steps under ``first``; train 2, save, load under ``second``, train 1."""
    import test_export
    import torch.distributed as dist

    build = functools.partial(_build, name=name)
    te, (_, _, batches) = _setup(name)
    pm = build(first)
    for b in batches:
        pm.train_step(b)
    straight = pm.full_state_dict()
    pm.close()

    pm = build(first)
    for b in batches[:2]:
        pm.train_step(b)
    pm.save(directory)
    after_two = pm.full_state_dict()
    exported = test_export.check_export(pm, directory, after_two, batches[2])
    pm.close()

    pm = build(second)
    pm.load(directory)
    assert pm.steps == 2
    loaded = pm.full_state_dict()
    pm.train_step(batches[2])
    resumed = pm.full_state_dict()
    pm.close()
    out = {"straight": straight, "after_two": after_two, "loaded": loaded, "resumed": resumed,
           "exported": exported}

    # a save that dies before its manifest leaves the previous checkpoint loadable
    import tripar.runtime.checkpoint as ckpt

    pm = build(second)
    pm.load(directory)
    pm.train_step(batches[2])
    before = set(os.listdir(directory))
    real = ckpt._write_manifest

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash before the manifest")

    ckpt._write_manifest = crash
    try:
        pm.save(directory)
        crashed = False
    except KeyboardInterrupt:
        crashed = True
        dist.barrier()  # the barrier the dead save would have reached (rank 1 waits on it)
    finally:
        ckpt._write_manifest = real
    out["crashed"] = crashed
    out["orphans"] = sorted(set(os.listdir(directory)) - before)
    fresh = build(first)
    fresh.load(directory)
    out["after_crash"] = fresh.full_state_dict()
    fresh.save(directory)  # a good save removes the dead save's files
    out["files"] = sorted(os.listdir(directory))
    fresh.close()
    pm.close()
    return _summary(out)


def _summary(out: dict) -> dict:
    """Comparisons made in the rank (tensors do not travel back through the pipe)."""
    straight = out["straight"]
    for key, value in straight.items():
        assert torch.equal(out["loaded"][key], out["after_two"][key]), key
        assert_close(out["resumed"][key], value, rtol=1e-4, atol=1e-4,
                     msg=lambda m, key=key: f"{key}: {m}")
        assert torch.equal(out["after_crash"][key], out["after_two"][key]), key
    moved = any(not torch.equal(out["resumed"][k], out["after_two"][k]) for k in straight)
    return {"compared": len(straight), "exported": out["exported"], "moved": moved,
            "crashed": out["crashed"],
            "orphans": out["orphans"], "files": out["files"]}


@pytest.mark.parametrize("world, name, first, second", [
    (2, "gpt", (1, 1, 2, "chimera", 0), (2, 1, 1, "1f1b", 1)),  # chimera -> dp with ZeRO-1
    (2, "gpt", (2, 1, 1, "1f1b", 2), (1, 1, 2, "zb-h1", 0)),  # ZeRO-2 -> another schedule
    # tensor-parallel slices (a fused QKV cut per part, with ZeRO-2) -> whole tensors
    (4, "gpt", (2, 2, 1, "1f1b", 2), (1, 1, 4, "1f1b", 0)),
    # HF GPT-2's fused QKV is cut along dim 1 (Conv1D); pipeline x tensor -> dp x tensor
    (4, "hf_gpt2", (1, 2, 2, "gpipe", 0), (2, 2, 1, "1f1b", 1)),
], ids=["chimera-pp2-to-dp2zero", "dp2zero2-to-pp2", "dp2tp2zero2-to-pp4", "hf-pp2tp2-to-dp2tp2zero"])
def test_save_under_one_plan_load_under_another(world, name, first, second):
    with tempfile.TemporaryDirectory() as directory:
        results = run_ranks(_resume, world, directory, first, second, name, timeout_s=180,
                            pg_timeout_s=30)
    for r in results:
        assert r["compared"] > 10 and r["moved"]
    # exported to torch, DCP (and transformers) by rank 0: every tensor whole, by name
    assert results[0]["exported"] == results[0]["compared"]
    assert results[0]["crashed"] and not any(r["crashed"] for r in results[1:])
    assert any(name.startswith("shard-") for name in results[0]["orphans"])
    files = results[0]["files"]
    assert "manifest.json" in files and not any(f.startswith(".tmp-") for f in files)
    assert len([f for f in files if f.startswith("shard-")]) <= world  # the dead save's are gone


def _same_plan(directory: str) -> bool:
    te, (_, _, batches) = _setup()
    layout = (1, 1, 2, "1f1b", 0)
    pm = _build(layout)
    for b in batches:
        pm.train_step(b)
    straight = pm.full_state_dict()
    pm.close()
    pm = _build(layout)
    for b in batches[:1]:
        pm.train_step(b)
    pm.save(directory)
    pm.close()
    pm = _build(layout)
    pm.load(directory)
    for b in batches[1:]:
        pm.train_step(b)
    resumed = pm.full_state_dict()
    return all(torch.equal(resumed[k], v) for k, v in straight.items())


def test_resume_under_the_same_plan_is_bit_exact():
    with tempfile.TemporaryDirectory() as directory:
        assert run_ranks(_same_plan, 2, directory, timeout_s=120, pg_timeout_s=30) == [True] * 2


def _bad_files(directory: str) -> list[str]:
    from tripar import api
    from tripar.models import load_model
    from tripar.runtime.checkpoint import CheckpointError

    pm = _build((1, 1, 1, "1f1b", 0))
    pm.save(directory)
    messages = []
    other = load_model("gpt:layers=1,hidden=32,heads=4,vocab=64,seq=8", batch_size=1)
    wrong = api.auto_parallel(other.model, 1, example_inputs=other.example_inputs)
    with pytest.raises(CheckpointError) as err:
        wrong.load(directory)
    messages.append(str(err.value))
    manifest = json.loads(open(os.path.join(directory, "manifest.json")).read())
    shard = sorted({f for files in manifest["files"].values() for f in files})[0]
    with open(os.path.join(directory, shard), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError) as err:
        pm.load(directory)
    messages.append(str(err.value))
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        f.write('{"format": "tripar-checkpoint", "version": 99}')
    with pytest.raises(CheckpointError) as err:
        pm.load(directory)
    messages.append(str(err.value))
    with pytest.raises(CheckpointError) as err:
        pm.load(os.path.join(directory, "nowhere"))
    messages.append(str(err.value))
    return messages


def test_bad_checkpoints_are_refused_with_the_reason():
    with tempfile.TemporaryDirectory() as directory:
        (messages,) = run_ranks(_bad_files, 1, directory, timeout_s=60)
    wrong, truncated, version, missing = messages
    assert "is for model" in wrong and "fingerprint" in wrong
    assert "cannot be read" in truncated and "shard-" in truncated
    assert "version 99" in version
    assert "manifest.json is missing" in missing
