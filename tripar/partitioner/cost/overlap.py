"""Sub-pipelined tensor parallelism (Merak): a block run as k parts whose collectives
overlap the next part's compute.

With ``tp_overlap`` = k a block's microbatch runs as k parts of ``b / k`` samples. Part
i's collectives (the regions' all-reduces, or all-gathers and reduce-scatters under
sequence parallelism) run while part i+1 computes, in the forward and in the input
gradient (B). Each part computes at its own, smaller, products' efficiency and pays its
own launches and per-operator overheads (the part's cost is the block's cost at ``b /
k``). With part compute c and part collectives x, a pass takes the two-stage pipeline's
``c + x + (k - 1) max(c, x)``: one part's collectives stay exposed, and beyond that only
what the collectives take longer than the compute. The weight gradient (W) runs k parts
back to back. Memory is the whole microbatch's: the parts' saved tensors add up to it.

A microbatch of one sample splits along the sequence instead. Each part is the block
at ``1 / k`` of the tokens, but the attention core (the products of two activations:
the scores and their product with the values) relates every position to the earlier
ones, so it runs once, on the whole sequence, between the parts (``joined``): its time
(``core_s`` per part, twice that in the backward) is taken out of the pipelined compute
and added whole, hiding nothing.

Under sequence parallelism an exit's backward all-gathers the gradient the row-parallel
linear before it reads at once; PyTorch's autograd engine runs that linear's backward
right after (it was made just before the exit in the forward), so nothing hides it:
``tp_backward_kept_s`` is paid in full by every part.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

BlockCost = TypeVar("BlockCost")
"""A :class:`~tripar.partitioner.cost.blocks.BlockCost` (blocks.py imports this module)."""


def pipelined(compute_s: float, comm_s: float, parts: int) -> float:
    """A pass of ``parts`` parts, each computing ``compute_s`` then communicating
    ``comm_s``, the collectives of one overlapping the compute of the next.

    >>> pipelined(2.0, 1.0, 1), pipelined(1.0, 0.5, 2), pipelined(1.0, 3.0, 2)
    (3.0, 2.5, 7.0)
    """
    return compute_s + comm_s + (parts - 1) * max(compute_s, comm_s)


def overlapped(whole: BlockCost, part: BlockCost, parts: int, *,
               joined: bool = False) -> BlockCost:
    """``whole`` (the block at the full microbatch) run as ``parts`` parts, each costing
    ``part`` (the block at ``1 / parts`` of the microbatch, collectives not overlapped);
    ``joined``: the parts split the sequence and the attention core runs whole.

    >>> from tripar.partitioner.cost.blocks import BlockCost
    >>> part = BlockCost(forward_s=1.5, backward_input_s=2.5, backward_weight_s=1.0,
    ...                  saved_bytes=50, input_bytes=10, output_bytes=10, params=4,
    ...                  tp_comm_s=1.0, tp_forward_comm_s=0.5, tp_backward_comm_s=0.5)
    >>> whole = replace(part, saved_bytes=100, input_bytes=20, output_bytes=20)
    >>> two = overlapped(whole, part, 2)
    >>> two.forward_s, two.backward_input_s, two.backward_weight_s, two.tp_comm_s
    (2.5, 4.5, 2.0, 1.0)
    >>> two.saved_bytes
    100
    >>> core = replace(part, core_s=0.8)  # 0.2 + 0.5 + 0.5, then 2 * 0.8 hiding nothing
    >>> seq = overlapped(whole, core, 2, joined=True)
    >>> round(seq.forward_s, 6), round(seq.backward_input_s, 6), round(seq.tp_forward_comm_s, 6)
    (2.8, 4.6, 0.8)
    """
    core_f = part.core_s if joined else 0.0
    core_b = min(2 * core_f, part.backward_input_s - part.tp_backward_comm_s)
    kept = part.tp_backward_kept_s   # waited for at once, in every part
    fwd_compute = part.forward_s - part.tp_forward_comm_s - core_f
    bwd_compute = part.backward_input_s - part.tp_backward_comm_s - core_b
    forward = pipelined(fwd_compute, part.tp_forward_comm_s, parts) + parts * core_f
    backward = (pipelined(bwd_compute, part.tp_backward_comm_s - kept, parts)
                + parts * (core_b + kept))
    fwd_exposed = forward - parts * (fwd_compute + core_f)
    bwd_exposed = backward - parts * (bwd_compute + core_b)
    regather = part.tp_comm_s - part.tp_forward_comm_s - part.tp_backward_comm_s
    return replace(
        whole, forward_s=forward, backward_input_s=backward,
        backward_weight_s=parts * part.backward_weight_s,
        tp_comm_s=fwd_exposed + bwd_exposed + parts * regather,
        tp_forward_comm_s=fwd_exposed, tp_backward_comm_s=bwd_exposed,
        selective_s=parts * part.selective_s, core_s=parts * part.core_s)
