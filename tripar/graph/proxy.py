"""The proxy graph: the model as a chain of costed blocks.

This is the contract between ``tripar.graph`` and the planner. The planner
reads only these dataclasses (never the FX graph), so everything it needs
to cost a block is recorded here, for the batch the graph was annotated with
(``ProxyGraph.batch_size`` samples of ``ProxyGraph.seq_len`` tokens). FLOPs,
saved bytes and activation bytes scale linearly with the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A tensor that crosses a boundary: the FX node that makes it and its shape."""

    node: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int


@dataclass(frozen=True, slots=True)
class Block:
    """A group of graph nodes the planner treats as a unit (a layer, an embedding, a head)."""

    name: str
    """Module FQN the block was grouped by (``transformer.h.3``), or a synthetic name."""
    index: int
    """Position in topological order, 0-based."""
    kind: str
    """``embedding``, ``layer``, ``norm``, ``head``, ``loss`` or ``other``."""
    nodes: tuple[str, ...]
    """FX node names, in graph order."""
    params: int
    """Parameters owned by the block; a tied parameter counts in the first block using it."""
    param_bytes: int
    forward_flops: int
    backward_flops: int
    saved_bytes: int
    """Bytes saved for backward during the forward, measured with saved_tensors_hooks."""
    input_bytes: int
    """Bytes of activations entering the block (what full recomputation must keep)."""
    output_bytes: int
    """Bytes of activations leaving the block."""
    signature: str
    """Equal for blocks of identical structure and shapes (costed once)."""
    matmuls: tuple[tuple[int, int, int], ...] = ()
    """(m, k, n) of each forward matrix product, for the efficiency model."""
    param_names: tuple[str, ...] = ()
    """FQNs of the parameters the block owns."""


@dataclass(frozen=True, slots=True)
class Cut:
    """A candidate pipeline cut after block ``after``."""

    after: str
    tensors: tuple[TensorInfo, ...]
    bytes: int


@dataclass(frozen=True, slots=True)
class TPRegion:
    """A set of nodes tensor parallelism shards together, proven by shape propagation."""

    kind: str
    """``mlp``, ``attention``, ``embedding`` or ``lm_head``."""
    block: str
    nodes: tuple[str, ...]
    shards: tuple[tuple[str, int], ...]
    """(parameter FQN, weight dim sharded) for every sharded weight."""
    forward_collective: str
    """``all_reduce``, ``all_gather`` or ``none`` (the Megatron g function's forward)."""
    backward_collective: str
    comm_bytes: int
    """Bytes the forward collective moves per pass for the annotated batch."""
    degrees: tuple[int, ...]
    """Tensor-parallel degrees for which sharded shape propagation succeeded."""
    heads: int = 0
    """Attention heads (query heads) the region divides, 0 when not attention."""
    kv_heads: int = 0


@dataclass(frozen=True, slots=True)
class Unproven:
    """A candidate region that stays replicated, and why."""

    block: str
    nodes: tuple[str, ...]
    reason: str


@dataclass
class ProxyGraph:
    """Blocks in order plus what connects them. ``graph`` is a networkx.DiGraph
    whose nodes are block names and whose edges carry ``bytes`` and ``tensors``."""

    blocks: list[Block]
    cuts: list[Cut]
    graph: nx.DiGraph
    tracer: str
    """``fx`` or ``export``."""
    tracer_reason: str
    batch_size: int
    seq_len: int
    dtype: str
    tp_regions: list[TPRegion] = field(default_factory=list)
    unproven: list[Unproven] = field(default_factory=list)
    skips: list[tuple[str, str]] = field(default_factory=list)
    """(producer block, consumer block) for values that skip over blocks."""
    late_inputs: list[tuple[str, str]] = field(default_factory=list)
    """(graph input, first block consuming it) for inputs not used by the first block."""
    tied_weights: list[tuple[str, ...]] = field(default_factory=list)
    """Groups of FQNs that name one shared parameter (embedding = LM head)."""
    model_config: dict = field(default_factory=dict)
    """Sizes the planner may need (``layers``, ``hidden``, ``heads``, ``vocab``...), when known."""
