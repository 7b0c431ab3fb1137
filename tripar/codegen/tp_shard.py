"""This rank's slices of the weights that tensor-parallel regions shard.

A region records ``(FQN, dim)`` for each sharded weight and, for fused weights
(QKV), the part sizes along that dim (``TPRegion.parts``): rank r keeps piece r of
t of every part. `shard_parameters` cuts a model's (or a state dict's) tensors that
way; `shard_map` says, per local name, which original FQN, dim and index ranges the
local tensor holds (JSON-ready for checkpoints and the parameter map). Local names
are the original ones: the rewrite keeps every parameter where it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tripar.errors import PlanError
from tripar.graph.proxy import TPRegion
from tripar.graph.tp_prove import take_shard

__all__ = ["ParamShard", "region_shards", "shard_map", "shard_parameters", "take_shard"]


@dataclass(frozen=True, slots=True)
class ParamShard:
    """How a local tensor was cut from an original one."""

    fqn: str
    """The original parameter's FQN."""
    dim: int
    parts: tuple[int, ...]
    """Sizes of the fused parts along ``dim`` (one part: the whole dim)."""
    ranges: tuple[tuple[int, int], ...]
    """``[start, stop)`` index ranges along ``dim`` kept, one per part, concatenated in order."""
    t: int
    rank: int

    def to_json(self) -> dict:
        return {"fqn": self.fqn, "dim": self.dim, "parts": list(self.parts),
                "ranges": [list(r) for r in self.ranges], "t": self.t, "rank": self.rank}


def region_shards(regions: Sequence[TPRegion]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Sharded FQN -> (dim, parts) over all ``regions``; raises PlanError when two regions
    cut one weight differently (a tied embedding and head must agree)."""
    out: dict[str, tuple[int, tuple[int, ...]]] = {}
    for region in regions:
        parts = dict(region.parts)
        for fqn, dim in region.shards:
            cut = (dim, tuple(parts.get(fqn, ())))
            if out.setdefault(fqn, cut) != cut:
                raise PlanError(
                    f"parameter {fqn} is sharded as (dim, parts)={out[fqn]} by one region and "
                    f"{cut} by the {region.kind} region at node {region.nodes[0]}: a shared weight "
                    "must be cut the same way by every region (or left replicated by all)")
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two entries name one tensor (a state dict detaches each name separately)."""
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return a.device.type == "meta" or a.data_ptr() == b.data_ptr()


def _cuts(tensors: Mapping[str, torch.Tensor], regions: Sequence[TPRegion]) -> dict[str, tuple]:
    """Local name -> (canonical FQN, dim, parts) for every name of a sharded tensor: the
    FQN itself, other names of the same tensor object, and the region's tied names that
    hold the same storage."""
    shards = region_shards(regions)
    out = {}
    for fqn, (dim, parts) in shards.items():
        if fqn not in tensors:
            raise PlanError(f"a region shards parameter {fqn}, which the model does not have "
                            f"(it has {len(tensors)} tensors, e.g. {sorted(tensors)[:3]})")
        out[fqn] = (fqn, dim, parts)
    for name, tensor in tensors.items():
        if name not in out:
            for fqn in shards:
                if tensor is tensors[fqn]:
                    out[name] = out[fqn]
    for region in regions:
        for name in region.tied:
            if name in tensors and name not in out:
                match = [f for f, _ in region.shards if _same(tensors[name], tensors[f])]
                if match:
                    out[name] = out[match[0]]
    return out


def _state(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        state = dict(model_or_state.named_parameters(remove_duplicate=False))
        state.update(model_or_state.named_buffers(remove_duplicate=False))
        return state
    return dict(model_or_state)


def _ranges(size: int, parts: tuple[int, ...], t: int, rank: int) -> tuple[tuple[int, int], ...]:
    out, start = [], 0
    for p in parts or (size,):
        n = p // t
        out.append((start + rank * n, start + (rank + 1) * n))
        start += p
    return tuple(out)


def shard_map(model_or_state: nn.Module | Mapping[str, torch.Tensor], regions: Sequence[TPRegion],
              *, t: int, rank: int) -> dict[str, ParamShard]:
    """Local name -> `ParamShard` for every sharded tensor (each name of a tied one).

    >>> from tripar.graph.proxy import TPRegion
    >>> r = TPRegion("mlp", "", ("fc",), (("fc.weight", 0),), "all_reduce", "all_reduce", 0, (2,),
    ...              parts=(("fc.weight", (4, 4)),))
    >>> shard_map({"fc.weight": torch.zeros(8, 3)}, [r], t=2, rank=1)["fc.weight"].ranges
    ((2, 4), (6, 8))
    """
    tensors = _state(model_or_state)
    out = {}
    for name, (fqn, dim, parts) in _cuts(tensors, regions).items():
        size = tensors[name].shape[dim]
        check_divisible(fqn, size, dim, parts, t)
        out[name] = ParamShard(fqn, dim, parts, _ranges(size, parts, t, rank), t, rank)
    return out


def check_divisible(fqn: str, size: int, dim: int, parts: tuple[int, ...], t: int) -> None:
    if sum(parts or (size,)) != size:
        raise PlanError(f"parameter {fqn} has {size} along dim {dim} but its parts {parts} add "
                        f"up to {sum(parts)}: the region does not match this model")
    for p in parts or (size,):
        if p % t:
            raise PlanError(f"parameter {fqn}: {p} along dim {dim} is not divisible by t={t}; "
                            "choose a tensor-parallel degree that divides it")


def shard_parameters(model_or_state: nn.Module | Mapping[str, torch.Tensor],
                     regions: Sequence[TPRegion], *, t: int, rank: int) -> dict[str, torch.Tensor]:
    """This rank's tensors: sharded ones sliced (a fresh contiguous tensor, shared by the
    names of a tied weight), the rest as they are. Load the result into the module
    `tp_rewrite` returns with ``load_state_dict``.

    >>> from tripar.graph.proxy import TPRegion
    >>> r = TPRegion("mlp", "", ("fc",), (("fc.weight", 0),), "all_reduce", "all_reduce", 0, (2,))
    >>> shard_parameters({"fc.weight": torch.arange(4.0).view(4, 1)}, [r], t=2, rank=1)
    {'fc.weight': tensor([[2.],
            [3.]])}
    """
    if not (isinstance(t, int) and t >= 1 and 0 <= rank < t):
        raise PlanError(f"tensor-parallel rank {rank} must lie in [0, t) with t={t} >= 1")
    tensors = _state(model_or_state)
    cuts = _cuts(tensors, regions)
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name not in cuts:
            out[name] = tensor
            continue
        fqn, dim, parts = cuts[name]
        if id(tensor) not in done:
            check_divisible(fqn, tensor.shape[dim], dim, parts, t)
            with torch.no_grad():
                done[id(tensor)] = take_shard(tensor.detach(), dim, parts, t, rank).clone()
        out[name] = done[id(tensor)]
    return out
