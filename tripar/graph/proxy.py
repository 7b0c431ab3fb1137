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
    ops: int = 0
    """Tensor operators its forward calls (FX call nodes producing a tensor, ``getitem``
    excluded); each pays a fixed dispatch/autograd cost per pass (``Efficiency.op_s``)."""
    selective_nodes: tuple[str, ...] = ()
    """Nodes selective recomputation re-runs: the parts cheap to recompute and costly to
    keep (``tripar.graph.selective``; the attention core without a fused kernel)."""
    selective_bytes: int = 0
    """Saved bytes that recomputing ``selective_nodes`` frees."""
    selective_flops: int = 0
    """Forward FLOPs of ``selective_nodes`` (re-run in the backward)."""
    selective_ops: int = 0
    """Tensor operators among ``selective_nodes``."""
    sequence_saved_bytes: int = 0
    """Of ``saved_bytes``, what the token-wise nodes between tensor-parallel regions save
    (norms, dropouts, residual adds: ``tripar.graph.sequence``): what sequence
    parallelism divides by t."""
    autocast_saved_bytes: int = -1
    """``saved_bytes`` with the forward under bf16 autocast and fp32 weights (how tripar
    trains in bf16: fp32 norms, softmax, loss and residual stream, bf16 copies of the
    products' inputs and weights); -1: not measured."""


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
    column: tuple[str, ...] = ()
    """Nodes whose weight is sharded on its output features. The Megatron f function
    (identity forward, all-reduce of the input gradient backward) goes before them."""
    row: tuple[str, ...] = ()
    """Nodes whose output is a partial sum: the forward all-reduce (g) goes right after
    them, and their bias (replicated) is added once, after the all-reduce."""
    rewrites: tuple[tuple[str, int], ...] = ()
    """(node, flat argument index): a shape entry that must be divided by the degree t.
    The index counts the leaves of ``(node.args, node.kwargs)`` in
    ``torch.utils._pytree.tree_flatten`` order. An int leaf becomes ``leaf // t``; a
    Node leaf is replaced by a new ``operator.floordiv(leaf, t)`` node."""
    narrows: tuple[tuple[str, int, int], ...] = ()
    """(node, flat argument index, dim): a replicated tensor operand of a sharded op that
    each rank slices to its own 1/t along ``dim`` (no communication)."""
    parts: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """(parameter FQN, part sizes) for fused weights (QKV): the sharded dim is made of
    these consecutive parts and each is split into t contiguous pieces; rank r keeps
    piece r of every part. Parameters not listed are one part (a contiguous slice)."""
    outputs: tuple[str, ...] = ()
    """Nodes whose sharded value is also a graph output (all-gather it where needed)."""
    loss: str = ""
    """The vocab-parallel cross-entropy node of an ``lm_head`` region, if any."""
    tied: tuple[str, ...] = ()
    """Every FQN naming a sharded parameter that is shared (tied embedding and head)."""
    index: int = 0
    """Position among the candidate regions of this ``kind`` in this ``block``, in graph
    order (0 for the first): a t5 decoder layer has two attention regions, 0 (self) and
    1 (cross). Candidates that fail their proof keep their number, so a region's name does
    not depend on the degrees tried."""

    @property
    def name(self) -> str:
        """``block:kind:index``, unique within a graph: how plans, the search and codegen
        name the region."""
        return f"{self.block}:{self.kind}:{self.index}"


@dataclass(frozen=True, slots=True)
class Unproven:
    """A candidate region that stays replicated, and why."""

    block: str
    nodes: tuple[str, ...]
    reason: str
    kind: str = ""
    """The region kind it would have been (``mlp``, ``attention``...), when known."""
    degree: int = 0
    """The degree t that failed, or 0 when the region fails at every degree."""


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
    """(graph input, first block after the first one that reads it): inputs a later
    stage loads directly (labels, attention masks), never sent p2p."""
    tied_weights: list[tuple[str, ...]] = field(default_factory=list)
    """Groups of FQNs that name one shared parameter (embedding = LM head)."""
    derived_inputs: list[tuple[str, str]] = field(default_factory=list)
    """(FX node, first later block reading it) for values computed only from graph inputs,
    buffers and constants (masks, position ids, rotary tables): a stage that needs one
    recomputes it from the inputs, so it is not a cut tensor."""
    model_config: dict = field(default_factory=dict)
    """Sizes the planner may need (``layers``, ``hidden``, ``heads``, ``vocab``...), when known."""

    @property
    def flops_per_sample(self) -> float:
        """Forward and backward FLOPs of one sample with no recomputation: the model FLOPs
        that model FLOP/s and MFU count (``tripar simulate`` and ``tripar train``)."""
        return sum(b.forward_flops + b.backward_flops for b in self.blocks) / self.batch_size
