"""Small models split by hand into stage programs, and the single-process reference run."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tripar.codegen.stage import StageProgram, TensorSpec

IN, D, CLASSES = 12, 16, 5


class Block(nn.Module):
    """Pre-norm MLP block with a residual: x + W2 gelu(W1 ln(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.up = nn.Linear(D, 2 * D)
        self.down = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.ln(x))))


def make_mlp(num_blocks: int = 8) -> nn.Sequential:
    """embed, ``num_blocks`` blocks, head: ``num_blocks + 2`` layers."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, D), *[Block() for _ in range(num_blocks)],
                         nn.LayerNorm(D), nn.Linear(D, CLASSES))


def make_batches(steps: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, IN, generator=g), torch.randint(0, CLASSES, (batch,), generator=g))
            for _ in range(steps)]


def loss_fn(out: torch.Tensor, mb: Sequence[torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(out, mb[1])


def split_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [a, b) slices of n layers."""
    cuts = [round(k * n / parts) for k in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def stage_programs(model: nn.Sequential, num_stages: int, stages: Sequence[int],
                   micro: int) -> list[StageProgram]:
    """Programs for ``stages`` of ``model`` cut into ``num_stages`` contiguous slices."""
    bounds = split_bounds(len(model), num_stages)
    out = []
    for s in stages:
        a, b = bounds[s]
        out.append(StageProgram(
            index=s, module=nn.Sequential(*model[a:b]),
            received=() if s == 0 else (TensorSpec((micro, D)),),
            sent=() if s == num_stages - 1 else (TensorSpec((micro, D)),),
            batch_inputs=(0,) if s == 0 else ()))
    return out


def reference(model: nn.Module, batches: list, make_opt: Callable, *,
              forward: Callable | None = None, clip: float | None = None
              ) -> tuple[nn.Module, list[float], list[float]]:
    """Train a copy of ``model`` on one process: the trained copy, the step losses and the
    gradient norms ``clip_grad_norm_`` saw."""
    model = copy.deepcopy(model)
    opt = make_opt(list(model.parameters()))
    losses, norms = [], []
    for batch in batches:
        out = forward(model, batch) if forward else model(batch[0])
        loss = loss_fn(out, batch)
        loss.backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses, norms


def sgd(params: list) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


def adamw(params: list) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


OPTIMIZERS = {"sgd": (sgd, 1e-5), "adamw": (adamw, 1e-4)}


SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1), ("scp", 1))
"""(schedule, vpp) pairs every multi-rank test runs."""


def train_and_compare(mesh, schedule: str, vpp: int, opt: str, *, zero: int = 0,
                      clip: float | None = None, num_microbatches: int = 4,
                      global_batch: int = 16, steps: int = 3) -> dict:
    """Train the split MLP on ``mesh`` and assert it matches one process. Returns what a
    test may check further: ``compared`` (parameters this rank compared), ``params`` (this
    rank's trained parameters by name), ``state_numel``, ``overlapped`` (buckets reduced
    inside the backward, summed over steps), ``norms`` (clipping's norms), ``grad_numel``
    (the most gradient values this rank held after a step's backward)."""
    from torch.testing import assert_close

    from tripar.partitioner.schedules import build_schedule
    from tripar.runtime.data_parallel import DataParallel, local_batch
    from tripar.runtime.executor import PipelineExecutor

    make_opt, rtol = OPTIMIZERS[opt]
    model = make_mlp()
    batches = make_batches(steps, global_batch)
    ref_model, ref_losses, ref_norms = reference(model, batches, make_opt, clip=clip)
    par = copy.deepcopy(model)
    pp = mesh.pp
    sched = build_schedule(schedule, pp, num_microbatches, vpp=vpp)
    stages = list(range(mesh.coords.pp, pp * vpp, pp))
    micro = global_batch // mesh.dp // num_microbatches
    programs = stage_programs(par, pp * vpp, stages, micro)
    sync = DataParallel([p.module for p in programs], mesh, make_opt, zero=zero,
                        bucket_bytes=4096)
    ex = PipelineExecutor(programs, sched, mesh, loss_fn=loss_fn, grad_sync=sync)
    losses, norms, overlapped, grad_numel = [], [], 0, 0
    for batch in batches:
        losses.append(ex.step(local_batch(batch, mesh)))
        overlapped += sync.overlapped
        grad_numel = max(grad_numel, sync.grad_numel())
        if clip is not None:
            norms.append(sync.clip_grad_norm_(clip))
        sync.step()
    sync.remove_hooks()
    what = f"{schedule} pp={pp} dp={mesh.dp} vpp={vpp} {opt} zero={zero} clip={clip}"
    assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=rtol, atol=rtol,
                 msg=lambda m: f"{what}: step losses differ: {m}")
    if clip is not None:
        assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=1e-6,
                     msg=lambda m: f"{what}: gradient norms differ: {m}")
        assert max(norms) > clip, f"{what}: the test must clip (norms {norms}, clip {clip})"
    held = {id(p) for p in ex.parameters()}
    ref = dict(ref_model.named_parameters())
    compared = 0
    for name, p in par.named_parameters():
        if id(p) in held:
            assert_close(p.detach(), ref[name].detach(), rtol=rtol, atol=rtol,
                         msg=lambda m, name=name: f"{what}: parameter {name}: {m}")
            compared += 1
    assert compared == len(held) > 0, (compared, len(held))
    params = {name: p.detach().clone() for name, p in par.named_parameters() if id(p) in held}
    return {"compared": compared, "params": params, "state_numel": sync.optimizer_state_numel(),
            "overlapped": overlapped, "norms": norms, "grad_numel": grad_numel,
            "padded": sum(b.padded for b in sync.buckets)}
