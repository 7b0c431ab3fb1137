"""The parallel configuration: the degrees and policies a plan fixes."""

from __future__ import annotations

from dataclasses import dataclass

from tripar.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "scp", "chimera")
"""Pipeline schedules tripar can generate, simulate and run."""

RECOMPUTE = ("none", "selective", "full", "stage-aware")
"""Activation recomputation policies: ``none``; ``selective`` (every stage recomputes only
the parts of its blocks that are cheap to recompute and costly to keep, such as the
attention core); ``full`` (every block); ``stage-aware`` (per stage, the cheapest of none,
selective, and selective or not with some blocks recomputed whole, that fits)."""

ZERO_STAGES = (0, 1, 2)
"""ZeRO stages tripar runs: 0 replicates optimizer state and gradients over data-parallel
ranks, 1 shards the optimizer state (ZeRO-1), 2 the gradients too (ZeRO-2)."""


def splits_sequence(micro_batch_size: int, tp_overlap: int) -> bool:
    """Whether ``tp_overlap``'s parts split the sequence: several parts of a one-sample
    microbatch (which sequence parallelism, sharding that sequence, cannot join)."""
    return tp_overlap > 1 and micro_batch_size == 1


def _check_tp_overlap(cfg: ParallelConfig) -> None:
    """tp_overlap=k splits a microbatch into k parts inside a TP stage: along the batch,
    or along the sequence where the microbatch is one sample (then the plan checks that k
    divides the sequence)."""
    k = cfg.tp_overlap
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"tp_overlap must be a positive integer, got {k!r}")
    if k == 1:
        return
    if cfg.tp == 1:
        raise ConfigError(f"tp_overlap={k} overlaps tensor-parallel collectives with compute "
                          "and needs tp > 1; use tp_overlap=1 at tp=1")
    if splits_sequence(cfg.micro_batch_size, k) and cfg.sp:
        raise ConfigError(f"tp_overlap={k} at micro_batch_size=1 splits the sequence, which "
                          "sequence parallelism (sp=True) already shards over the "
                          "tensor-parallel ranks; use sp=False, or a micro_batch_size "
                          f"divisible by {k} to split along the batch")
    if cfg.micro_batch_size > 1 and cfg.micro_batch_size % k:
        raise ConfigError(f"tp_overlap={k} splits each microbatch into {k} parts along the "
                          f"batch, but micro_batch_size={cfg.micro_batch_size} is not "
                          f"divisible by {k}; use a tp_overlap that divides it")


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """How one training step is split across devices.

    >>> ParallelConfig(dp=2, tp=4, pp=8, micro_batch_size=1, num_microbatches=16).devices
    64
    """

    dp: int
    """Data-parallel degree (model replicas)."""
    tp: int
    """Tensor-parallel degree (devices that shard one layer); 1 means disabled."""
    pp: int
    """Pipeline-parallel degree (pipeline ranks); 1 means disabled."""
    micro_batch_size: int
    """Samples in one microbatch."""
    num_microbatches: int
    """Microbatches each data-parallel replica runs per step."""
    vpp: int = 1
    """Virtual stages per pipeline rank (interleaved-1f1b only); 1 means not interleaved."""
    schedule: str = "1f1b"
    """One of SCHEDULES."""
    recompute: str = "none"
    """One of RECOMPUTE."""
    zero: int = 0
    """One of ZERO_STAGES: 1 shards optimizer state across data-parallel ranks (ZeRO-1),
    2 also the gradients (ZeRO-2: each rank keeps only its reduce-scattered shard); 0
    keeps both whole."""
    sp: bool = False
    """Sequence parallelism: the token-wise parts between tensor-parallel regions (norms,
    dropouts, residual adds) run on a 1/tp slice of the sequence; needs tp > 1."""
    tp_overlap: int = 1
    """Sub-pipelined tensor parallelism (Merak): each microbatch runs as this many parts
    inside a tensor-parallel stage, so that one part's collectives overlap the next part's
    compute; 1 means disabled. Needs tp > 1. The parts split the batch (tp_overlap divides
    micro_batch_size), or, at micro_batch_size 1, the sequence (without sp)."""

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batch_size", "num_microbatches", "vpp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if self.recompute not in RECOMPUTE:
            raise ConfigError(
                f"unknown recompute policy {self.recompute!r}; choose one of {', '.join(RECOMPUTE)}"
            )
        if self.zero not in ZERO_STAGES or isinstance(self.zero, bool):
            raise ConfigError(f"zero must be one of {', '.join(map(str, ZERO_STAGES))} "
                              f"(the ZeRO stage), got {self.zero!r}")
        if not isinstance(self.sp, bool):
            raise ConfigError(f"sp must be True or False, got {self.sp!r}")
        if self.sp and self.tp == 1:
            raise ConfigError("sp=True (sequence parallelism) shards the sequence over the "
                              "tensor-parallel ranks and needs tp > 1; use sp=False at tp=1")
        _check_tp_overlap(self)
        if self.vpp > 1 and self.schedule != "interleaved-1f1b":
            raise ConfigError(
                f"vpp={self.vpp} needs schedule 'interleaved-1f1b', not {self.schedule!r}"
            )
        if self.schedule == "chimera" and (self.pp % 2 or self.num_microbatches % 2):
            raise ConfigError(
                f"schedule 'chimera' needs an even pp and an even num_microbatches (got pp="
                f"{self.pp}, num_microbatches={self.num_microbatches}): rank r holds stage r of "
                f"the down pipeline and stage pp-1-r of the up pipeline, and each pipeline "
                f"takes half the microbatches")

    @property
    def splits_sequence(self) -> bool:
        """Whether the tp_overlap parts split the sequence (a one-sample microbatch)."""
        return splits_sequence(self.micro_batch_size, self.tp_overlap)

    @property
    def pipelines(self) -> int:
        """Pipelines over the same ranks: 2 for chimera (each stage held twice), else 1."""
        return 2 if self.schedule == "chimera" else 1

    def stages_on(self, rank: int) -> tuple[int, ...]:
        """The (virtual) stages pipeline rank ``rank`` holds.

        >>> ParallelConfig(1, 1, 4, 1, 4, schedule="chimera").stages_on(1)
        (1, 2)
        >>> ParallelConfig(1, 1, 2, 1, 4, vpp=2, schedule="interleaved-1f1b").stages_on(1)
        (1, 3)
        """
        if self.pipelines == 2:
            return tuple(sorted({rank, self.pp - 1 - rank}))
        return tuple(range(rank, self.pp * self.vpp, self.pp))

    def ranks_of(self, stage: int) -> tuple[int, ...]:
        """The pipeline ranks holding (virtual) stage ``stage``: ``stage % pp``, and under
        chimera also ``pp - 1 - stage`` (the up pipeline's replica)."""
        if self.pipelines == 2:
            return (stage, self.pp - 1 - stage)
        return (stage % self.pp,)

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def global_batch_size(self) -> int:
        return self.dp * self.micro_batch_size * self.num_microbatches
