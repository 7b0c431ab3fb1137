"""Run this rank's part of a pipeline schedule: stage programs, activation stash, p2p.

A ``StageProgram`` is what codegen emits per virtual stage: the module, the
tensors it receives from the previous stage and sends to the next one (their
per-microbatch ``TensorSpec``), and which fields of the microbatch it also reads.
Stage s is called as ``module(*received, *(microbatch[k] for k in batch_inputs))``;
stage 0 receives nothing. A non-last stage returns a tensor or a tuple of tensors
(several values may cross a cut, e.g. a skip connection); the last stage returns
what ``loss_fn(output, microbatch)`` turns into a scalar loss, or, with no
``loss_fn``, the model's own loss (:func:`tripar.runtime.loss.model_loss`: a scalar, a
``ModelOutput`` or mapping with a ``loss``, or a tuple starting with the loss).

``PipelineExecutor.step(batch)`` splits this data-parallel rank's batch into the
schedule's microbatches and runs the rank's actions in order:

- ``F``: receive the stage input (stage > 0), run the forward keeping the graph,
  send the output (stage < last). On the last stage the loss, scaled by
  1 / num_microbatches, is kept for the backward.
- ``f``: the same under ``torch.no_grad()``, keeping only the input and the RNG state.
- ``R``: re-run the forward from the kept input with the saved RNG state, keeping the graph.
- ``B``: receive the output gradient (stage < last) and send the input gradient
  (stage > 0). On a stage with no ``W`` actions this is the whole backward
  (``torch.autograd.backward``: parameter gradients accumulate in ``.grad``).
- ``W`` (zero-bubble schedules): on a stage with ``W`` actions, B is
  ``backward_split.backward_input``: it computes the input gradient only and keeps
  the gradients flowing into the nodes where weight gradients branch off the
  activation path (a linear layer's matmul, a norm...); W is ``backward_weight``,
  which restarts the engine at those nodes and computes the weight gradients only
  (accumulated in ``.grad``, with their hooks). B + W do the arithmetic of one
  backward, each operation once; W then frees the graph it held. Stage 0 has no
  input gradient: its B does nothing and its W the whole backward.

Gradients: the 1 / num_microbatches scaling makes the accumulated gradient that of
the batch-mean loss; ``DataParallel`` (``grad_sync``) averages across dp. The step
returns the mean loss (mean over microbatches, then over dp) on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tripar.codegen.stage import StageProgram, TensorSpec
from tripar.codegen.tp_rng import RNGTracker
from tripar.errors import ConfigError
from tripar.plan.schedule import Action, ActionKind, Schedule
from tripar.runtime.backward_split import WeightGradients, backward_input, backward_weight
from tripar.runtime.loss import model_loss
from tripar.runtime.mesh import CommError, Mesh, RankFailedError, is_comm_failure
from tripar.runtime.p2p import P2P, PendingRecv

__all__ = ["Batch", "PipelineExecutor", "StageProgram", "split_microbatches"]

Batch = tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor]
LossFn = Callable[[Any, Batch], torch.Tensor]

_F, _f, _R = ActionKind.FORWARD, ActionKind.FORWARD_INPUT_ONLY, ActionKind.RECOMPUTE
_B, _W = ActionKind.BACKWARD, ActionKind.WEIGHT


def split_microbatches(batch: Batch, num_microbatches: int) -> list[Batch]:
    """Split every tensor of ``batch`` along dim 0 into ``num_microbatches`` equal pieces.

    >>> mbs = split_microbatches((torch.arange(4), torch.ones(4, 2)), 2)
    >>> [tuple(t.shape) for t in mbs[1]], mbs[1][0].tolist()
    ([(2,), (2, 2)], [2, 3])
    """
    items = list(batch.items()) if isinstance(batch, Mapping) else list(enumerate(batch))
    if not items:
        raise ConfigError("the batch is empty; give a tuple or dict of tensors")
    sizes = set()
    for key, t in items:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            raise ConfigError(f"batch field {key!r} must be a tensor with a batch dimension, "
                              f"got {type(t).__name__}")
        sizes.add(t.shape[0])
    if len(sizes) != 1:
        raise ConfigError(f"batch fields have different batch sizes {sorted(sizes)}; "
                          f"dim 0 of every field is the batch dimension")
    (size,) = sizes
    if size % num_microbatches:
        raise ConfigError(f"batch size {size} is not divisible by num_microbatches="
                          f"{num_microbatches}; use a batch size that is a multiple of it")
    step = size // num_microbatches
    pieces = [(key, t.split(step)) for key, t in items]
    if isinstance(batch, Mapping):
        return [{key: parts[j] for key, parts in pieces} for j in range(num_microbatches)]
    return [tuple(parts[j] for _, parts in pieces) for j in range(num_microbatches)]


@dataclass(slots=True)
class _Slot:
    """What one (stage, microbatch) keeps between its forward and its backward."""

    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...] | None = None
    rng: tuple[torch.Tensor, torch.Tensor | None, list] | None = None
    """The random state an ``f`` ran under (CPU, CUDA, tensor-parallel streams), for ``R``."""
    weights: WeightGradients | None = None
    """What B left for W (zero-bubble stages)."""


class PipelineExecutor:
    """Runs one pipeline rank's actions of ``schedule`` over its stage programs."""

    def __init__(self, programs: Sequence[StageProgram], schedule: Schedule, mesh: Mesh, *,
                 loss_fn: LossFn | None = None, grad_sync: Any | None = None,
                 lookahead: int = 2) -> None:
        """``grad_sync``: a ``DataParallel`` (or anything with ``begin_step(num_microbatches)``
        and ``finish()``); without one, gradients accumulate in ``.grad`` unsynchronised.
        ``lookahead``: how many receives are posted ahead of the action that needs them."""
        if schedule.pp != mesh.pp:
            raise ConfigError(f"schedule {schedule.name!r} is for pp={schedule.pp}, but the "
                              f"mesh has pp={mesh.pp}; build the schedule for the mesh")
        if schedule.pipelines != mesh.pipelines:
            raise ConfigError(f"schedule {schedule.name!r} runs {schedule.pipelines} pipeline(s), "
                              f"but the mesh was built for {mesh.pipelines}; build the mesh "
                              f"with pipelines={schedule.pipelines}")
        schedule.validate()
        self.schedule, self.mesh = schedule, mesh
        self.loss_fn, self.grad_sync = loss_fn, grad_sync
        self.lookahead = max(1, int(lookahead))
        self.num_stages = schedule.num_stages
        self.last_stage = self.num_stages - 1
        held = list(schedule.stages_of(mesh.coords.pp))
        self.programs = {p.index: p for p in programs}
        if sorted(self.programs) != held or len(programs) != len(held):
            raise ConfigError(f"{mesh.describe()} holds stages {held} of schedule "
                              f"{schedule.name!r} (pp={mesh.pp}, vpp={schedule.vpp}), but got "
                              f"programs for stages {[p.index for p in programs]}")
        for s, prog in self.programs.items():
            if s == 0 and prog.received:
                raise ConfigError("stage 0 receives nothing; give its inputs as batch_inputs")
            if s == self.last_stage and prog.sent:
                raise ConfigError(f"stage {s} is the last stage and sends nothing; its outputs "
                                  f"spec must be empty (it returns the loss)")
            if s > 0 and not prog.received and not prog.batch_inputs:
                raise ConfigError(f"stage {s} declares no inputs; give the TensorSpecs of what "
                                  f"stage {s - 1} sends it")
        self.actions: tuple[Action, ...] = schedule.actions[mesh.coords.pp]
        self.split_stages = frozenset(a.stage for a in self.actions if a.kind is _W)
        self.p2p = P2P(mesh)
        self._trackers = _find_trackers(p.module for p in programs)
        self._recv_at = [i for i, a in enumerate(self.actions) if self._needs_recv(a)]

    # ---- public -----------------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, each once, in stage order."""
        seen: dict[int, nn.Parameter] = {}
        for s in sorted(self.programs):
            for p in self.programs[s].module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def step(self, batch: Batch) -> float:
        """Run one training step's forward and backward on this dp rank's ``batch``.

        Gradients are left in ``.grad`` (synchronised by ``grad_sync``); returns the
        step's mean loss, the same on every rank.
        """
        m = self.schedule.num_microbatches
        self._mbs = split_microbatches(batch, m)
        self._stash: dict[tuple[int, int], _Slot] = {}
        self._posted: dict[int, PendingRecv] = {}
        self._next_post = 0
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.mesh.device)
        action: Action | None = None
        try:
            if self.grad_sync is not None:  # each stage module runs m / pipelines
                self.grad_sync.begin_step(m // self.schedule.pipelines)
            for i, action in enumerate(self.actions):
                self._post_ahead(i)
                self._run(action)
            action = None
            self.p2p.flush()
            if self.grad_sync is not None:
                self.grad_sync.finish()
            return self._mean_loss()
        except (RankFailedError, CommError):
            raise
        except BaseException as exc:
            where = (f"action {action} (stage {action.stage}, microbatch {action.microbatch})"
                     if action is not None else "the end of the step (gradient sync, loss)")
            if self.mesh.tp > 1 and is_comm_failure(exc):
                # a tensor-parallel collective inside the stage's forward or backward lost a
                # peer: name the peer, as the runtime's own waits do
                peers = tuple(dist.get_process_group_ranks(self.mesh.tp_group))
                raise self.mesh.wait_error(f"the tensor-parallel collectives of {where}",
                                           peers, exc) from exc
            message = (f"{self.mesh.describe()} failed at {where} of schedule "
                       f"{self.schedule.name!r}: {type(exc).__name__}: {exc}")
            self.mesh.report_failure(message)
            exc.add_note(f"tripar: {message}")
            raise
        finally:
            self._stash, self._posted, self._mbs = {}, {}, []

    # ---- actions ------------------------------------------------------------------------------

    def _run(self, a: Action) -> None:
        kind = a.kind
        if kind is _F or kind is _f:
            self._forward(a, keep_graph=kind is _F)
        elif kind is _R:
            self._recompute(a)
        elif kind is _B:
            self._backward(a)
        else:
            self._weight(a)

    def _forward(self, a: Action, *, keep_graph: bool) -> None:
        s, j = a.stage, a.microbatch
        prog = self.programs[s]
        received: tuple[torch.Tensor, ...] = ()
        if s > 0:
            received = self._receive(a)
            for t, spec in zip(received, prog.received):
                if spec.needs_grad:
                    t.requires_grad_(True)
        rng = None if keep_graph else _rng_state(self.mesh.device, self._trackers)
        with torch.enable_grad() if keep_graph else torch.no_grad():
            out = self._call(prog, received, j)
        slot = _Slot(received, rng=rng)
        if s == self.last_stage:
            self._loss_sum += out.detach().to(torch.float64)
            if keep_graph:
                slot.outputs = (out / self.schedule.num_microbatches,)
        else:
            outs = self._check_outputs(prog, out, j)
            if keep_graph:
                slot.outputs = outs
            tag = self._tag(s + 1, j, grad=False)
            self.p2p.send(outs, self._rank(s + 1, j), tag,
                          f"stage {s}'s output for microbatch {j}")
        self._stash[(s, j)] = slot

    def _recompute(self, a: Action) -> None:
        s, j = a.stage, a.microbatch
        prog, slot = self.programs[s], self._stash[(s, j)]
        assert slot.rng is not None, f"R of {a} without an earlier f"
        devices = [self.mesh.device] if self.mesh.device.type == "cuda" else []
        streams = [t.get_states() for t in self._trackers]
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(slot.rng[0])
            if slot.rng[1] is not None:
                torch.cuda.set_rng_state(slot.rng[1], self.mesh.device)
            for tracker, states in zip(self._trackers, slot.rng[2]):
                tracker.set_states(states)  # sharded dropout draws the f's masks again
            try:
                with torch.enable_grad():
                    out = self._call(prog, slot.inputs, j)
            finally:
                for tracker, states in zip(self._trackers, streams):
                    tracker.set_states(states)
        if s == self.last_stage:
            slot.outputs = (out / self.schedule.num_microbatches,)
        else:
            slot.outputs = self._check_outputs(prog, out, j)

    def _backward(self, a: Action) -> None:
        s, j = a.stage, a.microbatch
        prog, slot = self.programs[s], self._stash[(s, j)]
        assert slot.outputs is not None, f"B of {a} before its forward"
        if s == self.last_stage:
            pairs = [(slot.outputs[0], None)] if slot.outputs[0].requires_grad else []
        else:
            grads = iter(self._receive(a))
            pairs = []
            for out, spec in zip(slot.outputs, prog.sent):
                if spec.needs_grad:
                    g = next(grads)
                    if out.requires_grad:
                        pairs.append((out, g))
        want = [t for t in slot.inputs if t.requires_grad]
        if s in self.split_stages:
            params = [p for p in prog.module.parameters() if p.requires_grad]
            in_grads, slot.weights = backward_input([o for o, _ in pairs],
                                                    [g for _, g in pairs], want, params)
            slot.outputs = None  # W starts from the nodes B kept, not from the outputs
        else:
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            in_grads = [t.grad for t in want]
            del self._stash[(s, j)]
        if s > 0:
            by_id = {id(t): g for t, g in zip(want, in_grads)}
            send = [by_id.get(id(t)) if t.requires_grad else None
                    for t, spec in zip(slot.inputs, prog.received) if spec.needs_grad]
            specs = [spec for spec in prog.received if spec.needs_grad]
            send = [g if g is not None else torch.zeros(sp.shape, dtype=sp.dtype,
                                                         device=self.mesh.device)
                    for g, sp in zip(send, specs)]
            self.p2p.send(send, self._rank(s - 1, j), self._tag(s - 1, j, grad=True),
                          f"stage {s}'s input gradient for microbatch {j}")
        if slot.weights is not None:
            slot.inputs = ()

    def _weight(self, a: Action) -> None:
        slot = self._stash.pop((a.stage, a.microbatch))
        assert slot.weights is not None, f"W of {a} before its B"
        backward_weight(slot.weights)

    # ---- helpers ------------------------------------------------------------------------------

    def _call(self, prog: StageProgram, received: tuple[torch.Tensor, ...], j: int) -> Any:
        mb = self._mbs[j]
        args = []
        for key in prog.batch_inputs:
            try:
                args.append(mb[key])  # type: ignore[index]
            except (KeyError, IndexError, TypeError) as exc:
                raise ConfigError(f"stage {prog.index} reads batch field {key!r}, which the "
                                  f"batch does not have") from exc
        out = prog.module(*received, *args)
        if prog.index != self.last_stage:
            return out
        return model_loss(out, mb, self.loss_fn, where=f"the last stage ({prog.index})")

    def _check_outputs(self, prog: StageProgram, out: Any, j: int) -> tuple[torch.Tensor, ...]:
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if len(outs) != len(prog.sent):
            raise ConfigError(f"stage {prog.index} returned {len(outs)} values for microbatch "
                              f"{j}, but its program declares {len(prog.sent)} outputs")
        return tuple(spec.check(t, f"stage {prog.index}'s output {i} (microbatch {j})")
                     for i, (t, spec) in enumerate(zip(outs, prog.sent)))

    def _needs_recv(self, a: Action) -> bool:
        if a.kind is _F or a.kind is _f:
            return a.stage > 0
        return a.kind is _B and a.stage < self.last_stage

    def _rank(self, stage: int, j: int) -> int:
        """The global rank running ``stage`` on microbatch ``j`` (the schedule places it)."""
        return self.mesh.pp_rank_global(self.schedule.rank_of(stage, j))

    def _tag(self, consumer_stage: int, j: int, *, grad: bool) -> int:
        return (consumer_stage * self.schedule.num_microbatches + j) * 2 + int(grad)

    def _recv_args(self, a: Action) -> tuple[list[TensorSpec], int, int, str]:
        s, j = a.stage, a.microbatch
        if a.kind is _B:
            specs = [sp for sp in self.programs[s].sent if sp.needs_grad]
            return (specs, self._rank(s + 1, j), self._tag(s, j, grad=True),
                    f"stage {s + 1}'s input gradient for microbatch {j} (at {a})")
        return (list(self.programs[s].received), self._rank(s - 1, j),
                self._tag(s, j, grad=False), f"stage {s - 1}'s output for microbatch {j} (at {a})")

    def _post_ahead(self, i: int) -> None:
        """Post the receives of the next ``lookahead`` receiving actions from step ``i`` on."""
        while (self._next_post < len(self._recv_at)
               and (self._recv_at[self._next_post] <= i or len(self._posted) < self.lookahead)):
            idx = self._recv_at[self._next_post]
            specs, src, tag, what = self._recv_args(self.actions[idx])
            self._posted[idx] = self.p2p.post_recv(specs, src, tag, what)
            self._next_post += 1

    def _receive(self, a: Action) -> tuple[torch.Tensor, ...]:
        idx = next(k for k in self._posted if self.actions[k] == a)
        pending = self._posted.pop(idx)
        _, _, tag, _ = self._recv_args(a)
        return self.p2p.wait_recv(pending, tag)

    def _mean_loss(self) -> float:
        mesh = self.mesh
        total = self._loss_sum / self.schedule.num_microbatches
        if mesh.pp > 1:
            work = dist.all_reduce(total, group=mesh.pp_group, async_op=True)
            mesh.wait([work], what="the step loss from the last stage",
                      peers=(mesh.stage_rank(self.last_stage),))
        if mesh.dp > 1:
            work = dist.all_reduce(total, group=mesh.dp_group, async_op=True)
            mesh.wait([work], what="the data-parallel loss average",
                      peers=tuple(dist.get_process_group_ranks(mesh.dp_group)))
            total = total / mesh.dp
        return float(total)


def _rng_state(device: torch.device, trackers: Sequence[RNGTracker]
               ) -> tuple[torch.Tensor, torch.Tensor | None, list]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, [t.get_states() for t in trackers]


def _find_trackers(modules: Iterable[nn.Module]) -> list[RNGTracker]:
    """The tensor-parallel random-stream trackers the modules' sharded dropouts draw from
    (``tripar.codegen.tp_rng``), each once."""
    found: dict[int, RNGTracker] = {}
    for module in modules:
        for sub in module.modules():
            tracker = getattr(sub, "tracker", None)
            if isinstance(tracker, RNGTracker):
                found.setdefault(id(tracker), tracker)
    return list(found.values())
