"""A save killed part-way leaves the previous checkpoint loadable, and resuming from it
under the same plan, in fresh processes, is bit-exact with a run that never stopped.

The kills are real (SIGKILL): between the two ranks' shard writes (rank 0's shard on
disk, rank 1's half written) and in the middle of writing the manifest (every shard on
disk). The surviving rank stops with an error naming the killed one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests._ranks import spawn_ranks

SPEC = "gpt:layers=2,hidden=16,heads=2,vocab=32,seq=8"
BATCH, STEPS_BEFORE, STEPS_AFTER = 4, 2, 2


_CAPTURED: list = []  # this process's model and its capture, shared by every build


def _build():
    """The same tiny GPT (weights from seed 0) on a two-stage pipeline with AdamW."""
    import torch

    from tripar import api
    from tripar.models import load_model

    if not _CAPTURED:
        loaded = load_model(SPEC, batch_size=BATCH, seed=0)
        _CAPTURED.append(api.capture_model(loaded.model, loaded.example_inputs))
    captured = _CAPTURED[0]
    return api.auto_parallel(captured.model, captured=captured,
                             optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
                             pp=2, num_microbatches=2, schedule="1f1b", timeout_s=3)


def _batches(n: int) -> list:
    import torch

    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, 32, (BATCH, 8), generator=g),
             torch.randint(0, 32, (BATCH, 8), generator=g)) for _ in range(n)]


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def _half_written(path: Path, write) -> None:
    """Write half of what ``write`` writes to the temporary file, then die by SIGKILL."""
    buf = io.BytesIO()
    write(buf)
    data = buf.getvalue()
    with open(path.with_name(f".tmp-{path.name}"), "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def _save_then_die(directory: str, where: str, out: str) -> None:
    """Train, save (the good checkpoint), train on, and die inside the next save."""
    import torch.distributed as dist

    import tripar.runtime.checkpoint as ckpt
    from tripar.errors import TriparError

    rank = dist.get_rank()
    pm = _build()
    batches = _batches(STEPS_BEFORE + 1)
    for b in batches[:STEPS_BEFORE]:
        pm.train_step(b)
    pm.save(directory)
    state = pm.full_state_dict()
    if rank == 0:
        manifest = json.loads(Path(directory, "manifest.json").read_text())
        Path(out, "good.json").write_text(json.dumps(
            {"digest": _digest(state), "save_id": manifest["save_id"],
             "files": sorted(os.listdir(directory))}))
    pm.train_step(batches[STEPS_BEFORE])  # the state the failed save was to write
    before = set(os.listdir(directory))
    real = ckpt._durable_write

    def dying(path: Path, write) -> None:
        if where == "between-shards" and rank == 1 and path.name.startswith("shard-"):
            deadline = time.monotonic() + 20  # let rank 0's new shard reach the disk first
            while time.monotonic() < deadline and not any(
                    n.startswith("shard-") and n not in before for n in os.listdir(directory)):
                time.sleep(0.01)
            _half_written(path, write)
        if where == "in-manifest" and path.name == ckpt.MANIFEST:
            _half_written(path, write)
        real(path, write)

    ckpt._durable_write = dying
    try:
        pm.save(directory)
    except TriparError as error:
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"type": type(error).__name__, "error": str(error)}))
        raise


def _resume(directories: list[str]) -> dict:
    """In fresh processes: load each checkpoint the dead saves left, train on, compare."""
    import torch

    batches = _batches(STEPS_BEFORE + STEPS_AFTER)
    pm = _build()
    for b in batches[:STEPS_BEFORE]:
        pm.train_step(b)
    at_save = _digest(pm.full_state_dict())
    for b in batches[STEPS_BEFORE:]:
        pm.train_step(b)
    straight = pm.full_state_dict()
    pm.close()
    out = {"at_save": at_save, "loaded": [], "steps": [], "exact": [], "files": []}
    for directory in directories:
        pm = _build()
        pm.load(directory)
        out["steps"].append(pm.steps)
        out["loaded"].append(_digest(pm.full_state_dict()))
        for b in batches[pm.steps:]:
            pm.train_step(b)
        resumed = pm.full_state_dict()
        out["exact"].append(all(torch.equal(resumed[k], v) for k, v in straight.items())
                            and resumed.keys() == straight.keys())
        pm.save(directory)  # a good save clears what the dead one left
        out["files"].append(sorted(os.listdir(directory)))
        pm.close()
    return out


def test_a_save_killed_part_way_leaves_the_previous_checkpoint(tmp_path):
    dirs, outs = {}, {}
    for where, killed in (("between-shards", 1), ("in-manifest", 0)):
        dirs[where], outs[where] = tmp_path / f"ckpt-{where}", tmp_path / f"out-{where}"
        outs[where].mkdir()
        results = spawn_ranks(_save_then_die, 2, str(dirs[where]), where, str(outs[where]),
                              timeout_s=60, pg_timeout_s=10, grace_s=5)
        survivor = 1 - killed
        assert "killed by signal SIGKILL" in results[killed].error, results[killed]
        assert not results[survivor].ok
        report = json.loads((outs[where] / f"rank{survivor}.json").read_text())
        # the other rank stops at once, naming the dead one and its stage
        assert report["type"] == "CommError", report
        assert f"rank {killed} (pp {killed}, dp 0, tp 0), which runs stage {killed}" in (
            report["error"]), report["error"]
        good = json.loads((outs[where] / "good.json").read_text())
        files = set(os.listdir(dirs[where]))
        manifest = json.loads((dirs[where] / "manifest.json").read_text())
        assert manifest["save_id"] == good["save_id"], where  # the old manifest is in place
        assert set(good["files"]) <= files, where  # and every file it names
        dead = files - set(good["files"])
        assert any(n.startswith(".tmp-") for n in dead), (where, dead)  # the half-written one
        if where == "between-shards":
            assert any(n.startswith("shard-") for n in dead), dead  # rank 0's new shard
        outs[where] = good

    (result,) = spawn_ranks(_resume, 2, [str(dirs[w]) for w in dirs], timeout_s=90,
                            pg_timeout_s=20)[:1]
    assert result.ok, result.error + (result.traceback or "")
    r = result.value
    assert r["steps"] == [STEPS_BEFORE] * 2
    for k, where in enumerate(dirs):
        assert outs[where]["digest"] == r["at_save"]  # training is deterministic
        assert r["loaded"][k] == r["at_save"], where  # the previous checkpoint, bit for bit
        assert r["exact"][k], where  # resumed == never stopped, bit for bit
        files = r["files"][k]
        assert files.count("manifest.json") == 1 and not any(f.startswith(".tmp-")
                                                             for f in files), files
        assert len([f for f in files if f.startswith("shard-")]) == 2, files


@pytest.mark.parametrize("damage, words", [
    ("manifest-not-json", "is corrupt (JSONDecodeError"),
    ("manifest-fields", "'files' must map"),
    ("version", "checkpoint version 2"),
])
def test_a_damaged_manifest_is_refused_before_any_process_starts(tmp_path, damage, words):
    from tripar.runtime.checkpoint import CheckpointError, read_manifest

    manifest = {"format": "tripar-checkpoint", "version": 1, "save_id": "abc",
                "model": {"spec": SPEC, "fingerprint": "0" * 16}, "steps": 1,
                "shapes": {"w": [2]}, "files": {"w|param": ["shard-abc-00000.pt"]}}
    if damage == "manifest-fields":
        manifest["files"] = {"w|param": ["../../etc/passwd"]}
    if damage == "version":
        manifest["version"] = 2
    text = json.dumps(manifest)
    if damage == "manifest-not-json":
        text = text[: len(text) // 2]
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(CheckpointError) as err:
        read_manifest(tmp_path)
    assert words in str(err.value) and str(tmp_path) in str(err.value)
