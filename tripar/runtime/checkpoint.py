"""Sharded, atomic, reshardable checkpoints of a ParallelModel: model and optimizer by FQN.

Layout of a checkpoint directory::

    manifest.json              what was saved, and which file holds which FQN
    shard-<save id>-<rank>.pt  one per rank that holds something

Every tensor is stored as *pieces* under the original model's FQNs: a piece is
``(fqn, key, box, flat, tensor)`` -- ``key`` is ``param`` or ``optim.<state name>``
(``optim.exp_avg``, ``optim.exp_avg_sq``, ``optim.step`` for AdamW); ``box`` the
``[start, stop)`` per dim of the whole tensor that a rank holds (all of it without
tensor parallelism; a fused weight's slice, such as QKV cut per part, is one piece per
part, and with ZeRO-1 its optimizer state is gathered over dp and written by dp rank 0);
``flat`` the ``[a, b)`` range of that box's flattened values
the piece carries (all of it, except for ZeRO-1 optimizer state, where each dp rank
holds a slice of a flat bucket). Loading therefore does not care which plan wrote a
checkpoint: each rank reads the files the manifest names for the FQNs it holds,
assembles them, and cuts out its own box (and its ZeRO slice).

The manifest also keeps the model's spec and fingerprint, the plan's degrees, the step
count, the optimizer's class and hyperparameters, tied weights' other names
(``aliases``), a trainer's ``extra`` values and, for a transformers model, its class,
config and name prefix (``transformers``: what ``tripar export --to hf`` rebuilds it from).
:func:`read_state_dict` assembles the whole model in one process, with no process group.

Atomicity: each rank writes its shard to a temporary file, flushes it to disk and
renames it to a name carrying this save's id; after a barrier rank 0 writes the
manifest the same way -- last. A crash at any point before the manifest's rename
leaves the previous manifest, and the files it names, in place; files no manifest
names are removed after a successful save.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from tripar.errors import PlanError
from tripar.runtime.data_parallel import all_gather_flat
from tripar.runtime.params import Box, LocalParam, whole_box

__all__ = ["CheckpointError", "load_checkpoint", "read_manifest", "read_state_dict", "save_checkpoint"]

FORMAT, VERSION = "tripar-checkpoint", 1
MANIFEST = "manifest.json"
_SHARD_NAME = re.compile(r"shard-[0-9a-f]+-[0-9]+\.pt")

Piece = tuple[str, str, Box, tuple[int, int], torch.Tensor]


class Checkpointed(Protocol):
    """What a checkpoint reads from and writes into: a ``ParallelModel``'s state."""

    plan: Any
    mesh: Any
    params: tuple[LocalParam, ...]
    buffers: dict[str, torch.Tensor]
    extra_state: dict[str, torch.Tensor]
    transformers: dict[str, Any] | None
    aliases: dict[str, tuple[str, ...]]
    tied: Any
    data_parallel: Any
    fingerprint: str
    steps: int

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...


class CheckpointError(PlanError):
    """A checkpoint is missing, corrupt, or was written for another model."""


# ---- what a rank holds ---------------------------------------------------------------------

def _pieces(pm: Checkpointed) -> list[Piece]:
    mesh, dp = pm.mesh, pm.data_parallel
    skip = {id(p) for p in pm.tied.duplicates}
    out: list[Piece] = []
    counted = [lp for lp in pm.params if lp.counts and id(lp.param) not in skip]

    def add(lp: LocalParam, key: str, local: torch.Tensor) -> None:
        for box, part in lp.pieces(local):
            out.append((lp.fqn, key, box, (0, part.numel()), part))

    if mesh.coords.dp == 0:
        for lp in counted:
            add(lp, "param", lp.param.detach())
        if mesh.coords.tp == 0:
            for name, t in pm.buffers.items():
                out.append((name, "param", whole_box(t.shape), (0, t.numel()), t.detach()))
        if mesh.rank == 0:
            for name, t in pm.extra_state.items():
                out.append((name, "param", whole_box(t.shape), (0, t.numel()), t.detach()))
    if not dp.zero:
        if mesh.coords.dp == 0:
            for lp in counted:
                for key, value in dp.optimizer.state.get(lp.param, {}).items():
                    if _is_elementwise(value, lp.param.numel()):
                        add(lp, f"optim.{key}", value.detach().reshape(lp.param.shape))
                    elif isinstance(value, torch.Tensor) and value.dim() == 0:
                        out.append((lp.fqn, f"optim.{key}", (), (0, 1), value.detach()))
        return out
    by_param = {id(lp.param): lp for lp in counted}
    fused = {id(lp.param) for lp in pm.params if len(lp.boxes) > 1}
    for k, (shard, b) in enumerate(zip(dp.shards, dp.buckets)):
        state = dp.optimizer.state.get(shard, {})
        owned = dp.owned_slice(b.padded)
        lo, hi = owned.start, owned.stop
        whole = {}
        if any(id(p) in fused for p in b.params):  # the same buckets on every dp rank
            whole = _gather_state(pm, state, b.padded, k)
        for p, off in zip(b.params, b.offsets):
            lp = by_param.get(id(p))
            if lp is None:
                continue
            if id(p) in fused:
                # a fused weight's boxes interleave in its flat layout: dp rank 0 writes
                # the whole local tensor's state, gathered from the dp ranks' slices
                if mesh.coords.dp == 0:
                    for key, value in whole.items():
                        if value.dim() == 0:
                            out.append((lp.fqn, f"optim.{key}", (), (0, 1), value))
                        else:
                            add(lp, f"optim.{key}", value[off:off + p.numel()].view(p.shape))
                continue
            a, z = max(lo, off), min(hi, off + p.numel())
            if a >= z:
                continue
            for key, value in state.items():
                if _is_elementwise(value, shard.numel()):
                    out.append((lp.fqn, f"optim.{key}", lp.boxes[0], (a - off, z - off),
                                value.detach()[a - lo:z - lo]))
                elif isinstance(value, torch.Tensor) and value.dim() == 0:
                    out.append((lp.fqn, f"optim.{key}", (), (0, 1), value.detach()))
    return out


def _gather_state(pm: Checkpointed, state: dict, padded: int, bucket: int
                  ) -> dict[str, torch.Tensor]:
    """The ZeRO-1 optimizer state of a whole bucket, all-gathered from the dp ranks' slices
    (a collective over dp)."""
    mesh = pm.mesh
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.dim() == 0:
            out[key] = value.detach()
            continue
        full = torch.empty(padded, dtype=value.dtype, device=value.device)
        work = all_gather_flat(full, value.detach().contiguous(),
                                           group=mesh.grad_group, async_op=True)
        mesh.wait([work], what=f"the ZeRO-1 optimizer state ({key}) of bucket {bucket} "
                  "for the checkpoint", peers=tuple(dist.get_process_group_ranks(mesh.grad_group)))
        out[key] = full
    return out


def _is_elementwise(value: Any, numel: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() == numel


def _hyper(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    group = optimizer.param_groups[0]
    out = {}
    for k, v in group.items():
        if k == "params":
            continue
        if isinstance(v, torch.Tensor):
            v = v.item()
        if isinstance(v, (int, float, bool, str, type(None), tuple, list)):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


# ---- save ----------------------------------------------------------------------------------

def _durable_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier(pm: Checkpointed, what: str) -> None:
    pm.mesh.wait([dist.barrier(async_op=True)], what=what)


def _write_manifest(directory: Path, manifest: dict) -> None:
    _durable_write(directory / MANIFEST,
                   lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(pm: Checkpointed, directory: str | os.PathLike, *,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``pm``'s model and optimizer to ``directory`` (a collective; atomic).

    ``extra``: JSON values a trainer keeps with the checkpoint (the data position, say),
    written into the manifest as ``"extra"`` from rank 0's call; ``read_manifest`` returns
    them. A manifest without it reads as before."""
    mesh = pm.mesh
    path = Path(directory)
    ids: list[Any] = [uuid.uuid4().hex[:12] if mesh.rank == 0 else None]
    with mesh.guard("the checkpoint's save id from rank 0", (0,)):
        dist.broadcast_object_list(ids, src=0)
    save_id = ids[0]
    if mesh.rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    _barrier(pm, "the checkpoint directory")
    pieces = _pieces(pm)
    name = f"shard-{save_id}-{mesh.rank:05d}.pt"
    index = sorted({(p[0], p[1]) for p in pieces})
    if pieces:
        payload = [(f, k, b, fl, t.cpu().clone()) for f, k, b, fl, t in pieces]
        _durable_write(path / name, lambda f: torch.save(payload, f))
    shapes = {lp.fqn: list(lp.shape) for lp in pm.params}
    shapes.update({n: list(t.shape) for n, t in pm.buffers.items()})
    shapes.update({n: list(t.shape) for n, t in pm.extra_state.items()})
    gathered: list[Any] = [None] * mesh.world_size
    with mesh.guard("every rank's checkpoint shard to be written"):
        dist.all_gather_object(gathered, (name if pieces else None, index, shapes))
    if mesh.rank == 0:
        files: dict[str, list[str]] = defaultdict(list)
        all_shapes: dict[str, list[int]] = {}
        for file, held, sh in gathered:
            all_shapes.update(sh)
            for fqn, key in held:
                files[f"{fqn}|{key}"].append(file)
        plan = pm.plan
        manifest = {
            "format": FORMAT, "version": VERSION, "save_id": save_id,
            "model": {"spec": plan.model.spec, "fingerprint": pm.fingerprint},
            "parallel": {"dp": plan.parallel.dp, "tp": plan.parallel.tp,
                         "pp": plan.parallel.pp, "zero": plan.parallel.zero},
            "steps": pm.steps,
            "optimizer": {"class": type(pm.optimizer).__name__, "hyper": _hyper(pm.optimizer)},
            "shapes": all_shapes,
            "aliases": {k: list(v) for k, v in pm.aliases.items() if len(v) > 1},
            "files": {k: sorted(set(v)) for k, v in sorted(files.items())},
        }
        if pm.transformers:
            manifest["transformers"] = pm.transformers
        if extra:
            manifest["extra"] = extra
        _write_manifest(path, manifest)
    _barrier(pm, "the checkpoint manifest")
    if mesh.rank == 0:
        keep = {MANIFEST} | {file for file, _, _ in gathered if file}
        for child in path.iterdir():
            if child.is_file() and child.name not in keep and (
                    child.name.startswith(("shard-", ".tmp-"))):
                child.unlink(missing_ok=True)
    return path


# ---- load ----------------------------------------------------------------------------------

def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a checkpoint directory, checked for format and version."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {directory}: {MANIFEST} is missing "
                              f"(an interrupted first save leaves none)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # unreadable, not UTF-8, not JSON
        raise CheckpointError(f"{path} is corrupt ({type(error).__name__}: "
                              f"{str(error)[:200]}); restore it or use an older checkpoint"
                              ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tripar checkpoint manifest (no \"format\": "
                              f"\"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {manifest.get('version')!r}; "
                              f"this tripar reads version {VERSION}: load it with the tripar "
                              f"that wrote it")
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"{path} is corrupt: {problem}; restore it or use an older "
                              f"checkpoint")
    return manifest


def _manifest_problem(m: dict) -> str:
    """What is wrong with the fields ``load_checkpoint`` reads, or ``""``."""
    model = m.get("model")
    if not isinstance(model, dict) or not all(isinstance(model.get(k), str)
                                              for k in ("spec", "fingerprint")):
        return "'model' must hold the strings 'spec' and 'fingerprint'"
    steps = m.get("steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        return f"'steps' must be an integer >= 0, got {steps!r}"
    files, shapes = m.get("files"), m.get("shapes")
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and "|" in k and isinstance(v, list) and v
            and all(isinstance(f, str) and _SHARD_NAME.fullmatch(f) for f in v)
            for k, v in files.items()):
        return "'files' must map 'fqn|key' to lists of shard file names in the checkpoint"
    if not isinstance(shapes, dict) or not all(
            isinstance(v, list) and all(isinstance(n, int) and not isinstance(n, bool)
                                        and n >= 0 for n in v) for v in shapes.values()):
        return "'shapes' must map each FQN to a list of sizes"
    missing = sorted({k.split("|", 1)[0] for k in files} - set(shapes))
    if missing:
        return f"'shapes' lacks {missing[:3]}"
    optimizer = m.get("optimizer", {})
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("hyper", {}), dict):
        return "'optimizer' must be an object with a 'hyper' object"
    if not isinstance(m.get("extra", {}), dict):
        return "'extra' must be an object"
    source = m.get("transformers", {})
    if not isinstance(source, dict) or source and not (
            isinstance(source.get("class"), str) and isinstance(source.get("prefix"), str)
            and isinstance(source.get("config"), dict)):
        return "'transformers' must hold the strings 'class' and 'prefix' and a 'config' object"
    return ""


def _read_pieces(directory: Path, files: set[str], wanted: set[tuple[str, str]]
                 ) -> dict[tuple[str, str], list[tuple[Box, tuple[int, int], torch.Tensor]]]:
    found: dict[tuple[str, str], list] = defaultdict(list)
    for file in sorted(files):
        try:
            payload = torch.load(directory / file, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable shard is the same problem
            raise CheckpointError(f"checkpoint shard {directory / file} cannot be read "
                                  f"({type(error).__name__}: {str(error)[:200]}); the "
                                  f"checkpoint is incomplete or corrupt") from None
        if not isinstance(payload, list) or not all(_is_piece(p) for p in payload):
            raise CheckpointError(f"checkpoint shard {directory / file} does not hold tripar "
                                  f"checkpoint pieces (fqn, key, box, range, tensor); the "
                                  f"checkpoint is corrupt or another program wrote that file")
        for fqn, key, box, flat, tensor in payload:
            if (fqn, key) in wanted:
                found[(fqn, key)].append((tuple(tuple(b) for b in box), tuple(flat), tensor))
    return found


def _is_piece(p: Any) -> bool:
    return (isinstance(p, tuple) and len(p) == 5 and isinstance(p[0], str)
            and isinstance(p[1], str) and isinstance(p[4], torch.Tensor)
            and isinstance(p[2], (tuple, list)) and all(
                isinstance(b, (tuple, list)) and len(b) == 2 for b in p[2])
            and isinstance(p[3], (tuple, list)) and len(p[3]) == 2)


def _assemble(shape: list[int], pieces: list[tuple[Box, tuple[int, int], torch.Tensor]]
              ) -> torch.Tensor:
    if not shape and pieces and not pieces[0][0]:
        return pieces[0][2].clone()  # a scalar (the optimizer's step)
    full = torch.empty(shape, dtype=pieces[0][2].dtype)
    boxes: dict[Box, torch.Tensor] = {}
    for box, (a, b), tensor in pieces:
        numel = 1
        for lo, hi in box:
            numel *= hi - lo
        flat = boxes.setdefault(box, torch.empty(numel, dtype=tensor.dtype))
        flat[a:b] = tensor.reshape(-1)
    for box, flat in boxes.items():
        full[tuple(slice(lo, hi) for lo, hi in box)] = flat.view([hi - lo for lo, hi in box])
    return full


def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The whole model of a checkpoint as one state dict, in this process (no process group,
    whatever plan wrote it): every parameter and buffer assembled from its tensor-parallel
    and fused pieces under its original FQN, a tied weight under each of its names (one
    tensor). Optimizer state is not read."""
    path = Path(directory)
    manifest = read_manifest(path)
    files, shapes = manifest["files"], manifest["shapes"]
    wanted = {(k.split("|", 1)[0], "param") for k in files if k.endswith("|param")}
    found = _read_pieces(path, {f for fqn, _ in wanted for f in files[f"{fqn}|param"]}, wanted)
    state: dict[str, torch.Tensor] = {}
    for fqn, key in sorted(wanted):
        if not found.get((fqn, key)):
            raise CheckpointError(f"the checkpoint at {path} lacks {fqn}: a shard file is "
                                  f"missing or truncated")
        try:
            whole = _assemble(shapes[fqn], found[(fqn, key)])
        except (RuntimeError, ValueError, IndexError) as error:
            raise CheckpointError(f"the checkpoint at {path} is corrupt: the pieces of {fqn} "
                                  f"do not fit its shape {shapes[fqn]} ({type(error).__name__}: "
                                  f"{str(error)[:120]})") from None
        for name in manifest.get("aliases", {}).get(fqn, [fqn]):
            state[name] = whole
    return state


def load_checkpoint(pm: Checkpointed, directory: str | os.PathLike) -> None:
    """Load ``directory`` (written by ``save_checkpoint`` under any plan) into ``pm``."""
    path = Path(directory)
    manifest = read_manifest(path)
    if manifest["model"]["fingerprint"] != pm.fingerprint:
        raise CheckpointError(
            f"the checkpoint at {path} is for model {manifest['model']['spec']!r} (fingerprint "
            f"{manifest['model']['fingerprint']}), this model's fingerprint is "
            f"{pm.fingerprint}; load it into the model it was saved from")
    files, shapes = manifest["files"], manifest["shapes"]
    wanted: set[tuple[str, str]] = set()
    names = [lp.fqn for lp in pm.params] + list(pm.buffers) + list(pm.extra_state)
    for fqn in names:
        if f"{fqn}|param" not in files:
            raise CheckpointError(f"the checkpoint at {path} has no tensor {fqn!r}")
        wanted.add((fqn, "param"))
    optim_keys = sorted({k.split("|", 1)[1] for k in files if "|optim." in k})
    for lp in pm.params:
        wanted |= {(lp.fqn, k) for k in optim_keys if f"{lp.fqn}|{k}" in files}
    needed = {f for fqn, key in wanted for f in files[f"{fqn}|{key}"]}
    found = _read_pieces(path, needed, wanted)
    full = {}
    for k in wanted:
        if found.get(k):
            scalar = k[1] != "param" and not found[k][0][0]
            try:
                full[k] = _assemble([] if scalar else shapes[k[0]], found[k])
            except (RuntimeError, ValueError, IndexError) as error:
                raise CheckpointError(f"the checkpoint at {path} is corrupt: the pieces of "
                                      f"{k[0]} ({k[1]}) do not fit its shape {shapes[k[0]]} "
                                      f"({type(error).__name__}: {str(error)[:120]})") from None
    for lp in pm.params:
        got = full.get((lp.fqn, "param"))
        if got is not None and list(got.shape) != list(lp.shape):
            raise CheckpointError(f"the checkpoint at {path} has {lp.fqn} of shape "
                                  f"{list(got.shape)}, this model's is {list(lp.shape)}; load it "
                                  f"into the model it was saved from")
    missing = sorted(f"{f} ({k})" for f, k in wanted if (f, k) not in full)
    if missing:
        raise CheckpointError(f"the checkpoint at {path} lacks {missing[:5]}: a shard file is "
                              f"missing or truncated")
    with torch.no_grad():
        for lp in pm.params:
            lp.param.copy_(lp.cut(full[(lp.fqn, "param")]))
        for name, t in pm.buffers.items():
            t.copy_(full[(name, "param")])
        for name, t in pm.extra_state.items():
            t.copy_(full[(name, "param")])
    pm.data_parallel.reload_shards()
    _load_optimizer(pm, full, optim_keys, manifest)
    pm.steps = int(manifest.get("steps", 0))
    _barrier(pm, "every rank to finish loading the checkpoint")


def _load_optimizer(pm: Checkpointed, full: dict, keys: list[str], manifest: dict) -> None:
    dp = pm.data_parallel
    opt = dp.optimizer
    hyper = manifest.get("optimizer", {}).get("hyper", {})
    for group in opt.param_groups:
        for k, v in hyper.items():
            if k in group:
                group[k] = tuple(v) if isinstance(group[k], tuple) else v
    opt.state.clear()
    if not keys:
        return
    if not dp.zero:
        for lp in pm.params:
            state = {}
            for key in keys:
                value = full.get((lp.fqn, key))
                if value is None:
                    continue
                state[key.removeprefix("optim.")] = (
                    value.clone() if value.dim() == 0
                    else lp.cut(value).to(lp.param.dtype).clone())
            if state:
                opt.state[lp.param] = state
        return
    fqn_of = {id(lp.param): lp for lp in pm.params}
    for shard, b in zip(dp.shards, dp.buckets):
        owned = dp.owned_slice(b.padded)
        lo, hi = owned.start, owned.stop
        state = {}
        for key in keys:
            flat = torch.zeros(b.padded, dtype=shard.dtype)
            scalar = None
            for p, off in zip(b.params, b.offsets):
                lp = fqn_of[id(p)]
                value = full.get((lp.fqn, key))
                if value is None:
                    continue
                if value.dim() == 0:
                    scalar = value
                else:
                    flat[off:off + p.numel()] = lp.cut(value).reshape(-1)
            name = key.removeprefix("optim.")
            state[name] = scalar.clone() if scalar is not None else flat[lo:hi].clone()
        opt.state[shard] = state
