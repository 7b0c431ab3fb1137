"""What the simulator needs to know about one (virtual) stage.

The cost model (``tripar.partitioner.cost``) produces these from the
proxy graph, the cluster and the parallel configuration; the simulator
(``tripar.partitioner.simulator``) plays a schedule with them. Times are
seconds per microbatch, bytes are per device.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StageCost:
    """Per-microbatch cost of one (virtual) pipeline stage on one device."""

    forward_s: float
    """F: forward of one microbatch, tensor-parallel collectives included."""
    backward_input_s: float
    """B: gradient w.r.t. the stage input (the critical path of the backward)."""
    backward_weight_s: float
    """W: gradient w.r.t. the weights. Schedules that do not split the backward run B+W as one."""
    recompute_s: float = 0.0
    """R: re-running the forward of a microbatch whose activations were dropped."""
    send_s: float = 0.0
    """p2p time (latency + bytes/bandwidth) to send one microbatch's activation to the
    next stage; the gradient sent back is the same size."""
    activation_bytes: int = 0
    """Bytes held per microbatch between its F (or R) and its backward."""
    input_bytes: int = 0
    """Bytes held per microbatch after an ``f`` (forward keeping only the stage input)."""
    static_bytes: int = 0
    """Weights, gradients, optimizer state and communication buffers: held all step."""
    tail_s: float = 0.0
    """Work after the last backward on this stage: the part of the data-parallel
    gradient reduction that does not overlap the backward, and the optimizer step."""
    weight_grad_bytes: int = 0
    """Schedules that split the backward (zb-h1): bytes a B leaves held for its W (the saved
    inputs of the weight-bearing ops and their output gradients), freed by the W. B itself
    frees ``activation_bytes``."""

    def __post_init__(self) -> None:
        for name in ("forward_s", "backward_input_s", "backward_weight_s", "recompute_s",
                     "send_s", "tail_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"StageCost.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("activation_bytes", "input_bytes", "static_bytes", "weight_grad_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"StageCost.{name} must be >= 0, got {getattr(self, name)}")
