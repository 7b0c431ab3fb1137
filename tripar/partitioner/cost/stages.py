"""Stage costs: the blocks of each (virtual) stage summed, with p2p, data-parallel
reduction, optimizer step, static memory and recomputation (conventions in
:mod:`tripar.partitioner.cost`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from tripar.errors import ConfigError
from tripar.graph.proxy import ProxyGraph
from tripar.partitioner.cost.blocks import block_costs, shardable_regions
from tripar.partitioner.cost.collectives import (
    all_gather_time,
    all_reduce_time,
    p2p_time,
    reduce_scatter_time,
)
from tripar.partitioner.hardware import Cluster, canonical_dtype, dtype_bytes
from tripar.partitioner.stage_cost import StageCost
from tripar.plan.config import ParallelConfig

BUCKET_BYTES = 25 * 2**20
"""Gradient bucket size (PyTorch DDP's default 25 MiB)."""


def bytes_per_param(dtype: str, zero: int, dp: int) -> tuple[float, float]:
    """(weights + gradients, optimizer state) bytes per parameter for Adam, as Megatron's
    distributed optimizer counts them: ZeRO-1 divides the optimizer state (fp32 master
    copy under mixed precision, two fp32 moments) over the ``dp`` shards, ZeRO-2 the
    gradients too.

    >>> [bytes_per_param("bf16", zero, 8) for zero in (0, 1, 2)]
    [(4.0, 12.0), (4.0, 1.5), (2.25, 1.5)]
    """
    width = dtype_bytes(dtype)
    grads = float(width)
    optimizer = 16.0 - 2.0 * width  # fp32 master copy (mixed precision only) + two fp32 moments
    if zero >= 1:
        optimizer /= dp
    if zero >= 2:
        grads /= dp
    return width + grads, optimizer


def zero_copy_time(cluster: Cluster, param_bytes: float) -> float:
    """Seconds ZeRO spends beyond plain data parallelism copying ``param_bytes`` of a
    stage's parameters: the all-gathered flat buckets read and written into the parameters
    after the step (plain dp's reduced gradients are views of its buckets: no copy).

    >>> from tripar.partitioner.hardware import Cluster
    >>> a100 = Cluster.builtin("a100-80g")
    >>> round(zero_copy_time(a100, 2e9) * 1e3, 2)  # 2 GB of weights: 4 GB moved
    2.45
    """
    return 2 * param_bytes / (cluster.device.memory_bandwidth * cluster.device.efficiency.memory)


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
    stage (as the stage partition writes them); a trailing ``blocks`` is accepted too."""
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


def mirror_stride(cluster: Cluster, config: ParallelConfig, stage: int) -> int:
    """Under chimera, the stride of the two holders of ``stage`` (pipeline ranks s and
    pp - 1 - s) as the collective models read it: 1 inside a node, a node's devices apart
    when they sit on two nodes."""
    here = _rank_of_stage(stage, config) // cluster.devices_per_node
    there = _rank_of_stage(config.pp - 1 - stage, config) // cluster.devices_per_node
    return 1 if here == there else cluster.devices_per_node


def stage_costs(graph: ProxyGraph, cluster: Cluster, config: ParallelConfig,
                boundaries: Sequence[int] | None = None, *,
                recompute: str | float | Sequence[float] | None = None,
                explicit_recompute: bool = False,
                selective: bool | Sequence[bool] = False,
                dtype: str | None = None,
                tp_regions: Collection[str] | None = None) -> list[StageCost]:
    """One StageCost per (virtual) stage, in model order.

    ``boundaries`` are the first block of each of the ``pp * vpp`` stages
    (default: uniform by layers). ``recompute`` is ``"none"``, ``"full"``, one fraction for all
    stages or one per stage (default: ``config.recompute``; ``stage-aware``
    needs explicit fractions here, :func:`step_estimate` derives them).
    ``explicit_recompute`` says the schedule has its own ``f``/``R`` actions.
    ``tp_regions``: the regions sharded at ``config.tp`` (default: all proven ones; see
    :func:`block_costs`). ``selective`` (one flag, or one per stage): the stage's blocks
    recompute their selective segments (``BlockCost.selective_bytes`` less held, their
    ``selective_s`` added to B); a block a fraction recomputes whole re-runs its forward
    instead. Stages an ``f``/``R`` schedule recomputes whole ignore it.

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
    policy = recompute if recompute is not None else config.recompute
    if isinstance(selective, bool):
        selective = [selective or policy == "selective"] * stages
    if policy == "selective":
        policy = "none"
    fractions = recompute_fractions(policy, stages)
    if len(selective) != stages:
        raise ConfigError(f"selective has {len(selective)} flags for {stages} stages")
    costs = block_costs(graph, cluster, config, dtype=dtype, tp_regions=tp_regions)
    # chimera holds each stage twice: the two replicas' gradients are summed in the same
    # reduction as the dp replicas' (one group of dp * 2 ranks), over which ZeRO shards
    copies = config.dp * config.pipelines
    model_bytes, optimizer_bytes = bytes_per_param(dtype, config.zero, copies)
    eff = cluster.device.efficiency
    memory_rate = cluster.device.memory_bandwidth * eff.memory
    sharded = set(shardable_regions(graph, config.tp) if tp_regions is None else
                  (r if isinstance(r, str) else r.name for r in tp_regions))
    tp_buffer = max((r.comm_bytes for r in graph.tp_regions if r.name in sharded
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
        chosen = 0.0  # selective recomputation's time
        if selective[stage] and not explicit_recompute:
            saved -= sum(c.selective_bytes for c in mine)
            chosen = sum(c.selective_s for c in mine)
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
        if copies > 1 and grad_bytes:
            reduce = reduce_scatter_time if config.zero else all_reduce_time
            total = reduce(cluster, grad_bytes, config.dp, config.tp)
            last = reduce(cluster, min(grad_bytes, BUCKET_BYTES), config.dp, config.tp)
            if config.pipelines == 2:  # and between the stage's two holders
                apart = mirror_stride(cluster, config, stage)
                total += all_reduce_time(cluster, grad_bytes / (config.dp if config.zero
                                                                else 1), 2, apart)
                last += all_reduce_time(cluster, min(grad_bytes, BUCKET_BYTES), 2, apart)
            tail = max(last, total - (backward_input + backward_weight))
            if config.zero:  # the updated shards all-gathered, copied into the parameters
                tail += (all_gather_time(cluster, grad_bytes, copies, config.tp)
                         + zero_copy_time(cluster, grad_bytes))
        optimizer_params = params / copies if config.zero else params
        tensors = (math.ceil(grad_bytes / BUCKET_BYTES) if config.zero  # flat shards
                   else sum(c.param_tensors for c in mine))
        tail += (optimizer_params * eff.optimizer_bytes / memory_rate
                 + tensors * eff.optimizer_tensor_s)

        r = fractions[stage]
        if explicit_recompute:  # f keeps every block's input (Megatron's full recompute)
            activation, held, extra, recompute_s = saved, inputs, 0.0, forward
        else:
            activation = r * inputs + (1 - r) * saved
            held, recompute_s = stage_input, 0.0
            extra = r * forward + (1 - r) * chosen
        buffers = min(grad_bytes, BUCKET_BYTES) * (copies > 1) + 2 * (stage_input + output) \
            + tp_buffer * (config.tp > 1)
        static = params * (model_bytes + optimizer_bytes) + buffers
        result.append(StageCost(
            forward_s=forward, backward_input_s=backward_input + extra,
            backward_weight_s=backward_weight, recompute_s=recompute_s, send_s=send,
            activation_bytes=int(activation), input_bytes=int(held), static_bytes=int(static),
            tail_s=tail, weight_grad_bytes=int(min(weight_grad, activation))))
    return result


def recompute_fractions(recompute: str | float | Sequence[float], stages: int) -> list[float]:
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


def optimizer_s_per_param(cluster: Cluster) -> float:
    """Seconds the optimizer step takes per parameter, as :func:`stage_costs` charges it:
    the cluster's ``Efficiency.optimizer_bytes`` moved at its achieved memory bandwidth
    (the per-tensor launch cost ``optimizer_tensor_s`` left out).

    >>> from tripar.partitioner.hardware import Cluster
    >>> a100 = Cluster.builtin("a100-80g")
    >>> round(optimizer_s_per_param(a100) * 1e12, 2)  # 28 bytes at 0.8 x 2.039 TB/s
    17.17
    """
    device = cluster.device
    eff = device.efficiency
    return eff.optimizer_bytes / (device.memory_bandwidth * eff.memory)
