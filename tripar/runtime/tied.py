"""Sum the gradients of a weight held by several pipeline stages (a tied embedding and LM head).

Codegen gives every stage that uses a tied weight its own replica
(``StageSplit.tied``). On one pipeline rank the replicas of its stages are one
tensor, so autograd already sums their gradients; across pipeline ranks the
replicas' gradients must be summed before the optimizer steps, so that every
replica takes the same step and they stay equal. ``TiedGrads`` does that with one
all-reduce per tied weight, over the ranks holding it (same dp and tp coordinates),
after data parallelism has averaged the gradients (both are linear, so the order
does not matter) and before clipping (which counts the weight once: the replicas on
ranks other than the first holder are ``duplicates``).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tripar.runtime.mesh import Mesh

__all__ = ["TiedGrads", "TiedWeight"]


@dataclass(frozen=True, slots=True)
class TiedWeight:
    """One weight held on several pipeline ranks."""

    fqn: str
    """Its canonical FQN."""
    pp_ranks: tuple[int, ...]
    """Pipeline coordinates holding a replica, ascending; the first one counts in norms."""


class TiedGrads:
    """The cross-stage gradient sums of one rank (a collective to build: every rank calls it
    with the same ``tied`` list, in the same order)."""

    def __init__(self, mesh: Mesh, tied: Sequence[TiedWeight],
                 params: Mapping[str, nn.Parameter]) -> None:
        """``tied``: every tied weight of the model held on two or more pipeline ranks;
        ``params``: this rank's replicas by canonical FQN."""
        self.mesh = mesh
        self.tied = tuple(t for t in tied if len(t.pp_ranks) > 1)
        self._groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        grid = mesh.device_mesh.mesh  # (pp, dp, tp) -> global rank
        timeout = datetime.timedelta(seconds=mesh.timeout_s)
        for holders in sorted({t.pp_ranks for t in self.tied}):
            if len(holders) == mesh.pp:
                self._groups[holders] = mesh.pp_group
                continue
            mine = None
            for d in range(mesh.dp):  # every rank creates every group, in the same order
                for t in range(mesh.tp):
                    ranks = [int(grid[p, d, t]) for p in holders]
                    group = dist.new_group(ranks, timeout=timeout)
                    if mesh.rank in ranks:
                        mine = group
            self._groups[holders] = mine
        self.local = [(t, params[t.fqn]) for t in self.tied
                      if mesh.coords.pp in t.pp_ranks]
        missing = [t.fqn for t in self.tied
                   if mesh.coords.pp in t.pp_ranks and t.fqn not in params]
        assert not missing, f"tied weights {missing} have no local replica"

    @property
    def duplicates(self) -> list[nn.Parameter]:
        """Replicas that gradient-norm sums must skip (held on a later rank too)."""
        return [p for t, p in self.local if self.mesh.coords.pp != t.pp_ranks[0]]

    @property
    def parameters(self) -> list[nn.Parameter]:
        """This rank's replicas of weights held on other pipeline ranks too."""
        return [p for _, p in self.local]

    def sum_(self, grad_of: object) -> None:
        """Sum each local replica's gradient over its holders, in place.

        ``grad_of(param)`` returns the tensor to sum (``DataParallel.reduced_grad``); a
        replica with no gradient contributes zeros.
        """
        works = []
        for t, p in self.local:
            grad = grad_of(p)  # type: ignore[operator]
            if grad is None:
                grad = p.grad = torch.zeros_like(p)
            group = self._groups[t.pp_ranks]
            works.append((dist.all_reduce(grad, group=group, async_op=True), t))
        for work, t in works:
            peers = tuple(self.mesh.pp_rank_global(p) for p in t.pp_ranks)
            self.mesh.wait([work], what=f"the sum of tied weight {t.fqn}'s gradients over "
                           f"pipeline ranks {list(t.pp_ranks)}", peers=peers)
