"""auto_parallel on real gloo ranks: every layout and schedule trains exactly like one process.

One process group per world size (2, 4, 8) runs every configuration (models x (dp, tp, pp)
layouts x schedules x optimizers), rebuilding the ParallelModel each time inside the same ranks.
"""

from __future__ import annotations

import functools
import io
import math
import time

import pytest
import torch
from torch.testing import assert_close

from tests._ranks import run_ranks
from tripar import api
from tripar.models import load_model

MODELS = {
    "gpt": "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8",
    "llama": "llama:layers=2,hidden=32,heads=4,kv_heads=2,vocab=64,seq=8",
    "bert": "bert:layers=2,hidden=32,heads=4,vocab=64,seq=8",
    "vit": "vit:image=16,patch=8,layers=2,hidden=32,heads=4,classes=10",
    "hf_gpt2": "hf:GPT2LMHeadModel:n_layer=2,n_embd=32,n_head=4,vocab_size=64,n_positions=16",
}
GLOBAL_BATCH, STEPS = 4, 3
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1), ("scp", 1))
# (dp, tp, pp, schedule, vpp, zero) per group of configurations, each group run on one set
# of ranks (world = dp * tp * pp of its layouts); microbatches of one sample
LAYOUTS = {
    "world2": [(1, 1, 2, s, v, 0) for s, v in SCHEDULES]
              + [(2, 1, 1, "1f1b", 1, 0), (2, 1, 1, "1f1b", 1, 1), (1, 2, 1, "1f1b", 1, 0)],
    "world4-dp-pp": [(1, 1, 4, s, v, 0) for s, v in SCHEDULES if v == 1]
                    + [(2, 1, 2, s, v, int(s == "1f1b")) for s, v in SCHEDULES],
    "world4-tp": [(1, 2, 2, s, v, 0) for s, v in SCHEDULES]
                 + [(2, 2, 1, "1f1b", 1, 0), (2, 2, 1, "1f1b", 1, 1)],
    "world8": [(2, 2, 2, s, v, int(s == "1f1b")) for s, v in SCHEDULES],
}
# AdamW's eps is 1e-6: a key projection's bias has an exactly zero gradient (softmax does not
# see it), so its computed gradient is rounding noise (~1e-9), which AdamW with eps=1e-8 turns
# into steps of ~lr/10 whose sign depends on summation order (dp, microbatches).
OPTIMIZERS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.1), 1e-5),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, eps=1e-6), 1e-4),
}


@functools.cache
def _model(name: str):
    """The model (the initial weights every run starts from), its example and its capture;
    each rank captures for itself (graphs do not pickle)."""
    spec = MODELS[name]
    loaded = load_model(spec, batch_size=1, seq_len=8 if spec.startswith("hf:") else None)
    captured = api.capture_model(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    return loaded, captured


@functools.cache
def batches(name: str) -> tuple:
    """The global batch of each step."""
    spec = MODELS[name]
    out = []
    for step in range(STEPS):
        more = load_model(spec, batch_size=GLOBAL_BATCH, seed=100 + step,
                          seq_len=8 if spec.startswith("hf:") else None)
        out.append(more.example_kwargs or more.example_inputs)
    return tuple(out)


def _forward(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(*batch)


def _micro(batch, k: int):
    if isinstance(batch, dict):
        return {key: t[k:k + 1] for key, t in batch.items()}
    return tuple(t[k:k + 1] for t in batch)


@functools.cache
def reference(name: str, opt: str) -> dict[str, torch.Tensor]:
    """Single-process training with the same one-sample microbatches (gradients accumulated).
    Computed by the test process, once, and handed to the ranks."""
    spec = MODELS[name]
    model = load_model(spec, batch_size=1, seq_len=8 if spec.startswith("hf:") else None).model
    make_opt, _ = OPTIMIZERS[opt]
    optimizer = make_opt(list(model.parameters()))
    for batch in batches(name):
        for k in range(GLOBAL_BATCH):
            (_forward(model, _micro(batch, k)) / GLOBAL_BATCH).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(name: str, opt: str, dp: int, tp: int, pp: int, schedule: str, vpp: int, zero: int,
          steps: tuple):
    loaded, captured = _model(name)
    make_opt, _ = OPTIMIZERS[opt]
    pm = api.auto_parallel(loaded.model, captured=captured, example_inputs=loaded.example_inputs,
                           example_kwargs=loaded.example_kwargs, optimizer=make_opt,
                           global_batch_size=GLOBAL_BATCH, dp=dp, tp=tp, pp=pp, vpp=vpp,
                           num_microbatches=GLOBAL_BATCH // dp, schedule=schedule, zero=zero,
                           timeout_s=30)
    losses = [pm.train_step(b) for b in steps]
    return pm, losses


def _compare_all(group: str, data: bytes) -> list[str]:
    """On every rank: each model of ``data`` (``torch.save`` of name -> (step batches,
    {optimizer: the single-process result})) trained under every layout of ``group``, and
    compared. (Bytes: tensors pickled by multiprocessing travel as one shared-memory file
    descriptor each.)"""
    done = []
    for name, (steps, refs) in torch.load(io.BytesIO(data), weights_only=False).items():
        for opt, ref in refs.items():
            rtol = OPTIMIZERS[opt][1]
            for dp, tp, pp, schedule, vpp, zero in LAYOUTS[group]:
                t0 = time.perf_counter()
                pm, losses = train(name, opt, dp, tp, pp, schedule, vpp, zero, steps)
                what = f"{name} {opt} dp={dp} tp={tp} pp={pp} {schedule} vpp={vpp} zero={zero}"
                assert pm.plan.parallel.schedule == schedule or pp == 1, what
                if tp > 1:  # regions sharded, and this rank holds slices of their weights
                    assert pm.plan.tp_regions, what
                    sliced = [lp for lp in pm.params if lp.param.shape != lp.shape]
                    assert sliced and all(lp.param.numel() * tp == math.prod(lp.shape)
                                          for lp in sliced), what
                full = pm.full_state_dict()
                pm.close()
                assert set(full) == set(ref), (what, set(full) ^ set(ref))
                for key, value in ref.items():
                    assert_close(full[key], value, rtol=rtol, atol=rtol,
                                 msg=lambda m, key=key, what=what: f"{what}: {key}: {m}")
                assert all(torch.isfinite(torch.tensor(losses))), what
                done.append(f"{what} {time.perf_counter() - t0:.2f}s")
    return done


@pytest.mark.timeout(600)
@pytest.mark.parametrize("group", list(LAYOUTS))
def test_every_layout_matches_single_process(group):
    (world,) = {dp * tp * pp for dp, tp, pp, *_ in LAYOUTS[group]}
    data = io.BytesIO()
    torch.save({name: (batches(name), {opt: reference(name, opt) for opt in OPTIMIZERS})
                for name in MODELS}, data)
    results = run_ranks(_compare_all, world, group, data.getvalue(), timeout_s=570,
                        pg_timeout_s=60)
    print("\n".join(results[0]))
    assert len(results[0]) == len(MODELS) * len(OPTIMIZERS) * len(LAYOUTS[group])


def _dropout_schedules() -> list[float]:
    """With dropout, tp=2 x pp=2: scp (forward without activations, then recompute) draws
    the very masks 1F1B draws, in the replicated and in the tensor-parallel streams."""
    import torch.distributed as dist

    spec = "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8,dropout=0.2"
    loaded = load_model(spec, batch_size=GLOBAL_BATCH)
    captured = api.capture_model(loaded.model, loaded.example_inputs)
    states = {}
    for schedule in ("1f1b", "scp"):
        torch.manual_seed(1234 + dist.get_rank() % 2)  # each tp rank its own default stream
        pm = api.auto_parallel(loaded.model, captured=captured, optimizer=OPTIMIZERS["sgd"][0],
                               tp=2, pp=2, num_microbatches=GLOBAL_BATCH, schedule=schedule,
                               seed=7, timeout_s=30)
        for _ in range(2):
            pm.train_step(loaded.example_inputs)
        states[schedule] = pm.full_state_dict()
        pm.close()
    without = {}
    for key, value in states["1f1b"].items():
        assert_close(states["scp"][key], value, rtol=1e-6, atol=1e-6,
                     msg=lambda m, key=key: f"{key}: {m}")
        without[key] = float((value - loaded.model.state_dict()[key]).abs().max())
    return sorted(without.values())[-3:]


def test_scp_recompute_replays_dropout_masks_with_tensor_parallelism():
    for moved in run_ranks(_dropout_schedules, 4, timeout_s=180, pg_timeout_s=60):
        assert moved[-1] > 1e-3  # it trained
