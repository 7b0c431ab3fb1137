"""The training engine of one rank: ``ParallelModel``, what ``tripar.auto_parallel`` returns.

A ``ParallelModel`` holds this rank's stage modules (its own weights only), the
pipeline executor, data parallelism (with the optimizer) and the tied-weight
gradient sums, and trains on global batches:

``train_step(batch)``
    takes this dp rank's share of ``batch``, runs the schedule (forward, backward,
    gradient reduction overlapping the backward), sums tied replicas' gradients across
    pipeline ranks, clips by the global norm when asked, steps the optimizer, and
    returns the step's mean loss, the same on every rank.
``eval_step(batch)``
    the mean loss without gradients (microbatches pass the stages in pipeline order).
``full_state_dict()``, ``save(dir)``, ``load(dir)``
    the whole model under its original FQNs on every rank; sharded, atomic,
    reshardable checkpoints (see :mod:`tripar.runtime.checkpoint`).

Every method is a collective: every rank calls it, with the same batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tripar.codegen.stage import StageProgram
from tripar.errors import ConfigError
from tripar.plan.plan import Plan
from tripar.runtime.checkpoint import load_checkpoint, save_checkpoint
from tripar.runtime.data_parallel import DataParallel, local_batch
from tripar.runtime.executor import Batch, PipelineExecutor, split_microbatches
from tripar.runtime.loss import model_loss
from tripar.runtime.mesh import CommError, Mesh, RankFailedError
from tripar.runtime.p2p import P2P
from tripar.runtime.params import LocalParam, whole_box
from tripar.runtime.tied import TiedGrads, TiedWeight

__all__ = ["BatchLayout", "ParallelModel"]

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True, slots=True)
class BatchLayout:
    """The form of the batches a plan was made for (from the example)."""

    form: str
    """``tuple`` or ``dict``."""
    fields: tuple[tuple[int | str, tuple[int, ...], torch.dtype], ...]
    """(key, shape without the batch dim, dtype) of each field the model reads."""
    global_batch: int

    def check(self, batch: Any) -> None:
        """Raise ConfigError unless ``batch`` has the example's form, keys and shapes."""
        if self.form == "dict" and not isinstance(batch, Mapping):
            raise ConfigError(f"the batch must be a dict of tensors like the example (keys "
                              f"{[k for k, _, _ in self.fields]}), got {type(batch).__name__}")
        if self.form == "tuple" and not isinstance(batch, (tuple, list)):
            raise ConfigError(f"the batch must be a tuple of tensors like the example "
                              f"({len(self.fields)} fields), got {type(batch).__name__}")
        for key, shape, dtype in self.fields:
            try:
                t = batch[key]
            except (KeyError, IndexError):
                raise ConfigError(f"the batch has no field {key!r}, which the model reads; "
                                  f"give batches in the form of the example") from None
            want = (self.global_batch, *shape)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want or t.dtype != dtype:
                got = (f"shape {tuple(t.shape)} and dtype {t.dtype}"
                       if isinstance(t, torch.Tensor) else f"a {type(t).__name__}")
                raise ConfigError(f"batch field {key!r} has {got}, but the plan is for shape "
                                  f"{want} and dtype {dtype} (global batch "
                                  f"{self.global_batch}); re-plan for the new batch shape")


class ParallelModel:
    """One rank's part of a model trained with data, tensor and pipeline parallelism."""

    def __init__(self, *, plan: Plan, mesh: Mesh, programs: Sequence[StageProgram],
                 params: Sequence[LocalParam], buffers: Mapping[str, torch.Tensor],
                 aliases: Mapping[str, tuple[str, ...]], tied: Sequence[TiedWeight],
                 layout: BatchLayout, make_optimizer: OptimizerFactory,
                 loss_fn: Callable[[Any, Batch], torch.Tensor] | None = None,
                 max_grad_norm: float | None = None, fingerprint: str = "",
                 extra_state: Mapping[str, torch.Tensor] | None = None,
                 transformers: Mapping[str, Any] | None = None) -> None:
        """Built by ``tripar.auto_parallel``. ``aliases``: canonical FQN -> every FQN naming
        that tensor in the full state dict; ``extra_state``: entries of the full state dict no
        stage holds (buffers the graph does not read), the same on every rank;
        ``transformers``: the class, config and name prefix of a transformers model (kept
        in checkpoints for ``tripar export --to hf``), None for other models."""
        self.plan, self.mesh, self.layout = plan, mesh, layout
        self.programs = tuple(programs)
        self.params = tuple(params)
        self.buffers = dict(buffers)
        self.aliases = dict(aliases)
        self.fingerprint = fingerprint or plan.model.fingerprint
        self.max_grad_norm = max_grad_norm
        self.extra_state = dict(extra_state or {})
        self.transformers = dict(transformers) if transformers else None
        self.steps = 0
        """Optimizer steps taken (restored by ``load``)."""
        self.last_grad_norm: float | None = None
        """The global gradient norm of the last ``train_step`` before clipping (None
        without ``max_grad_norm``; ``max_grad_norm=math.inf`` measures it, clipping nothing)."""
        by_fqn = {lp.fqn: lp.param for lp in self.params}
        self.tied = TiedGrads(mesh, tied, by_fqn)
        duplicates = [lp.param for lp in self.params if not lp.counts]
        duplicates += [p for p in self.tied.duplicates if all(p is not d for d in duplicates)]
        def optimizer_for(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            if params:
                return make_optimizer(params)
            # a stage without weights (only the loss): an optimizer with nothing to step
            return torch.optim.SGD([nn.Parameter(torch.zeros(0))], lr=0.0)

        self.data_parallel = DataParallel(
            [p.module for p in self.programs], mesh, optimizer_for, zero=plan.parallel.zero,
            norm_duplicates=duplicates, isolate=self.tied.parameters)
        self.executor = PipelineExecutor(self.programs, plan.to_schedule(), mesh,
                                         loss_fn=loss_fn, grad_sync=self.data_parallel)
        self.loss_fn = loss_fn

    # ---- training ---------------------------------------------------------------------------

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer of this rank (with ZeRO-1 it holds flat shards)."""
        return self.data_parallel.optimizer

    def train_step(self, batch: Batch) -> float:
        """One optimizer step on the global ``batch`` (the same on every rank); its mean loss."""
        self.layout.check(batch)
        for m in self.programs:
            m.module.train()
        loss = self.executor.step(local_batch(batch, self.mesh))
        try:
            self.tied.sum_(self.data_parallel.reduced_grad)
            if self.max_grad_norm is not None:
                self.last_grad_norm = self.data_parallel.clip_grad_norm_(self.max_grad_norm)
            self.data_parallel.step()
        except (RankFailedError, CommError):
            raise
        except BaseException as exc:
            message = (f"{self.mesh.describe()} failed in the optimizer step: "
                       f"{type(exc).__name__}: {exc}")
            self.mesh.report_failure(message)
            raise
        self.steps += 1
        return loss

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> float:
        """The mean loss of the global ``batch`` without gradients or updates."""
        self.layout.check(batch)
        mesh, plan = self.mesh, self.plan
        m = plan.parallel.num_microbatches
        num_stages = len(plan.stages)
        for prog in self.programs:
            prog.module.eval()
        mbs = split_microbatches(local_batch(batch, mesh), m)
        mine = {p.index: p for p in self.programs}
        schedule = self.executor.schedule
        here = mesh.coords.pp

        def rank(stage: int, j: int) -> int:  # chimera: the microbatch's pipeline places it
            return mesh.pp_rank_global(schedule.rank_of(stage, j))
        p2p = P2P(mesh)
        total = torch.zeros((), dtype=torch.float64, device=mesh.device)
        try:
            for j, mb in enumerate(mbs):
                for s in sorted(mine):
                    if schedule.rank_of(s, j) != here:
                        continue  # the other pipeline's copy of the stage runs it
                    prog = mine[s]
                    received: tuple[torch.Tensor, ...] = ()
                    if s > 0:
                        tag = (s * m + j) * 2
                        pending = p2p.post_recv(prog.received, rank(s - 1, j), tag,
                                                f"stage {s - 1}'s output for microbatch {j}")
                        received = p2p.wait_recv(pending, tag)
                    out = prog.module(*received, *(mb[k] for k in prog.batch_inputs))
                    if s == num_stages - 1:
                        loss = model_loss(out, mb, self.loss_fn, where=f"the last stage ({s})")
                        total += loss.detach().to(torch.float64)
                    else:
                        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
                        p2p.send(outs, rank(s + 1, j), ((s + 1) * m + j) * 2,
                                 f"stage {s}'s output for microbatch {j}")
            p2p.flush()
        except (RankFailedError, CommError):
            raise
        except BaseException as exc:
            mesh.report_failure(f"{mesh.describe()} failed in eval_step: "
                                f"{type(exc).__name__}: {exc}")
            raise
        total /= m
        for axis in ("pp", "dp"):
            if mesh.size(axis) > 1:
                group = mesh.group(axis)
                mesh.wait([dist.all_reduce(total, group=group, async_op=True)],
                          what=f"the eval loss over {axis}",
                          peers=tuple(dist.get_process_group_ranks(group)))
        return float(total) / mesh.dp

    # ---- state ------------------------------------------------------------------------------

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This rank's parameters by canonical FQN (slices of them under tensor parallelism)."""
        return [(lp.fqn, lp.param) for lp in self.params]

    def parameters(self) -> list[nn.Parameter]:
        return [lp.param for lp in self.params]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the original model under its original FQNs (tied
        weights under each of their names), on every rank. A collective over the world."""
        pieces: list[tuple[str, tuple[int, ...], tuple[tuple[int, int], ...], torch.Tensor]] = []
        if self.mesh.coords.dp == 0:
            for lp in self.params:
                if lp.counts:
                    for box, part in lp.pieces(lp.param.detach().cpu()):
                        pieces.append((lp.fqn, lp.shape, box, part))
            if self.mesh.coords.tp == 0:
                for fqn, t in self.buffers.items():
                    pieces.append((fqn, tuple(t.shape), whole_box(t.shape), t.detach().cpu()))
        gathered: list[Any] = [None] * self.mesh.world_size
        with self.mesh.guard("every rank's parameters for the full state dict"):
            dist.all_gather_object(gathered, pieces)
        out: dict[str, torch.Tensor] = {}
        for rank_pieces in gathered:
            for fqn, shape, box, t in rank_pieces:
                if fqn not in out:
                    out[fqn] = torch.empty(shape, dtype=t.dtype)
                out[fqn][tuple(slice(a, b) for a, b in box)] = t
        full = {}
        for fqn, t in out.items():
            for name in self.aliases.get(fqn, (fqn,)):
                full[name] = t
        for fqn, t in self.extra_state.items():
            full.setdefault(fqn, t.detach().cpu().clone())
        return full

    def save(self, directory: str, *, extra: dict[str, Any] | None = None) -> None:
        """Write a sharded checkpoint of model and optimizer to ``directory`` (atomic);
        ``extra``: JSON values kept in its manifest (see ``save_checkpoint``)."""
        save_checkpoint(self, directory, extra=extra)

    def load(self, directory: str) -> None:
        """Load a checkpoint written by ``save``, under this or any other plan."""
        load_checkpoint(self, directory)

    def close(self) -> None:
        """Detach the gradient hooks (the model can then be dropped)."""
        self.data_parallel.remove_hooks()
