"""Block costs: one block on one device for one microbatch, tensor parallelism applied.

The conventions (batch and dtype scaling, compute, Korthikanti's activation structure,
what a sharded region divides and the collectives it adds) are in the docstring of
:mod:`tripar.partitioner.cost`. The examples use ``example_graph``, the hand-built
GPT-like proxy graph of :mod:`tripar.partitioner.examples`, which the pytest plugin
``tests/doctest_namespace.py`` puts in every doctest's namespace.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

from tripar.errors import ConfigError
from tripar.graph.proxy import Block, ProxyGraph, TPRegion
from tripar.partitioner.cost.collectives import collective_time
from tripar.partitioner.cost.overlap import overlapped
from tripar.partitioner.hardware import Cluster, canonical_dtype, dtype_bytes
from tripar.plan.config import ParallelConfig

_REPLICATED_INPUTS = {"attention": 2.5, "mlp": 2.5, "embedding": 1.0, "lm_head": 1.0,
                      "loss": 0.0}


@dataclass(frozen=True, slots=True)
class BlockCost:
    """One block on one device for one microbatch (tensor parallelism applied)."""

    forward_s: float
    backward_input_s: float
    backward_weight_s: float
    saved_bytes: int
    input_bytes: int
    output_bytes: int
    params: int
    """Parameters held by this device."""
    tp_comm_s: float = 0.0
    """Tensor-parallel collective time included in forward_s, backward_input_s and
    backward_weight_s (under ``tp_overlap`` > 1: the part not hidden behind compute)."""
    tp_forward_comm_s: float = 0.0
    """The forward's share of ``tp_comm_s``: its collectives, all exposed at tp_overlap=1."""
    tp_backward_comm_s: float = 0.0
    """The input gradient's (B's) share of ``tp_comm_s``."""
    tp_backward_kept_s: float = 0.0
    """The part of ``tp_backward_comm_s`` that a block run in parts cannot hide: sequence
    parallelism's exit all-gathers (the gradient an exit's all-gather brings is read at
    once by the row-parallel linear before it, see ``tripar/codegen/sub_pipeline.py``)."""
    weight_grad_bytes: int = 0
    """Bytes a split backward (B) leaves for its W: the weight products' inputs and
    output gradients."""
    param_tensors: int = 0
    """Parameter tensors the block owns (what a per-tensor optimizer loops over)."""
    selective_bytes: int = 0
    """Bytes of ``saved_bytes`` that selective recomputation frees (``Block.selective_nodes``
    re-run in the backward; the attention core's ``5 a s^2 b`` when it is not fused)."""
    selective_s: float = 0.0
    """Time to re-run ``Block.selective_nodes`` (added to B when the block recomputes them)."""
    core_s: float = 0.0
    """Forward time of the block's products of two activations, batched over heads (the
    attention scores and their product with the values): what relates a token to the
    others, which a sequence split runs whole."""


def _regions_by_block(graph: ProxyGraph, tp: int) -> dict[str, list[TPRegion]]:
    """Every region of each block (proven at ``tp`` or not: the shares of a block's work
    are taken over all of them). A vocab-parallel cross-entropy that lives in a later
    block (``loss``) shards that block too, with no collective of its own (its reductions
    are counted in the LM-head region's ``comm_bytes``)."""
    regions: dict[str, list[TPRegion]] = {}
    if tp <= 1:
        return regions
    owner = {node: block.name for block in graph.blocks for node in block.nodes}
    for region in graph.tp_regions:
        regions.setdefault(region.block, []).append(region)
        loss_block = owner.get(region.loss) if region.loss else None
        if loss_block and loss_block != region.block:
            regions.setdefault(loss_block, []).append(TPRegion(
                "loss", loss_block, (region.loss,), (), "none", "none", 0, region.degrees))
    return regions


def shardable_regions(graph: ProxyGraph, tp: int) -> tuple[str, ...]:
    """Names (``block:kind:index``, ``TPRegion.name``) of the regions proven at degree
    ``tp``, in graph order.

    >>> shardable_regions(example_graph(layers=1), 2)
    ('blocks.0:attention:0', 'blocks.0:mlp:0')
    """
    if tp <= 1:
        return ()
    return tuple(r.name for r in graph.tp_regions if tp in r.degrees)


_KIND_ORDER = {"embedding": 0, "attention": 1, "mlp": 2, "lm_head": 3, "loss": 4}


def _product_owners(block: Block, regions: Sequence[TPRegion], tokens: int) -> list[int] | None:
    """The region (index into ``regions``) owning each product of ``block.matmuls``, or
    None when the products cannot be told apart.

    Products are given to the regions in graph order: a region takes one linear product
    (``m <= tokens``) per column and row node (an embedding or loss region none), and the
    batched products (``m > tokens``, heads folded into m) go to the block's one attention
    region. When that does not add up (an unproven linear between the regions, a
    hand-built graph without node lists) the answer is None."""
    position = {node: i for i, node in enumerate(block.nodes)}

    def first(r: TPRegion) -> tuple:
        at = [position[n] for n in (*r.column, *r.row) if n in position]
        return (min(at) if at else len(position), _KIND_ORDER.get(r.kind, 9))

    order = sorted(range(len(regions)), key=lambda i: first(regions[i]))
    want = [0 if regions[i].kind in ("embedding", "loss") else
            len(regions[i].column) + len(regions[i].row) for i in order]
    linear = [j for j, (m, _, _) in enumerate(block.matmuls) if m <= tokens]
    batched = [j for j, (m, _, _) in enumerate(block.matmuls) if m > tokens]
    attention = [i for i in order if regions[i].kind == "attention"]
    if sum(want) != len(linear) or not linear or (batched and len(attention) != 1):
        return None
    owners = [-1] * len(block.matmuls)
    at = 0
    for i, count in zip(order, want):
        for j in linear[at:at + count]:
            owners[j] = i
        at += count
    for j in batched:
        owners[j] = attention[0]
    return owners


def _region_shares(block: Block, regions: Sequence[TPRegion],
                   tokens: int) -> list[tuple[float, float, float]]:
    """Each region's share of its block's (product FLOPs, weight elements, activation
    elements its column and batched products write), over all the block's regions; equal
    shares when the products cannot be told apart (see ``_product_owners``)."""
    equal = [(1.0 / len(regions),) * 3] * len(regions)
    owners = _product_owners(block, regions, tokens) if len(regions) > 1 else None
    if owners is None:
        return equal
    weights = [[0.0, 0.0, 0.0] for _ in regions]
    seen = [0] * len(regions)
    for (m, k, n), i in zip(block.matmuls, owners):
        weights[i][0] += 2.0 * m * k * n
        if m <= tokens:
            weights[i][1] += k * n
            if seen[i] < len(regions[i].column):   # a column product: its output is split
                weights[i][2] += m * n
            seen[i] += 1
        else:
            weights[i][2] += m * n
    totals = [sum(w[d] for w in weights) for d in range(3)]
    if not all(totals):
        return equal
    return [(w[0] / totals[0], w[1] / totals[1], w[2] / totals[2]) for w in weights]


def _sharded_products(block: Block, regions: Sequence[TPRegion], sharded: Sequence[bool],
                      tokens: int) -> list[bool]:
    """Per product of ``block.matmuls``: whether it is split t ways. When the products
    cannot be told apart, the block's first products are split, up to the sharded
    regions' (equal) share of the block's product FLOPs."""
    n = len(block.matmuls)
    if not regions or not any(sharded):
        return [False] * n
    if all(sharded):
        return [True] * n
    owners = _product_owners(block, regions, tokens)
    if owners is not None:
        return [bool(sharded[i]) for i in owners]
    share = sum(1 for on in sharded if on) / len(regions)
    total = sum(2.0 * m * k * nn for m, k, nn in block.matmuls) or 1.0
    out, acc = [False] * n, 0.0
    for j, (m, k, nn) in enumerate(block.matmuls):
        if acc / total >= share - 1e-12:
            break
        out[j] = True
        acc += 2.0 * m * k * nn
    return out


def _saved_scale(block: Block, graph: ProxyGraph, dtype: str, scale: float,
                 byte_scale: float) -> float:
    """What a saved byte of the profile becomes in the training dtype: a 2-byte dtype on
    an fp32 model trains under autocast, which keeps norms, softmax, the loss and the
    residual stream in fp32 and saves bf16 copies of the products' inputs and weights, so
    the block's bytes under autocast, as measured (``Block.autocast_saved_bytes``); the
    dtype's size ratio where that was not measured."""
    if (block.autocast_saved_bytes >= 0 and block.saved_bytes and dtype_bytes(dtype) == 2
            and dtype_bytes(graph.dtype) == 4):
        return scale * block.autocast_saved_bytes / block.saved_bytes
    return byte_scale


def _block_cost(block: Block, regions: list[TPRegion], sharded: Sequence[bool],
                graph: ProxyGraph, cluster: Cluster, config: ParallelConfig,
                dtype: str, scale: float | None = None) -> BlockCost:
    """``regions`` are the block's regions proven at ``config.tp``; ``sharded`` says which of
    them are sharded. A sharded region divides its products, its share of the block's
    other FLOPs, weights and non-replicated activations by t and adds its collectives.
    ``scale``: the share of the profiled batch's tokens one microbatch holds (default:
    ``micro_batch_size`` samples of the profiled ones)."""
    spec = cluster.device
    eff = spec.efficiency
    peak = spec.peak(dtype)
    if scale is None:
        scale = config.micro_batch_size / graph.batch_size
    byte_scale = scale * dtype_bytes(dtype) / dtype_bytes(graph.dtype)
    t = config.tp if any(sharded) else 1
    tokens_annotated = graph.batch_size * graph.seq_len
    shares = _region_shares(block, regions, tokens_annotated) if regions else []
    f = sum(s[0] for s, on in zip(shares, sharded) if on)      # FLOP share sharded
    g = sum(s[1] for s, on in zip(shares, sharded) if on)      # weight share sharded
    h = sum(s[2] for s, on in zip(shares, sharded) if on)      # activation share sharded
    on_products = _sharded_products(block, regions, sharded, tokens_annotated)

    def divided(share: float) -> float:
        """Factor a quantity keeps when ``share`` of it is split t ways."""
        return 1.0 - share + share / t

    # Compute: each listed product at its own efficiency; the rest at their mean.
    forward_flops = block.forward_flops * scale * divided(f)
    listed_flops = 0.0
    listed_time = 0.0
    core_time = 0.0  # the products batched over heads: attention's scores and values
    operands = 0.0  # elements of (input, output gradient) pairs of the products
    for (m, k, n), split in zip(block.matmuls, on_products):
        d = t if split else 1
        m_mb = max(1.0, m * scale / (d if m > tokens_annotated else 1))  # heads split
        k_t, n_t = (k, n) if m > tokens_annotated else (k, n / d) if n >= k else (k / d, n)
        flops = 2.0 * m_mb * k_t * n_t
        listed_flops += flops
        listed_time += flops / (peak * eff.matmul(m_mb, k_t, n_t))
        if m > tokens_annotated:
            core_time += flops / (peak * eff.matmul(m_mb, k_t, n_t))
        operands += m_mb * (k_t + n_t)
    mean_rate = listed_flops / listed_time if listed_time else peak * eff.matmul_max
    forward_compute = listed_time + max(0.0, forward_flops - listed_flops) / mean_rate
    seconds_per_flop = forward_compute / forward_flops if forward_flops else 1.0 / mean_rate
    launches = eff.launch_s * len(block.matmuls)  # per pass; the backward has two per product

    # Bytes, converted to the training dtype and sharded per Korthikanti's structure.
    input_bytes = block.input_bytes * byte_scale
    saved_scale = _saved_scale(block, graph, dtype, scale, byte_scale)
    saved = block.saved_bytes * saved_scale
    # sequence parallelism: what the token-wise parts save is kept on 1/tp of the sequence
    sequence = min(saved, block.sequence_saved_bytes * saved_scale) \
        if config.sp and config.tp > 1 else 0.0
    if regions and t > 1:
        replicated = min(saved, input_bytes * sum(_REPLICATED_INPUTS.get(r.kind, 1.0)
                                                  for r in regions))
        replicated = max(replicated, sequence)  # the token-wise bytes are replicated ones
        saved -= h * (saved - replicated) * (1.0 - 1.0 / t)
    saved -= sequence * (1.0 - 1.0 / config.tp)
    memory_rate = spec.memory_bandwidth * eff.memory
    forward_memory = eff.memory_traffic * saved / memory_rate
    overhead = eff.op_s * block.ops  # per pass; the backward's autograd nodes go to B

    selective_bytes, selective_s = _selective(
        block, regions, sharded, t, getattr(config, "sp", False), saved_scale, scale)
    selective_bytes = min(saved, selective_bytes)
    selective_s *= seconds_per_flop
    selective_s += (eff.memory_traffic * selective_bytes / memory_rate
                    + eff.op_s * block.selective_ops)

    params = block.params * divided(g)
    weight_flops = 0.0
    if block.matmuls:
        tokens = graph.batch_size * graph.seq_len * scale
        weight_flops = min(block.backward_flops * scale * divided(f) / 2,
                           2.0 * tokens * params)
    backward_flops = block.backward_flops * scale * divided(f)
    grad_accumulate = 2 * params * dtype_bytes(dtype) / memory_rate
    weight_share = min(1.0, weight_flops / listed_flops) if listed_flops else 0.0

    fwd_comm = bwd_comm = regather = kept = 0.0
    for region, on in zip(regions, sharded):
        if not on:
            continue
        payload = region.comm_bytes * byte_scale
        if config.sp and region.kind in ("attention", "mlp"):
            # the entry all-gathers and the exit reduce-scatters, forward and backward (one
            # all-reduce's volume each way); the backward gathers the entry again for the
            # weight gradient, overlapped with it
            gather = collective_time(cluster, "all_gather", payload, t)
            both = gather + collective_time(cluster, "reduce_scatter", payload, t)
            fwd_comm += both
            bwd_comm += both
            kept += gather
            regather += gather
            continue
        fwd_comm += collective_time(cluster, region.forward_collective, payload, t)
        bwd_comm += collective_time(cluster, region.backward_collective, payload, t)

    # What the components miss in a whole block, and what the node's other devices
    # computing at once cost it (calibrated CPUs; 1 elsewhere).
    sharing = eff.node_sharing if config.devices > 1 and cluster.devices_per_node > 1 else 1.0
    fwd_scale, bwd_scale = eff.block_forward * sharing, eff.block_backward * sharing
    weight_s = bwd_scale * (weight_flops * seconds_per_flop + launches * (weight_flops > 0)
                            + grad_accumulate)
    regather = max(0.0, regather - weight_s)  # what the weight gradient does not hide
    return BlockCost(
        forward_s=fwd_scale * (forward_compute + launches + forward_memory + overhead)
        + fwd_comm,
        backward_input_s=bwd_scale * ((backward_flops - weight_flops) * seconds_per_flop
                                      + launches + 2 * forward_memory + overhead) + bwd_comm,
        backward_weight_s=weight_s + regather,
        saved_bytes=int(saved),
        input_bytes=int(input_bytes),
        output_bytes=int(block.output_bytes * byte_scale),
        params=int(params),
        tp_comm_s=fwd_comm + bwd_comm + regather,
        tp_forward_comm_s=fwd_comm,
        tp_backward_comm_s=bwd_comm,
        tp_backward_kept_s=kept,
        weight_grad_bytes=int(weight_share * operands * dtype_bytes(dtype)),
        param_tensors=len(block.param_names),
        selective_bytes=int(selective_bytes),
        selective_s=fwd_scale * selective_s,
        core_s=fwd_scale * core_time,
    )


def _selective(block: Block, regions: Sequence[TPRegion], sharded: Sequence[bool], t: int,
               sp: bool, byte_scale: float, scale: float) -> tuple[float, float]:
    """(bytes freed, FLOPs re-run) by selective recomputation of ``block``, on one device.
    Both divide by t when the selected nodes lie (most of them) inside a sharded region
    (the attention core: heads split), or, with sequence parallelism, when they run on a
    sequence shard between the regions; else they are replicated."""
    nodes = set(block.selective_nodes)
    if not nodes:
        return 0.0, 0.0
    inside = set()
    for region, on in zip(regions, sharded):
        if on:
            inside.update(region.nodes)
    split = t if t > 1 and (sp or 2 * len(nodes & inside) > len(nodes)) else 1
    return (block.selective_bytes * byte_scale / split,
            block.selective_flops * scale / split)


def _region_key(region: TPRegion) -> str:
    return region.name


def block_costs(graph: ProxyGraph, cluster: Cluster, config: ParallelConfig, *,
                dtype: str | None = None,
                tp_regions: Collection[str] | None = None) -> list[BlockCost]:
    """Cost of every block for one microbatch; blocks of equal signature are costed once.

    With ``config.tp_overlap`` = k > 1 each block with a sharded region runs as k parts
    of ``micro_batch_size / k`` (at micro-batch size 1: of ``seq_len / k`` tokens, the
    attention core whole) whose collectives overlap the next part's compute
    (:func:`~tripar.partitioner.cost.overlap.overlapped`).

    ``tp_regions`` names the regions (``block:kind:index``) sharded at ``config.tp``; default:
    every region proven at that degree. A region not proven at ``config.tp`` cannot be
    sharded (ConfigError); a block whose regions are all left out runs replicated.

    >>> from tripar.partitioner.hardware import Cluster
    >>> from tripar.plan.config import ParallelConfig
    >>> graph = example_graph(layers=4)
    >>> costs = block_costs(graph, Cluster.builtin("a100-80g"), ParallelConfig(1, 1, 1, 1, 1))
    >>> len(costs), costs[1] == costs[2], costs[1].forward_s > 0
    (6, True, True)
    >>> tp2 = ParallelConfig(1, 2, 1, 1, 1)
    >>> mlp_only = block_costs(graph, Cluster.builtin("a100-80g"), tp2,
    ...                        tp_regions=[f"blocks.{i}:mlp:0" for i in range(4)])
    >>> full = block_costs(graph, Cluster.builtin("a100-80g"), tp2)
    >>> full[1].params < mlp_only[1].params < costs[1].params
    True
    """
    dtype = canonical_dtype(dtype or cluster.device.default_dtype)
    regions = _regions_by_block(graph, config.tp)
    chosen: set[str] | None = None
    if tp_regions is not None:
        chosen = {r if isinstance(r, str) else _region_key(r) for r in tp_regions}
        proven = set(shardable_regions(graph, config.tp))
        stray = sorted(chosen - proven)
        if stray:
            raise ConfigError(
                f"cannot shard {', '.join(stray[:4])} at tp={config.tp}: "
                f"{'tp=1 shards nothing' if config.tp == 1 else 'not proven at that degree'}"
                f"; choose among the {len(proven)} regions proven at tp={config.tp}")
        owner_of_loss = {r.loss: _region_key(r) for r in graph.tp_regions if r.loss}
        loss_owner = {}
        for block in graph.blocks:
            for node in block.nodes:
                if node in owner_of_loss:
                    loss_owner[block.name] = owner_of_loss[node]
    part = None   # one of the tp_overlap parts a block's microbatch runs as
    part_scale = None  # its share of the profiled tokens, when it splits the sequence
    if config.splits_sequence:
        part = replace(config, tp_overlap=1)
        part_scale = 1 / (config.tp_overlap * graph.batch_size)
    elif config.tp_overlap > 1:
        part = replace(config, micro_batch_size=config.micro_batch_size // config.tp_overlap,
                       tp_overlap=1)
    cache: dict[tuple, BlockCost] = {}
    costs = []
    for block in graph.blocks:
        mine = regions.get(block.name, [])
        if chosen is None:
            on = tuple(config.tp in r.degrees for r in mine)
        else:
            on = tuple((loss_owner.get(block.name, "") in chosen) if r.kind == "loss"
                       else _region_key(r) in chosen for r in mine)
        if not any(on):
            mine, on = [], ()
        key = (block.signature, tuple((r.kind, r.forward_collective, r.backward_collective,
                                       r.comm_bytes, len(r.column), len(r.row), x)
                                      for r, x in zip(mine, on)))
        if key not in cache:
            cache[key] = _block_cost(block, mine, on, graph, cluster, config, dtype)
            if part is not None and any(on):
                cache[key] = overlapped(
                    cache[key],
                    _block_cost(block, mine, on, graph, cluster, part, dtype, part_scale),
                    config.tp_overlap, joined=config.splits_sequence)
        costs.append(cache[key])
    return costs
