"""Data parallelism: bucketed gradient reduction overlapping the backward, ZeRO-1, clipping.

``DataParallel`` owns the optimizer of one rank's stage modules.

Buckets. Parameters are grouped, in reverse order (the order the backward
produces their gradients), into buckets of about ``bucket_bytes``. A
``register_post_accumulate_grad_hook`` counts each parameter's gradient
accumulations; when a parameter has had all of them (num_microbatches times the
number of this rank's stage modules holding it) it is ready, and when a bucket's
parameters are all ready its reduction is launched asynchronously -- buckets in
order, so every dp rank issues the same collectives in the same order -- while
the backward goes on. ``finish`` (called by the executor at the end of the step)
launches what is left (parameters that got no gradient count as zero) and waits.

Plain dp: each bucket owns a flat gradient buffer for the whole run, and the
parameters' ``.grad`` are views of it (DDP's ``gradient_as_bucket_view``): autograd
accumulates straight into the bucket, which is divided by dp and all-reduced in
place, with no copy into or out of it; every rank then holds the average gradient
and steps the same optimizer. With dp = 1 and no ZeRO there is nothing to reduce: no
hooks are registered and no bucket is made (the pipeline-only case pays nothing per
microbatch for data parallelism).

ZeRO (``zero`` 1 or 2): each bucket is padded to a multiple of dp and dp rank k
owns slice k. The gradient is reduce-scattered, so each rank holds the averaged
gradient of its slice only; the optimizer holds one flat fp32 copy of each owned
slice (so its state is 1/dp of plain dp's), steps it, and the updated slices are
all-gathered back into the parameters. The optimizer therefore sees flat shards,
not the original tensors: it must be elementwise (SGD, Adam, AdamW, ...) and use
one set of hyper-parameters; results then equal plain dp's. ZeRO-1 keeps the
persistent buffers of plain dp (gradients accumulate in them and the reduction
scatters in place: each rank's shard is a slice of its buffer). ZeRO-2 keeps no
buffer: autograd accumulates each parameter's own ``.grad``, the bucket is copied into
a flat buffer when its reduction launches and the gradients dropped, and the buffer
is freed once the rank has its shard, so between steps (the optimizer step, the next
forward) a rank holds 1/dp of the gradients instead of all of them.

Chimera: a rank and its mirror (pipeline ranks r and pp - 1 - r) hold the same two
stages, each having run half the microbatches through them; the stages' gradients
are summed over both and averaged over dp. That is one reduction over
``mesh.grad_group`` (2 x dp ranks, the mirror's dp group with this one's), carried by
the same buckets: both ranks order the two stages' parameters alike (by stage), the
bucket is divided by dp and all-reduced (ZeRO: reduce-scattered, each of the 2 x dp
ranks owning a slice) over that group. Without chimera ``grad_group`` is the dp group.

Clipping: ``clip_grad_norm_`` computes the L2 norm over every gradient of the
whole job, counting each value once: shards are summed over dp (ZeRO), stages over
pp, tensor-parallel shards over tp; parameters named in ``norm_duplicates`` (copies
of a parameter counted elsewhere: tp-replicated on tp ranks > 0, the second copy of
a tied weight) are left out of the sum but are clipped like the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from tripar.errors import ConfigError
from tripar.runtime.mesh import Mesh

__all__ = ["DataParallel", "local_batch", "optimizer_step_bytes"]

# flat-tensor collectives under their current names (torch 2.13 deprecates the older ones)
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def optimizer_step_bytes(make_optimizer: OptimizerFactory) -> float | None:
    """Bytes per parameter that a fused step of the optimizer ``make_optimizer`` builds reads
    and writes, in fp32: the parameter and its gradient read and the parameter written
    (12), and each state tensor of the parameter's size read and written (8 each): SGD 12,
    SGD with momentum 20, Adam and AdamW 28. Learnt by building the optimizer on a
    4-value parameter and stepping it once; None when the factory cannot build on one
    (it then goes uncounted: the planner keeps the profile's Adam step).

    >>> optimizer_step_bytes(lambda ps: torch.optim.SGD(ps, lr=0.1))
    12.0
    >>> optimizer_step_bytes(lambda ps: torch.optim.AdamW(ps))
    28.0
    """
    probe = nn.Parameter(torch.zeros(4))
    probe.grad = torch.ones(4)
    try:
        optimizer = make_optimizer([probe])
        optimizer.step()
    except Exception:  # noqa: BLE001 -- a factory that expects the real model's parameters
        return None
    states = sum(1 for t in optimizer.state.get(probe, {}).values()
                 if isinstance(t, torch.Tensor) and t.shape == probe.shape)
    return 4.0 * (3 + 2 * states)


def local_batch(batch: tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor], mesh: Mesh
                ) -> tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
    """This dp rank's share of a global batch, on the rank's device: slice ``mesh.coords.dp``
    of ``mesh.dp`` along dim 0 (a batch built on CPU reaches a CUDA rank's stages)."""
    def piece(key: object, t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] % mesh.dp:
            raise ConfigError(f"batch field {key!r} has batch size {t.shape[0]}, not divisible "
                              f"by dp={mesh.dp}; use a global batch that is a multiple of dp")
        n = t.shape[0] // mesh.dp
        return t[mesh.coords.dp * n:(mesh.coords.dp + 1) * n].to(mesh.device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: piece(k, t) for k, t in batch.items()}
    return tuple(piece(i, t) for i, t in enumerate(batch))


@dataclass(eq=False)
class _Bucket:
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    padded: int
    skip_norm: torch.Tensor | None = None
    """1 where a value counts in the norm, 0 for duplicates (None: all count)."""
    pending: int = 0
    buffer: torch.Tensor | None = None
    """The flat gradient: persistent (the parameters' ``.grad`` are views of it) except
    under ZeRO-2, which makes it when the reduction launches and frees it after."""
    shard_grad: torch.Tensor | None = None
    works: list = field(default_factory=list)


class DataParallel:
    """Gradient synchronisation across dp and the optimizer of one rank's stage modules."""

    def __init__(self, modules: Sequence[nn.Module], mesh: Mesh,
                 make_optimizer: OptimizerFactory, *, zero: int = 0,
                 bucket_bytes: int = 25 * 2**20,
                 norm_duplicates: Collection[nn.Parameter] = (),
                 isolate: Collection[nn.Parameter] = ()) -> None:
        """``modules``: this rank's stage modules; ``make_optimizer(params)``: builds the
        optimizer (given the parameters, or with ``zero`` the flat owned shards).
        ``zero``: the ZeRO stage, 0, 1 or 2 (see the module docstring).
        ``isolate``: parameters that get a bucket of their own, so that their reduced
        gradient (``reduced_grad``; with ZeRO the owned slice of it) is laid out the same
        on every rank holding a replica (tied weights summed across pipeline stages)."""
        if bucket_bytes < 1:
            raise ConfigError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.mesh, self.zero = mesh, int(zero)
        self._uses: dict[int, int] = {}
        params: dict[int, nn.Parameter] = {}
        for module in modules:
            for p in module.parameters():
                if p.requires_grad:
                    params.setdefault(id(p), p)
                    self._uses[id(p)] = self._uses.get(id(p), 0) + 1
        self.params = list(params.values())
        dup_ids = {id(p) for p in norm_duplicates}
        self._dup = [p for p in self.params if id(p) in dup_ids]
        self.buckets = self._make_buckets(bucket_bytes, dup_ids, {id(p) for p in isolate})
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._scatter_by_all_reduce = (self.zero > 0 and mesh.grad_size > 1
                                       and dist.get_backend(mesh.grad_group) == "gloo")
        """gloo reduce-scatters with no ring: on 2 CPU processes 20 MB take 53 ms to
        reduce-scatter and 24 ms to all-reduce, so ZeRO on gloo all-reduces the bucket
        and keeps its slice (the same values; the full buffer is freed at ``finish``)."""
        self._local = mesh.grad_size == 1 and not self.zero
        """Nothing to reduce (dp = 1, no ZeRO, one pipeline): no hooks, no flat copies; the
        gradients autograd accumulates in ``.grad`` are the step's."""
        self._hooks = [] if self._local else [
            p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
        self._views = not self._local and self.zero < 2
        """Gradients accumulate in views of persistent flat buckets (plain dp, ZeRO-1)."""
        if self._views:
            for b in self.buckets:
                b.buffer = torch.zeros(b.padded, dtype=b.params[0].dtype,
                                       device=b.params[0].device)
        self._counts: dict[int, int] = {}
        self._expected = 0
        self._next_launch = 0
        self._active = False
        self.overlapped = 0
        """Buckets of the last step whose reduction started inside the backward (by a hook)."""
        if self.zero:
            self.shards = [nn.Parameter(self._flat_params(b)[self._shard_slice(b)].clone())
                           for b in self.buckets]
            self.optimizer = make_optimizer(list(self.shards))
        else:
            self.shards = []
            self.optimizer = make_optimizer(list(self.params))

    # ---- layout -------------------------------------------------------------------------------

    def _make_buckets(self, bucket_bytes: int, dup_ids: set[int],
                      alone: set[int]) -> list[_Bucket]:
        pad_to = self.mesh.grad_size if self.zero else 1
        buckets: list[_Bucket] = []
        group: list[nn.Parameter] = []
        size = 0
        for p in reversed(self.params):
            if id(p) in alone:
                if group:
                    buckets.append(self._bucket(group, pad_to, dup_ids))
                    group, size = [], 0
                buckets.append(self._bucket([p], pad_to, dup_ids))
                continue
            group.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                buckets.append(self._bucket(group, pad_to, dup_ids))
                group, size = [], 0
        if group:
            buckets.append(self._bucket(group, pad_to, dup_ids))
        return buckets

    @staticmethod
    def _bucket(params: list[nn.Parameter], pad_to: int, dup_ids: set[int]) -> _Bucket:
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ConfigError(f"parameters of one bucket have dtypes {sorted(map(str, dtypes))}; "
                              f"data parallelism needs one parameter dtype per rank")
        offsets, n = [], 0
        for p in params:
            offsets.append(n)
            n += p.numel()
        padded = -(-n // pad_to) * pad_to
        mask = None
        if any(id(p) in dup_ids for p in params):
            mask = torch.ones(padded, dtype=params[0].dtype, device=params[0].device)
            for p, off in zip(params, offsets):
                if id(p) in dup_ids:
                    mask[off:off + p.numel()] = 0
        return _Bucket(params, offsets, n, padded, mask)

    def _shard_slice(self, b: _Bucket) -> slice:
        return self.owned_slice(b.padded)

    def owned_slice(self, padded: int) -> slice:
        """With ZeRO, the slice of a bucket of ``padded`` values this rank owns: its share
        of ``grad_group`` (the dp group; under chimera also the mirror's)."""
        n = padded // self.mesh.grad_size
        return slice(self.mesh.grad_index * n, (self.mesh.grad_index + 1) * n)

    @staticmethod
    def _flat_params(b: _Bucket) -> torch.Tensor:
        flat = torch.zeros(b.padded, dtype=b.params[0].dtype, device=b.params[0].device)
        for p, off in zip(b.params, b.offsets):
            flat[off:off + p.numel()] = p.detach().reshape(-1)
        return flat

    # ---- the step -----------------------------------------------------------------------------

    def begin_step(self, num_microbatches: int) -> None:
        """Clear gradients and arm the hooks for a step in which each stage module runs
        ``num_microbatches`` (half the step's under chimera)."""
        self.zero_grad()
        self._expected = num_microbatches
        self._counts = {}
        self._next_launch = 0
        self.overlapped = 0
        for b in self.buckets:
            b.pending, b.shard_grad, b.works = len(b.params), None, []
            if self._views:  # autograd accumulates into the zeroed bucket
                b.buffer.zero_()
                for p, off in zip(b.params, b.offsets):
                    p.grad = b.buffer[off:off + p.numel()].view_as(p)
            else:
                b.buffer = None
        self._active = not self._local

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._active:
            return
        key = id(p)
        count = self._counts.get(key, 0) + 1
        self._counts[key] = count
        if count == self._expected * self._uses[key]:
            self._bucket_of[key].pending -= 1
            while (self._next_launch < len(self.buckets)
                   and self.buckets[self._next_launch].pending == 0):
                self._launch(self.buckets[self._next_launch])
                self._next_launch += 1
                self.overlapped += 1

    def _launch(self, b: _Bucket) -> None:
        flat = self._gathered(b)
        copies = self.mesh.grad_size
        if self.mesh.dp > 1:
            flat.div_(self.mesh.dp)
        b.buffer = flat
        if self.zero:
            for p in b.params:
                p.grad = None
            if copies > 1 and self._scatter_by_all_reduce:
                b.works.append(dist.all_reduce(flat, group=self.mesh.grad_group, async_op=True))
            elif copies > 1:  # ZeRO-1 scatters in place: the shard is its slice of the bucket
                b.shard_grad = (flat[self._shard_slice(b)] if self._views else
                                torch.empty(b.padded // copies, dtype=flat.dtype,
                                            device=flat.device))
                b.works.append(reduce_scatter_flat(b.shard_grad, flat,
                                                   group=self.mesh.grad_group, async_op=True))
            else:
                b.shard_grad = flat
        elif copies > 1:
            b.works.append(dist.all_reduce(flat, group=self.mesh.grad_group, async_op=True))

    def _gathered(self, b: _Bucket) -> torch.Tensor:
        """The bucket's gradients as one flat tensor: the persistent bucket (copying in any
        ``.grad`` that is no longer its view: replaced or dropped since ``begin_step``), or
        under ZeRO-2 a new buffer with the parameters' gradients copied in."""
        if not self._views:
            flat = torch.zeros(b.padded, dtype=b.params[0].dtype, device=b.params[0].device)
            for p, off in zip(b.params, b.offsets):
                if p.grad is not None:
                    flat[off:off + p.numel()] = p.grad.reshape(-1)
            return flat
        flat = b.buffer
        for p, off in zip(b.params, b.offsets):
            view = flat[off:off + p.numel()]
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad.reshape(-1))
        return flat

    def finish(self) -> None:
        """Launch the buckets not launched yet and wait for every reduction."""
        self._active = False
        if self._local:
            return
        while self._next_launch < len(self.buckets):
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1
        peers = tuple(dist.get_process_group_ranks(self.mesh.grad_group))
        for k, b in enumerate(self.buckets):
            self.mesh.wait(b.works, what=f"the data-parallel gradient reduction of bucket {k}",
                           peers=peers)
            b.works = []
            if not self.zero:  # the gradients: views of the bucket (rebound if replaced)
                for p, off in zip(b.params, b.offsets):
                    p.grad = b.buffer[off:off + p.numel()].view_as(p)
            elif self._views:  # ZeRO-1: the shard is a slice of the kept bucket
                b.shard_grad = b.buffer[self._shard_slice(b)]
            else:  # ZeRO-2: the shard alone is kept
                if self._scatter_by_all_reduce:
                    b.shard_grad = b.buffer[self._shard_slice(b)].clone()
                b.buffer = None

    def _grads(self) -> Iterable[tuple[torch.Tensor, torch.Tensor | bool]]:
        """(gradient, counts in the norm) pairs this rank holds after ``finish``: True, False
        (a duplicate), or a 0/1 mask of the values that count."""
        if self.zero:
            for b in self.buckets:
                if b.shard_grad is not None:
                    yield b.shard_grad, (True if b.skip_norm is None
                                         else b.skip_norm[self._shard_slice(b)])
        else:
            dup = {id(p) for p in self._dup}
            for p in self.params:
                if p.grad is not None:
                    yield p.grad, id(p) not in dup

    @torch.no_grad()
    def reload_shards(self) -> None:
        """With ZeRO, copy the parameters' values into the owned fp32 shards the optimizer
        steps (after the parameters were overwritten, e.g. by loading a checkpoint)."""
        for shard, b in zip(self.shards, self.buckets):
            shard.copy_(self._flat_params(b)[self._shard_slice(b)])

    def reduced_grad(self, p: nn.Parameter) -> torch.Tensor | None:
        """After ``finish``: the gradient of ``p`` this rank holds, averaged over dp -- ``p.grad``,
        or with ZeRO the owned slice of its bucket (``p`` must be in ``isolate``). In-place
        changes to it are what ``step`` uses."""
        if not self.zero:
            return p.grad
        b = self._bucket_of[id(p)]
        if len(b.params) != 1:
            raise ConfigError("reduced_grad with ZeRO needs the parameter in isolate=")
        return b.shard_grad

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale the gradients so that their global L2 norm is at most ``max_norm``.

        Returns the norm before clipping, the same on every rank (a collective over
        dp (ZeRO only), pp and tp). The coefficient is torch's:
        ``min(1, max_norm / (norm + 1e-6))``.
        """
        grads = list(self._grads())
        sq = torch.zeros((), dtype=torch.float64, device=self.mesh.device)
        for g, counts in grads:
            if counts is True:
                sq += g.detach().double().pow(2).sum()
            elif counts is not False:
                sq += (g.detach().double().pow(2) * counts.double()).sum()
        mesh = self.mesh
        groups = ([("the ranks sharing its gradients", mesh.grad_group)]
                  if self.zero and mesh.grad_size > 1 else [])
        groups += [(axis, mesh.group(axis)) for axis in ("pp", "tp") if mesh.size(axis) > 1]
        for axis, group in groups:
            if axis == "pp" and mesh.mirror:
                sq.zero_()  # chimera: the mirror holds the same stages, counted there
            work = dist.all_reduce(sq, group=group, async_op=True)
            mesh.wait([work], what=f"the gradient-norm sum over {axis}",
                      peers=tuple(dist.get_process_group_ranks(group)))
        total = math.sqrt(float(sq))
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g, _ in grads:
                g.mul_(coef)
        return total

    def step(self) -> None:
        """Step the optimizer (ZeRO: on the owned shards, then all-gather) and clear gradients."""
        if not self.zero:
            self.optimizer.step()
            self.zero_grad()
            return
        for shard, b in zip(self.shards, self.buckets):
            shard.grad = b.shard_grad
        self.optimizer.step()
        gathered = []
        for shard, b in zip(self.shards, self.buckets):
            if self.mesh.grad_size > 1:
                full = torch.empty(b.padded, dtype=shard.dtype, device=shard.device)
                work = all_gather_flat(full, shard.detach(),
                                                   group=self.mesh.grad_group, async_op=True)
                gathered.append((full, b, [work]))
            else:
                gathered.append((shard.detach(), b, []))
        peers = tuple(dist.get_process_group_ranks(self.mesh.grad_group))
        with torch.no_grad():
            for k, (full, b, works) in enumerate(gathered):
                self.mesh.wait(works, what=f"the ZeRO-1 parameter all-gather of bucket {k}",
                               peers=peers)
                for p, off in zip(b.params, b.offsets):
                    p.copy_(full[off:off + p.numel()].view_as(p))
        self.zero_grad()

    def zero_grad(self) -> None:
        """Drop every gradient (parameters and shards)."""
        for p in self.params:
            p.grad = None
        for shard in self.shards:
            shard.grad = None
        for b in self.buckets:
            b.shard_grad = None

    def grad_numel(self) -> int:
        """Gradient values this rank holds now, counted by the storage that holds them: the
        parameters' ``.grad`` (views of their bucket's buffer after a plain reduction), the
        flat bucket buffers and the owned gradient shards (ZeRO-2 after ``finish``: the
        shards only)."""
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() // t.element_size()
                for t in ([p.grad for p in self.params] + [b.buffer for b in self.buckets]
                          + [b.shard_grad for b in self.buckets]) if t is not None}
        return sum(held.values())

    def optimizer_state_numel(self) -> int:
        """Values held in the optimizer's state on this rank (ZeRO-1 holds 1/dp of plain dp's)."""
        return sum(t.numel() for st in self.optimizer.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor) and t.dim() > 0)

    def remove_hooks(self) -> None:
        """Detach the gradient hooks from the parameters."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
