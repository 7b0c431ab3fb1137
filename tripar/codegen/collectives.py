"""The Megatron tensor-parallel collectives, as autograd functions on torch.distributed.

Each function takes the tensor-parallel process group (``None``: the default group):

- `copy_to_tp` (Megatron's *f*): identity forward, all-reduce of the gradient backward.
  It goes before column-parallel linears, and before any replicated value a sharded
  computation reads, so that every rank's partial input gradient is summed.
- `reduce_from_tp` (*g*): all-reduce forward, identity backward. It goes after
  row-parallel linears (partial sums) and the vocab-parallel embedding.
- `scatter_to_tp`: keep this rank's contiguous 1/t of a replicated tensor along a dim;
  backward all-gathers the gradient (a replicated operand narrowed per rank).
- `gather_from_tp`: all-gather along a dim forward; backward keeps this rank's slice.
- `gather_to_tp` (sequence parallelism's entry, Megatron's *g* with SP): all-gather
  along the sequence forward, reduce-scatter of the gradient backward. It replaces
  *f* where a region reads a value kept on sequence shards.
- `reduce_scatter_from_tp` (SP's exit, *g-bar*): reduce-scatter along the sequence
  forward, all-gather of the gradient backward. It replaces *g* when every reader of
  the region's output runs token-wise on the shard.
- `vocab_parallel_cross_entropy`: cross entropy over logits sharded on the class dim,
  as Megatron's ``_VocabParallelCrossEntropy``: all-reduces of each row's max logit,
  sum of exponentials and target logit; the full logits are never gathered.

The `TPCollective` modules wrap them for graph rewriting (``call_module`` nodes keep
the process group out of the graph's arguments); on meta tensors they only compute
shapes, so a rewritten graph can be checked by shape propagation without a group.
``torch.distributed`` is imported only when a collective runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ALONG",
    "all_gather_along",
    "reduce_scatter_along",
    "CopyToTP",
    "GatherFromTP",
    "ReduceFromTP",
    "ScatterToTP",
    "SequenceLinears",
    "TPCollective",
    "VocabParallelCrossEntropy",
    "GatherToTP",
    "ReduceScatterFromTP",
    "copy_to_tp",
    "gather_from_tp",
    "gather_to_tp",
    "reduce_from_tp",
    "reduce_scatter_from_tp",
    "scatter_to_tp",
    "sequence_linears",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_embedding",
]


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _all_reduce(x: torch.Tensor, group: Any, op: str = "sum") -> torch.Tensor:
    """A reduced copy of ``x`` (``x`` itself is left alone)."""
    dist = _dist()
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return out


def all_gather_along(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` (no autograd)."""
    dist = _dist()
    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x, group=group)
    return torch.cat(pieces, dim)


def _own_slice(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    dist = _dist()
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % size:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} is not divisible by the {size} ranks")
    n = x.shape[dim] // size
    return x.narrow(dim, rank * n, n).contiguous()


def reduce_scatter_along(x: torch.Tensor, dim: int, group: Any,
                         handles: list | None = None) -> torch.Tensor:
    """This rank's 1/t along ``dim`` of the sum of every rank's ``x``; with ``handles``,
    started: the result is there once the handle appended to them is waited for."""
    dist = _dist()
    size = dist.get_world_size(group)
    if x.shape[dim] % size:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} is not divisible by the {size} ranks")
    pieces = [p.contiguous() for p in x.chunk(size, dim)]
    out = torch.empty_like(pieces[0])
    work = dist.reduce_scatter(out, pieces, group=group, async_op=handles is not None)
    if handles is not None:
        handles.append(work)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None


class _AlongDim(torch.autograd.Function):
    """A collective along ``dim``: ``fwd`` forward and ``bwd`` backward, each one of
    ``slice`` (this rank's 1/t), ``gather`` (all-gather) or ``reduce_scatter``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any, fwd: str, bwd: str
                ) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.bwd = dim, group, bwd
        return ALONG[fwd](x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return ALONG[ctx.bwd](grad, ctx.dim, ctx.group), None, None, None, None


ALONG = {"slice": _own_slice, "gather": all_gather_along,
         "reduce_scatter": reduce_scatter_along}
"""A collective along a dim by name: this rank's slice, the all-gather, the reduce-scatter."""


def gather_to_tp(x: torch.Tensor, dim: int, group: Any = None) -> torch.Tensor:
    """Sequence parallelism's region entry: all-gather along ``dim`` (every rank's
    sequence shard into the whole sequence); backward reduce-scatters the gradient."""
    return _AlongDim.apply(x, dim, group, "gather", "reduce_scatter")


def reduce_scatter_from_tp(x: torch.Tensor, dim: int, group: Any = None) -> torch.Tensor:
    """Sequence parallelism's region exit: this rank's shard along ``dim`` of the sum of
    every rank's partial ``x``; backward all-gathers the gradient."""
    return _AlongDim.apply(x, dim, group, "reduce_scatter", "gather")


class _SequenceLinears(torch.autograd.Function):
    """Column-parallel linears reading one all-gathered sequence: the sequence shard is
    saved, not the gathered input, and gathered again in the backward (Megatron)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any, gathered: Any,
                grad_handles: list | None, *weights: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:
        ctx.dim, ctx.group, ctx.grad_handles = dim, group, grad_handles
        ctx.biased = [b is not None for b in weights[1::2]]
        whole = all_gather_along(x, dim, group) if gathered is None else torch.cat(gathered, dim)
        outs = tuple(F.linear(whole, w, b) for w, b in zip(weights[::2], weights[1::2]))
        ctx.save_for_backward(x, *weights[::2])
        return outs

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        x, *ws = ctx.saved_tensors
        whole = all_gather_along(x, ctx.dim, ctx.group)
        rows = whole.reshape(-1, whole.shape[-1])
        dx = None
        out: list[torch.Tensor | None] = []
        for w, g, biased in zip(ws, grads, ctx.biased):
            if g is None:
                out += [None, None]
                continue
            w_used = w.to(g.dtype) if torch.is_autocast_enabled("cpu") else w
            g2 = g.reshape(-1, g.shape[-1])
            part = g2.mm(w_used)
            dx = part if dx is None else dx + part
            dw = g2.t().mm(rows.to(g2.dtype)).to(w.dtype)
            db = g2.sum(0).to(w.dtype) if biased else None
            out += [dw, db]
        dx_shard = None
        if dx is not None:  # in x's dtype: autograd would copy a started result to it
            dx_shard = reduce_scatter_along(dx.reshape(whole.shape).to(x.dtype), ctx.dim,
                                            ctx.group, ctx.grad_handles)
        return (dx_shard, None, None, None, None, *out)


def sequence_linears(x: torch.Tensor, dim: int, group: Any, *weights: torch.Tensor | None,
                     gathered: Sequence[torch.Tensor] | None = None,
                     grad_handles: list | None = None) -> tuple[torch.Tensor, ...]:
    """``F.linear(gathered, w, b)`` for each ``(w, b)`` pair of ``weights``, where
    ``gathered`` is every rank's sequence shard ``x`` concatenated along ``dim``: a region
    entry under sequence parallelism whose readers are column-parallel linears. Keeps only
    ``x`` for the backward, which gathers it again and reduce-scatters its gradient.
    ``gathered``: every rank's shard, already all-gathered (a started gather, waited for);
    ``grad_handles``: the backward starts the reduce-scatter into them and returns (the
    caller waits before the gradient is read: ``sub_pipeline.joint_wait``)."""
    return _SequenceLinears.apply(x, dim, group, gathered, grad_handles, *weights)


def copy_to_tp(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Megatron's f: identity forward, all-reduce of the gradient backward."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Megatron's g: all-reduce (sum) forward, identity backward."""
    return _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, dim: int, group: Any = None) -> torch.Tensor:
    """This rank's contiguous 1/t of ``x`` along ``dim``; backward all-gathers."""
    return _AlongDim.apply(x, dim, group, "slice", "gather")


def gather_from_tp(x: torch.Tensor, dim: int, group: Any = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``; backward keeps this rank's slice."""
    return _AlongDim.apply(x, dim, group, "gather", "slice")


class _VocabParallelCE(torch.autograd.Function):
    """Per-row cross entropy of ``[N, V/t]`` logits whose columns start at ``vocab_start``."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                ignore_index: int, group: Any) -> torch.Tensor:
        local = logits.shape[-1]
        row_max = _all_reduce(logits.detach().amax(dim=-1), group, op="max")
        shifted = logits.detach() - row_max.unsqueeze(-1)
        ignored = target == ignore_index
        idx = target - vocab_start
        skip = (idx < 0) | (idx >= local) | ignored
        idx = idx.masked_fill(skip, 0)
        picked = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1).masked_fill(skip, 0.0)
        picked = _all_reduce(picked, group)
        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)
        loss = (sum_exp.log() - picked).masked_fill(ignored, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))  # the softmax, this rank's columns
        ctx.save_for_backward(exp, idx, skip, ignored)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        softmax, idx, skip, ignored = ctx.saved_tensors
        out = softmax.clone()
        hit = (~skip).to(out.dtype).unsqueeze(-1)
        out.scatter_add_(-1, idx.unsqueeze(-1), -hit)
        out.mul_(grad.masked_fill(ignored, 0.0).unsqueeze(-1))
        return out, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: Any = None, *, ignore_index: int = -100,
    reduction: str = "mean", vocab_start: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy`` of logits sharded on the class dim (dim 1, or 0 for 1-d logits),
    each rank holding the contiguous columns starting at ``vocab_start`` (default
    ``rank * V/t``). ``reduction`` is ``mean`` (over targets not equal to ``ignore_index``),
    ``sum`` or ``none``; the result is the same on every rank. Computed in fp32 whatever
    the logits' dtype (as autocast runs ``F.cross_entropy``)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    if vocab_start is None:
        vocab_start = _dist().get_rank(group) * logits.shape[1 if logits.dim() >= 2 else 0]
    shape = target.shape
    if logits.is_floating_point() and logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if logits.dim() == 1:
        rows, flat = logits.unsqueeze(0), target.reshape(1)
    else:
        rows = logits.movedim(1, -1).reshape(-1, logits.shape[1])
        flat = target.reshape(-1)
    loss = _VocabParallelCE.apply(rows, flat, vocab_start, ignore_index, group)
    if reduction == "none":
        return loss.reshape(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (flat != ignore_index).sum()


def vocab_parallel_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int,
                             padding_idx: int | None = None) -> torch.Tensor:
    """Look up the rows ``[start, start + len(weight))`` this rank owns; zeros elsewhere.
    Summing every rank's result (`reduce_from_tp`) gives the full lookup. ``padding_idx``
    is a global row id whose gradient stays zero.

    >>> w = torch.arange(8.0).view(4, 2)
    >>> vocab_parallel_embedding(torch.tensor([0, 3]), w[2:], 2)
    tensor([[0., 0.],
            [6., 7.]])
    """
    local = ids - start
    outside = (local < 0) | (local >= weight.shape[0])
    pad = None
    if padding_idx is not None and start <= padding_idx < start + weight.shape[0]:
        pad = padding_idx - start
    out = F.embedding(local.masked_fill(outside, 0), weight, padding_idx=pad)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


# ---- modules for rewritten graphs --------------------------------------------------------


class TPCollective(nn.Module):
    """A collective on the tensor-parallel group, as a graph module. ``t`` and ``rank`` are
    the group's size and this rank's place in it; `meta_forward` gives the output shape
    without communicating. A deep copy shares the process group."""

    def __init__(self, group: Any, t: int, rank: int) -> None:
        super().__init__()
        self.group, self.t, self.rank = group, t, rank

    def __deepcopy__(self, memo: dict) -> TPCollective:
        new = type(self)(self.group, self.t, self.rank)
        new.train(self.training)
        return new

    def extra_repr(self) -> str:
        return f"t={self.t}, rank={self.rank}"

    def meta_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return x.clone()


class CopyToTP(TPCollective):
    """Megatron's f (`copy_to_tp`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return copy_to_tp(x, self.group)


class ReduceFromTP(TPCollective):
    """Megatron's g (`reduce_from_tp`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(x, self.group)


class ScatterToTP(TPCollective):
    """`scatter_to_tp` along ``dim``."""

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return scatter_to_tp(x, dim, self.group)

    def meta_forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        n = x.shape[dim] // self.t
        return x.narrow(dim, self.rank * n, n).clone()


class GatherFromTP(TPCollective):
    """`gather_from_tp` along ``dim``."""

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return gather_from_tp(x, dim, self.group)

    def meta_forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([x] * self.t, dim)


class GatherToTP(GatherFromTP):
    """`gather_to_tp` along ``dim`` (sequence parallelism's region entry)."""

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return gather_to_tp(x, dim, self.group)


class ReduceScatterFromTP(ScatterToTP):
    """`reduce_scatter_from_tp` along ``dim`` (sequence parallelism's region exit)."""

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return reduce_scatter_from_tp(x, dim, self.group)


class SequenceLinears(TPCollective):
    """`sequence_linears` (the entry of a region whose readers are column-parallel
    linears, under sequence parallelism)."""

    def forward(self, x: torch.Tensor, dim: int, *weights: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:
        return sequence_linears(x, dim, self.group, *weights)

    def meta_forward(self, x: torch.Tensor, dim: int, *weights: torch.Tensor | None
                     ) -> tuple[torch.Tensor, ...]:
        whole = torch.cat([x] * self.t, dim)
        return tuple(F.linear(whole, w, b) for w, b in zip(weights[::2], weights[1::2]))


class VocabParallelCrossEntropy(TPCollective):
    """`vocab_parallel_cross_entropy`; this rank's columns start at ``rank * V/t``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                reduction: str = "mean") -> torch.Tensor:
        start = self.rank * logits.shape[1 if logits.dim() >= 2 else 0]
        return vocab_parallel_cross_entropy(logits, target, self.group, ignore_index=ignore_index,
                                            reduction=reduction, vocab_start=start)

    def meta_forward(self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                     reduction: str = "mean") -> torch.Tensor:
        shape = target.shape if reduction == "none" else ()
        return torch.empty(shape, dtype=logits.dtype, device=logits.device)
