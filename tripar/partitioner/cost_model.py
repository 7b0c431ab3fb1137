"""Time and memory of pipeline stages, from the proxy graph and the cluster.

Conventions (all per device, per microbatch unless said otherwise):

* **Batch.** The graph is annotated for ``graph.batch_size`` samples; FLOPs
  and activation bytes scale linearly to the microbatch size ``b``
  (factor ``b / graph.batch_size``), and so does the token dimension ``m``
  of each matrix product (which moves its efficiency).
* **Dtype.** The graph is usually annotated in fp32 on the meta device. The
  training dtype (``dtype``; by default the device's: bf16 on GPUs, fp32
  on CPUs) sets the peak FLOP/s used and the bytes: every activation byte of
  the graph is multiplied by ``bytes(train dtype) / bytes(graph dtype)``
  (bf16 from an fp32 graph: x 1/2). Parameters are counted, not read from
  the graph's bytes.
* **Compute.** Each forward product (m, k, n) runs at
  ``peak x Efficiency.matmul(m, k, n)``; FLOPs the block has beyond its listed
  products (attention kernels) run at the efficiency of its products
  (weighted by FLOPs), plus ``launch_s`` per product and pass. Non-matmul kernels are
  memory-bound: a forward moves ``memory_traffic x saved bytes`` at ``memory x
  bandwidth``, the backward twice that. Every tensor operator (``Block.ops``) also
  pays ``op_s`` in the forward and again in the backward (B): dispatch, autograd and
  Python, which a CPU process runs on its critical path (0 on GPUs). A calibrated CPU
  profile scales a block's forward by ``block_forward`` and its backward by
  ``block_backward`` (whole blocks timed against this sum; 1 elsewhere; collectives are
  not scaled), and, when the plan has more than one device, by ``node_sharing`` (the
  node's processes share its caches and memory bandwidth). The backward FLOPs split
  into the weight gradient
  ``W = min(backward / 2, 2 x tokens x params)`` (a linear's dW = 2 m k n)
  and the input gradient ``B = backward - W``; the memory-bound part and the
  tensor-parallel backward collectives go to B, gradient accumulation
  (read + write the gradient) to W.
* **Tensor parallelism.** A block with a region proven at degree t runs
  its FLOPs / t and pays the regions' collectives (ring, inside a node
  when t <= devices per node). Its parameters are divided by t. Its saved
  bytes follow Korthikanti et al.'s structure ``sbh(10 + 24/t + 5as/(ht))``:
  per attention or MLP region 2.5 block inputs stay replicated (norm input,
  region input, dropout mask), per embedding / LM-head region one; the rest
  is divided by t.
* **Pipeline.** ``send_s`` is latency + bytes / bandwidth of the stage's
  output (inter-node when the next stage sits on another node); with t > 1
  each tensor-parallel rank sends its 1/t slice (Megatron's scatter/gather)
  and the slices are all-gathered inside the node.
* **Data parallelism.** Gradients are all-reduced in buckets while the last
  microbatch's backward runs; what does not fit in that backward (at least
  the last bucket) is exposed and goes to ``tail_s`` with the optimizer step
  (memory-bound, ``optimizer_bytes`` read + written per parameter: 28 for a fused Adam;
  plus ``optimizer_tensor_s`` per parameter tensor, a per-tensor loop's calls). ZeRO-1
  reduce-scatters instead and all-gathers the updated parameters after the
  step, and divides the optimizer state by dp.
* **Memory.** Static: weights + gradients + Adam state, 16 bytes per
  parameter in both fp32 and mixed precision (bf16 weights and gradients,
  fp32 master, momentum, variance), the optimizer part (12 or 8 bytes)
  divided by dp under ZeRO-1; plus communication buffers (one gradient
  bucket, p2p send/receive buffers, the largest TP collective). Activations
  per microbatch: the saved bytes; the simulator multiplies them by the
  microbatches in flight.
* **Recompute fraction r** (per stage, 0..1, for schedules without explicit
  R actions): the stage keeps ``r x block inputs + (1 - r) x saved bytes``
  per microbatch and its backward (B) re-runs ``r x`` its forward.
  Schedules with explicit ``f``/``R`` actions instead get the full forward
  as ``recompute_s``, the full saved bytes as ``activation_bytes`` (held
  from R to B: an overestimate, as Megatron re-materialises one layer at a
  time) and every block's input as ``input_bytes`` (held from f to R).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from tripar.errors import ConfigError
from tripar.graph.proxy import Block, ProxyGraph, TPRegion
from tripar.partitioner.collectives import (
    all_gather_time,
    all_reduce_time,
    collective_time,
    p2p_time,
    reduce_scatter_time,
)
from tripar.partitioner.hardware import Cluster, canonical_dtype, dtype_bytes
from tripar.partitioner.stage_cost import StageCost
from tripar.plan.config import ParallelConfig

BUCKET_BYTES = 25 * 2**20
"""Gradient bucket size (PyTorch DDP's default 25 MiB)."""
ADAM_STEP_BYTES = 28
"""Bytes a fused Adam step reads and writes per parameter (gradient, master, moments,
weight); ``Efficiency.optimizer_bytes`` defaults to it."""
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
    """Tensor-parallel collective time included in forward_s and backward_input_s."""
    weight_grad_bytes: int = 0
    """Bytes a split backward (B) leaves for its W: the weight products' inputs and
    output gradients."""
    param_tensors: int = 0
    """Parameter tensors the block owns (what a per-tensor optimizer loops over)."""


def bytes_per_param(dtype: str, zero: int, dp: int) -> tuple[float, float]:
    """(weights + gradients, optimizer state) bytes per parameter for Adam.

    >>> bytes_per_param("bf16", 0, 8), bytes_per_param("bf16", 1, 8)
    ((4.0, 12.0), (4.0, 1.5))
    """
    width = dtype_bytes(dtype)
    model = 2.0 * width
    optimizer = 16.0 - model  # fp32 master copy (mixed precision only) + two fp32 moments
    if zero:
        optimizer /= dp
    return model, optimizer


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


def _block_cost(block: Block, regions: list[TPRegion], sharded: Sequence[bool],
                graph: ProxyGraph, cluster: Cluster, config: ParallelConfig,
                dtype: str) -> BlockCost:
    """``regions`` are the block's regions proven at ``config.tp``; ``sharded`` says which of
    them are sharded. A sharded region divides its products, its share of the block's
    other FLOPs, weights and non-replicated activations by t and adds its collectives."""
    spec = cluster.device
    eff = spec.efficiency
    peak = spec.peak(dtype)
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
    operands = 0.0  # elements of (input, output gradient) pairs of the products
    for (m, k, n), split in zip(block.matmuls, on_products):
        d = t if split else 1
        m_mb = max(1.0, m * scale / (d if m > tokens_annotated else 1))  # heads split
        k_t, n_t = (k, n) if m > tokens_annotated else (k, n / d) if n >= k else (k / d, n)
        flops = 2.0 * m_mb * k_t * n_t
        listed_flops += flops
        listed_time += flops / (peak * eff.matmul(m_mb, k_t, n_t))
        operands += m_mb * (k_t + n_t)
    mean_rate = listed_flops / listed_time if listed_time else peak * eff.matmul_max
    forward_compute = listed_time + max(0.0, forward_flops - listed_flops) / mean_rate
    seconds_per_flop = forward_compute / forward_flops if forward_flops else 1.0 / mean_rate
    launches = eff.launch_s * len(block.matmuls)  # per pass; the backward has two per product

    # Bytes, converted to the training dtype and sharded per Korthikanti's structure.
    input_bytes = block.input_bytes * byte_scale
    saved = block.saved_bytes * byte_scale
    if regions and t > 1:
        replicated = min(saved, input_bytes * sum(_REPLICATED_INPUTS.get(r.kind, 1.0)
                                                  for r in regions))
        saved -= h * (saved - replicated) * (1.0 - 1.0 / t)
    memory_rate = spec.memory_bandwidth * eff.memory
    forward_memory = eff.memory_traffic * saved / memory_rate
    overhead = eff.op_s * block.ops  # per pass; the backward's autograd nodes go to B

    params = block.params * divided(g)
    weight_flops = 0.0
    if block.matmuls:
        tokens = graph.batch_size * graph.seq_len * scale
        weight_flops = min(block.backward_flops * scale * divided(f) / 2,
                           2.0 * tokens * params)
    backward_flops = block.backward_flops * scale * divided(f)
    grad_accumulate = 2 * params * dtype_bytes(dtype) / memory_rate
    weight_share = min(1.0, weight_flops / listed_flops) if listed_flops else 0.0

    fwd_comm = bwd_comm = 0.0
    for region, on in zip(regions, sharded):
        if not on:
            continue
        payload = region.comm_bytes * byte_scale
        fwd_comm += collective_time(cluster, region.forward_collective, payload, t)
        bwd_comm += collective_time(cluster, region.backward_collective, payload, t)

    # What the components miss in a whole block, and what the node's other devices
    # computing at once cost it (calibrated CPUs; 1 elsewhere).
    sharing = eff.node_sharing if config.devices > 1 and cluster.devices_per_node > 1 else 1.0
    fwd_scale, bwd_scale = eff.block_forward * sharing, eff.block_backward * sharing
    return BlockCost(
        forward_s=fwd_scale * (forward_compute + launches + forward_memory + overhead)
        + fwd_comm,
        backward_input_s=bwd_scale * ((backward_flops - weight_flops) * seconds_per_flop
                                      + launches + 2 * forward_memory + overhead) + bwd_comm,
        backward_weight_s=bwd_scale * (weight_flops * seconds_per_flop
                                       + launches * (weight_flops > 0) + grad_accumulate),
        saved_bytes=int(saved),
        input_bytes=int(input_bytes),
        output_bytes=int(block.output_bytes * byte_scale),
        params=int(params),
        tp_comm_s=fwd_comm + bwd_comm,
        weight_grad_bytes=int(weight_share * operands * dtype_bytes(dtype)),
        param_tensors=len(block.param_names),
    )


def _region_key(region: TPRegion) -> str:
    return region.name


def block_costs(graph: ProxyGraph, cluster: Cluster, config: ParallelConfig, *,
                dtype: str | None = None,
                tp_regions: Collection[str] | None = None) -> list[BlockCost]:
    """Cost of every block for one microbatch; blocks of equal signature are costed once.

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
        costs.append(cache[key])
    return costs


def uniform_boundaries(graph: ProxyGraph, stages: int) -> tuple[int, ...]:
    """First block of each stage, splitting the layers evenly: blocks before the
    first layer (embedding) join the first stage, blocks after the last (head,
    loss) join the last.

    >>> uniform_boundaries(example_graph(layers=4), 2)
    (0, 3)
    """
    layers = [i for i, b in enumerate(graph.blocks) if b.kind == "layer"]
    if stages < 1:
        raise ConfigError(f"need at least one stage, got {stages}")
    if not layers:
        layers = list(range(len(graph.blocks)))
    if stages > len(layers):
        raise ConfigError(
            f"cannot split {len(layers)} layers into {stages} pipeline stages; use pp*vpp <= "
            f"{len(layers)}")
    base, extra = divmod(len(layers), stages)
    firsts = [0]
    position = 0
    for stage in range(stages - 1):
        position += base + (1 if stage < extra else 0)
        firsts.append(layers[position])
    return tuple(firsts)


def _check_boundaries(boundaries: Sequence[int], blocks: int, stages: int) -> tuple[int, ...]:
    """Stage offsets ``(first_0, ..., first_{k-1}, blocks)`` from the first block of each
    stage (as ``partition.py`` writes them); a trailing ``blocks`` is accepted too."""
    bounds = tuple(int(b) for b in boundaries)
    if len(bounds) == stages + 1 and bounds[-1] == blocks:
        bounds = bounds[:-1]
    if (len(bounds) != stages or bounds[0] != 0 or bounds[-1] >= blocks
            or any(a >= b for a, b in zip(bounds, bounds[1:]))):
        raise ConfigError(
            f"stage boundaries {list(bounds)} must be the first block of each of the "
            f"pp*vpp = {stages} stages: start at 0, increase strictly, stay below {blocks}")
    return (*bounds, blocks)


def _rank_of_stage(stage: int, config: ParallelConfig) -> int:
    """First global rank of the pipeline rank running virtual stage ``stage``
    (mesh (pp, dp, tp), tp innermost; virtual stage j on pipeline rank j % pp)."""
    return (stage % config.pp) * config.dp * config.tp


def stage_costs(graph: ProxyGraph, cluster: Cluster, config: ParallelConfig,
                boundaries: Sequence[int] | None = None, *,
                recompute: str | float | Sequence[float] | None = None,
                explicit_recompute: bool = False,
                dtype: str | None = None,
                tp_regions: Collection[str] | None = None) -> list[StageCost]:
    """One StageCost per (virtual) stage, in model order.

    ``boundaries`` are the first block of each of the ``pp * vpp`` stages
    (default: uniform by layers). ``recompute`` is ``"none"``, ``"full"``, one fraction for all
    stages or one per stage (default: ``config.recompute``; ``stage-aware``
    needs explicit fractions here, :func:`step_estimate` derives them).
    ``explicit_recompute`` says the schedule has its own ``f``/``R`` actions.
    ``tp_regions``: the regions sharded at ``config.tp`` (default: all proven ones; see
    :func:`block_costs`).

    >>> from tripar.partitioner.hardware import Cluster
    >>> from tripar.plan.config import ParallelConfig
    >>> cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=4)
    >>> none, full = (stage_costs(example_graph(), Cluster.builtin("a100-80g"), cfg, recompute=r)
    ...               for r in ("none", "full"))
    >>> full[0].activation_bytes < none[0].activation_bytes
    True
    >>> full[0].backward_input_s > none[0].backward_input_s
    True
    """
    dtype = canonical_dtype(dtype or cluster.device.default_dtype)
    stages = config.pp * config.vpp
    if config.devices > cluster.devices:
        raise ConfigError(
            f"dp*tp*pp = {config.dp}*{config.tp}*{config.pp} = {config.devices} devices, but "
            f"the cluster has {cluster.devices}; change the degrees or the cluster")
    bounds = _check_boundaries(boundaries if boundaries is not None
                               else uniform_boundaries(graph, stages), len(graph.blocks), stages)
    fractions = _recompute_fractions(recompute if recompute is not None else config.recompute,
                                     stages)
    costs = block_costs(graph, cluster, config, dtype=dtype, tp_regions=tp_regions)
    model_bytes, optimizer_bytes = bytes_per_param(dtype, config.zero, config.dp)
    eff = cluster.device.efficiency
    memory_rate = cluster.device.memory_bandwidth * eff.memory
    sharded = set(shardable_regions(graph, config.tp) if tp_regions is None else
                  (r if isinstance(r, str) else _region_key(r) for r in tp_regions))
    tp_buffer = max((r.comm_bytes for r in graph.tp_regions if _region_key(r) in sharded
                     and config.tp in r.degrees),
                    default=0) * config.micro_batch_size / graph.batch_size \
        * dtype_bytes(dtype) / dtype_bytes(graph.dtype)

    result = []
    for stage in range(stages):
        mine = costs[bounds[stage]:bounds[stage + 1]]
        forward = sum(c.forward_s for c in mine)
        backward_input = sum(c.backward_input_s for c in mine)
        backward_weight = sum(c.backward_weight_s for c in mine)
        saved = sum(c.saved_bytes for c in mine)
        inputs = sum(c.input_bytes for c in mine)
        weight_grad = sum(c.weight_grad_bytes for c in mine)
        params = sum(c.params for c in mine)
        stage_input = mine[0].input_bytes if stage > 0 else 0
        output = mine[-1].output_bytes if stage < stages - 1 else 0

        # p2p to the next stage.
        send = 0.0
        if output:
            here = _rank_of_stage(stage, config) // cluster.devices_per_node
            there = _rank_of_stage(stage + 1, config) // cluster.devices_per_node
            crosses = here != there
            send = p2p_time(cluster, output / config.tp, crosses)
            if config.tp > 1:
                send += all_gather_time(cluster, output, config.tp)

        # Data-parallel gradient reduction, overlapped with the last backward.
        grad_bytes = params * dtype_bytes(dtype)
        tail = 0.0
        if config.dp > 1 and grad_bytes:
            reduce = reduce_scatter_time if config.zero else all_reduce_time
            total = reduce(cluster, grad_bytes, config.dp, config.tp)
            last = reduce(cluster, min(grad_bytes, BUCKET_BYTES), config.dp, config.tp)
            tail = max(last, total - (backward_input + backward_weight))
            if config.zero:
                tail += all_gather_time(cluster, grad_bytes, config.dp, config.tp)
        optimizer_params = params / config.dp if config.zero else params
        tensors = (math.ceil(grad_bytes / BUCKET_BYTES) if config.zero  # flat shards
                   else sum(c.param_tensors for c in mine))
        tail += (optimizer_params * eff.optimizer_bytes / memory_rate
                 + tensors * eff.optimizer_tensor_s)

        r = fractions[stage]
        if explicit_recompute:  # f keeps every block's input (Megatron's full recompute)
            activation, held, extra, recompute_s = saved, inputs, 0.0, forward
        else:
            activation = r * inputs + (1 - r) * saved
            held, extra, recompute_s = stage_input, r * forward, 0.0
        buffers = min(grad_bytes, BUCKET_BYTES) * (config.dp > 1) + 2 * (stage_input + output) \
            + tp_buffer * (config.tp > 1)
        static = params * (model_bytes + optimizer_bytes) + buffers
        result.append(StageCost(
            forward_s=forward, backward_input_s=backward_input + extra,
            backward_weight_s=backward_weight, recompute_s=recompute_s, send_s=send,
            activation_bytes=int(activation), input_bytes=int(held), static_bytes=int(static),
            tail_s=tail, weight_grad_bytes=int(min(weight_grad, activation))))
    return result


def _recompute_fractions(recompute: str | float | Sequence[float], stages: int) -> list[float]:
    if isinstance(recompute, str):
        if recompute == "none":
            return [0.0] * stages
        if recompute == "full":
            return [1.0] * stages
        raise ConfigError(f"recompute {recompute!r} needs per-stage fractions here; pass "
                          "recompute=[r0, r1, ...] or use step_estimate, which derives them")
    if isinstance(recompute, (int, float)):
        values = [float(recompute)] * stages
    else:
        values = [float(r) for r in recompute]
    if len(values) != stages or any(not 0.0 <= r <= 1.0 for r in values):
        raise ConfigError(f"recompute fractions {values} must be {stages} numbers in [0, 1], "
                          "one per (virtual) stage")
    return values


def example_graph(layers: int = 2, hidden: int = 256, seq: int = 128, vocab: int = 1000,
                  heads: int = 4) -> ProxyGraph:
    """A hand-built GPT-like proxy graph (fp32, batch 1) for examples and tests.

    FLOPs and bytes follow Megatron's and Korthikanti's formulas; the real
    graphs come from ``tripar.graph.build.analyze``.

    >>> [b.kind for b in example_graph(layers=2).blocks]
    ['embedding', 'layer', 'layer', 'head']
    """
    import networkx as nx

    s, h, v = seq, hidden, vocab
    act = 4 * s * h
    layer_mm = ((s, h, 3 * h), (s, h, h), (s, h, 4 * h), (s, 4 * h, h))
    attn_flops = 4 * s * s * h
    layer_fwd = sum(2 * m * k * n for m, k, n in layer_mm) + attn_flops
    blocks = [Block("embedding", 0, "embedding", ("wte",), v * h + s * h, 4 * (v * h + s * h),
                    0, 0, 8 * s, 8 * s, act, "emb", (), ("wte.weight", "wpe.weight"))]
    for i in range(layers):
        blocks.append(Block(
            f"blocks.{i}", i + 1, "layer", (f"blocks_{i}",), 12 * h * h + 13 * h,
            4 * (12 * h * h + 13 * h), layer_fwd, 2 * layer_fwd,
            2 * (34 * s * h + 5 * heads * s * s), act, act, "layer", layer_mm))
    head_fwd = 2 * s * h * v
    blocks.append(Block("head", layers + 1, "head", ("lm_head",), 2 * h, 8 * h, head_fwd,
                        2 * head_fwd, act + 4 * s * v, act, 4, "head", ((s, h, v),)))
    graph = nx.DiGraph()
    for a, b in zip(blocks, blocks[1:]):
        graph.add_edge(a.name, b.name, bytes=a.output_bytes, tensors=())
    regions = []
    for i in range(layers):
        for kind in ("attention", "mlp"):
            names = ("qkv", "proj") if kind == "attention" else ("fc", "fc2")
            regions.append(TPRegion(kind, f"blocks.{i}", (), (), "all_reduce", "all_reduce",
                                    act, (2, 4, 8) if heads % 8 == 0 else (2, 4), heads=heads,
                                    column=(f"blocks_{i}_{names[0]}",),
                                    row=(f"blocks_{i}_{names[1]}",)))
    return ProxyGraph(blocks=blocks, cuts=[], graph=graph, tracer="fx", tracer_reason="example",
                      batch_size=1, seq_len=s, dtype="torch.float32", tp_regions=regions,
                      model_config={"layers": layers, "hidden": h, "heads": heads,
                                    "vocab": v, "seq": s})


@dataclass(frozen=True, slots=True)
class StepEstimate:
    """One simulated training step of a fully given configuration."""

    step_time_s: float
    tokens_per_s: float
    samples_per_s: float
    peak_memory_bytes: int
    """The largest per-rank peak (static + activations of every in-flight microbatch)."""
    memory_limit_bytes: int
    bubble_fraction: float
    stage_time_s: tuple[float, ...]
    """Per (virtual) stage: F + B + W (+ R) of one microbatch."""
    stage_memory_bytes: tuple[int, ...]
    """Per (virtual) stage: simulated peak bytes."""
    rank_busy_s: tuple[float, ...]
    rank_memory_bytes: tuple[int, ...]
    recompute: tuple[float, ...]
    """Recomputed share of each stage (1.0 for the stages an ``f``/``R`` schedule recomputes)."""
    boundaries: tuple[int, ...]
    stage_costs: tuple[StageCost, ...]
    sim: object
    """The simulator's ``SimResult`` (timeline, per-rank detail)."""

    @property
    def fits(self) -> bool:
        return self.peak_memory_bytes <= self.memory_limit_bytes


def step_estimate(graph: ProxyGraph, cluster: Cluster, config: ParallelConfig,
                  boundaries: Sequence[int] | None = None, *,
                  recompute: str | float | Sequence[float] | None = None,
                  dtype: str | None = None, record_timeline: bool = True,
                  tp_regions: Collection[str] | None = None) -> StepEstimate:
    """Cost the stages, build ``config.schedule`` and simulate one step.

    ``recompute`` (default ``config.recompute``): ``"none"``; ``"full"``
    (the schedule gets ``f``/``R`` actions); ``"stage-aware"`` (scp: Merak's
    rule in the schedule; other schedules: each stage recomputes the smallest
    share of its layers that fits the device memory with the microbatches the
    schedule keeps in flight there); or fractions per stage.
    ``tp_regions``: the regions sharded at ``config.tp`` (default: every proven one).

    >>> from tripar.partitioner.hardware import Cluster
    >>> from tripar.plan.config import ParallelConfig
    >>> cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=4)
    >>> est = step_estimate(example_graph(layers=4), Cluster.builtin("a100-80g"), cfg)
    >>> est.bubble_fraction > 0, est.tokens_per_s > 0, len(est.stage_time_s)
    (True, True, 2)
    """
    from tripar.partitioner.schedules import build_schedule
    from tripar.partitioner.simulator import simulate

    stages = config.pp * config.vpp
    policy = recompute if recompute is not None else config.recompute
    bounds = tuple(boundaries) if boundaries is not None else uniform_boundaries(graph, stages)
    limit = cluster.device.memory_bytes

    def schedule_for(flags):
        return build_schedule(config.schedule, config.pp, config.num_microbatches,
                              vpp=config.vpp, recompute=flags)

    if isinstance(policy, str) and (policy == "full"
                                    or (policy == "stage-aware" and config.schedule == "scp")):
        schedule = schedule_for(policy)
        costs = stage_costs(graph, cluster, config, bounds, recompute="none",
                            explicit_recompute=True, dtype=dtype,
                            tp_regions=tp_regions)
        recomputed = {a.stage for acts in schedule.actions for a in acts
                      if a.kind.value == "R"}
        fractions = [1.0 if s in recomputed else 0.0 for s in range(stages)]
    else:
        schedule = schedule_for("none")
        if policy == "stage-aware":
            keep = stage_costs(graph, cluster, config, bounds, recompute="none", dtype=dtype,
                                tp_regions=tp_regions)
            drop = stage_costs(graph, cluster, config, bounds, recompute="full", dtype=dtype,
                                tp_regions=tp_regions)
            probe = simulate(schedule, keep, record_timeline=False)
            fractions = _fitting_fractions(keep, drop, probe.stage_peak_inflight, config.pp,
                                           limit)
        else:
            fractions = _recompute_fractions(policy, stages)
        costs = stage_costs(graph, cluster, config, bounds, recompute=fractions, dtype=dtype,
                            tp_regions=tp_regions)
    result = simulate(schedule, costs, record_timeline=record_timeline)
    samples = config.global_batch_size
    return StepEstimate(
        step_time_s=result.step_time_s,
        tokens_per_s=samples * graph.seq_len / result.step_time_s,
        samples_per_s=samples / result.step_time_s,
        peak_memory_bytes=int(result.peak_memory),
        memory_limit_bytes=int(limit),
        bubble_fraction=result.bubble_fraction,
        stage_time_s=tuple(c.forward_s + c.backward_input_s + c.backward_weight_s + c.recompute_s
                           for c in costs),
        stage_memory_bytes=tuple(result.stage_peak_memory_bytes),
        rank_busy_s=tuple(result.busy_s),
        rank_memory_bytes=tuple(result.peak_memory_bytes),
        recompute=tuple(fractions),
        boundaries=bounds,
        stage_costs=tuple(costs),
        sim=result,
    )


def _fitting_fractions(keep: Sequence[StageCost], drop: Sequence[StageCost],
                       inflight: Sequence[int], pp: int, limit: int) -> list[float]:
    """Per stage, the smallest recomputed share r (one per rank, shared by its virtual
    stages) with ``static + sum_stages n (r in + (1 - r) saved) <= limit``; ``keep`` and
    ``drop`` are the stage costs with r = 0 and r = 1. 1.0 when even full recomputation
    does not fit (the estimate then reports the overflow)."""
    shares = []
    for rank in range(pp):
        mine = range(rank, len(keep), pp)
        need = sum(keep[s].static_bytes + inflight[s] * keep[s].activation_bytes for s in mine)
        saving = sum(inflight[s] * (keep[s].activation_bytes - drop[s].activation_bytes)
                     for s in mine)
        if need <= limit:
            shares.append(0.0)
        else:
            shares.append(1.0 if saving <= 0 else min(1.0, (need - limit) / saving))
    return [shares[s % pp] for s in range(len(keep))]
