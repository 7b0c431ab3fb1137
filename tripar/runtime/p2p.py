"""Point-to-point transfers between pipeline stages.

What crosses a cut is known before the step starts (``TensorSpec``: shape per
microbatch, dtype, whether a gradient flows back), so a receive can be posted
before the action that needs it runs. Transfers use
``torch.distributed.batch_isend_irecv``; every returned Work is waited through
``Mesh.wait`` (bounded, fault-aware). Sends are waited lazily, at the end of the
step (``flush``), which gives the buffered-send semantics the schedule IR assumes.

Messages are told apart by tag: one per (consumer stage, microbatch, direction),
times ``MAX_TENSORS`` plus the tensor's position. gloo matches on tags; NCCL
ignores them and matches in issue order per pair of ranks, so on NCCL a schedule's
sends and receives between two ranks must be issued in the same order.
Transfers between stages on the same rank (pp == 1) go through a local mailbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tripar.codegen.stage import TensorSpec
from tripar.errors import ConfigError
from tripar.runtime.mesh import Mesh

__all__ = ["MAX_TENSORS", "P2P", "PendingRecv"]

MAX_TENSORS = 256
"""Most tensors one cut may carry."""


@dataclass(slots=True)
class PendingRecv:
    """A posted receive: the buffers and the Works to wait for."""

    buffers: tuple[torch.Tensor, ...]
    works: list = field(default_factory=list)
    src: int = -1
    what: str = ""


class P2P:
    """Sends and receives of one rank's pipeline, with pending sends kept until ``flush``."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self._sends: list[tuple[list, tuple[torch.Tensor, ...], int, str]] = []
        self._local: dict[int, tuple[torch.Tensor, ...]] = {}

    def send(self, tensors: Sequence[torch.Tensor], dst: int, tag: int, what: str) -> None:
        """Start sending ``tensors`` to global rank ``dst``; ``what`` names them for errors."""
        _check_count(len(tensors), what)
        payload = tuple(t.detach().contiguous() for t in tensors)
        if dst == self.mesh.rank:
            self._local[tag] = tuple(t.clone() for t in payload)
            return
        if not payload:
            return
        ops = [dist.P2POp(dist.isend, t, dst, self.mesh.pp_group, tag * MAX_TENSORS + i)
               for i, t in enumerate(payload)]
        self._sends.append((dist.batch_isend_irecv(ops), payload, dst, what))

    def post_recv(self, specs: Sequence[TensorSpec], src: int, tag: int, what: str) -> PendingRecv:
        """Post receives for ``specs`` from global rank ``src``; wait with ``wait_recv``."""
        _check_count(len(specs), what)
        if src == self.mesh.rank:
            return PendingRecv((), [], src, what)
        buffers = tuple(s.empty(self.mesh.device) for s in specs)
        if not buffers:
            return PendingRecv((), [], src, what)
        ops = [dist.P2POp(dist.irecv, b, src, self.mesh.pp_group, tag * MAX_TENSORS + i)
               for i, b in enumerate(buffers)]
        return PendingRecv(buffers, dist.batch_isend_irecv(ops), src, what)

    def wait_recv(self, pending: PendingRecv, tag: int) -> tuple[torch.Tensor, ...]:
        """The received tensors of a posted receive."""
        if pending.src == self.mesh.rank:
            return self._local.pop(tag)
        self.mesh.wait(pending.works, what=pending.what, peers=(pending.src,))
        return pending.buffers

    def flush(self) -> None:
        """Wait for every send started since the last flush."""
        sends, self._sends = self._sends, []
        for works, _payload, dst, what in sends:
            self.mesh.wait(works, what=f"the send of {what} to be received", peers=(dst,))


def _check_count(n: int, what: str) -> None:
    if n > MAX_TENSORS:
        raise ConfigError(f"{what}: {n} tensors cross one cut, at most {MAX_TENSORS} can; "
                          f"pack them into fewer tensors")
