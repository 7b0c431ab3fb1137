"""The search's candidates: enumeration, and the estimates that order and prune them.

:class:`SearchSpace` lists every configuration the pins allow (``configs``) and, before
any is costed, estimates them: a quick screening estimate that orders them (``screen``),
a lower bound on the step time that prunes them (``lower_bound``; its derivation is in
the docstring of :mod:`tripar.partitioner.plan_search`) and the static-memory check that
rules out a configuration whose weights alone do not fit (``static_overflow``).
"""

from __future__ import annotations

import bisect
import dataclasses
import math

import numpy as np

from tripar.errors import ConfigError
from tripar.graph.proxy import ProxyGraph
from tripar.partitioner.cost.blocks import BlockCost
from tripar.partitioner.cost.collectives import (
    all_gather_time,
    all_reduce_time,
    reduce_scatter_time,
)
from tripar.partitioner.cost.stages import (
    BUCKET_BYTES,
    bytes_per_param,
    mirror_stride,
    optimizer_s_per_param,
    uniform_boundaries,
    zero_copy_time,
)
from tripar.partitioner.hardware import Cluster, dtype_bytes
from tripar.partitioner.plan_search.cache import BlockCostCache, CostPoint, UniformSplits
from tripar.partitioner.plan_search.pins import Pins, divisors
from tripar.partitioner.plan_search.regions import RegionChooser
from tripar.partitioner.schedules import warmup_in_flight
from tripar.plan.config import SCHEDULES, ZERO_STAGES, ParallelConfig, splits_sequence

TP_OVERLAPS = (1, 2, 4)
"""The tp_overlap values the search tries (where they divide the microbatch)."""


def virtual_stages(pp: int, blocks: int) -> range:
    """vpp values tried for interleaved-1f1b: every one that leaves each of the
    ``pp * vpp`` virtual stages at least one block.

    >>> list(virtual_stages(4, 13)), list(virtual_stages(8, 12))
    ([2, 3], [])
    """
    return range(2, blocks // pp + 1)


def config_key(cfg: ParallelConfig) -> tuple:
    """The order candidates are listed and ties broken in (never dict or set order).

    >>> config_key(ParallelConfig(dp=1, tp=2, pp=4, micro_batch_size=1, num_microbatches=8))
    (2, 4, 1, 1, 1, 0, 'none')
    """
    return (cfg.tp, cfg.pp, cfg.vpp, cfg.micro_batch_size, SCHEDULES.index(cfg.schedule),
            cfg.zero, cfg.recompute) + ((1,) if cfg.sp else ()) + (
            (cfg.tp_overlap,) if cfg.tp_overlap > 1 else ())


class SearchSpace:
    """The configurations of one search: their enumeration (``configs``) and, before any
    is costed, their estimates (``screen``, ``lower_bound``, ``static_overflow``)."""

    def __init__(self, graph: ProxyGraph, cluster: Cluster, global_batch: int, pins: Pins,
                 dtype: str, max_micro_batch: int, costs: BlockCostCache,
                 regions: RegionChooser, uniform: UniformSplits, *,
                 choose_overlap: bool | None = None) -> None:
        self.graph, self.cluster, self.batch, self.pins = graph, cluster, global_batch, pins
        self.dtype, self.max_micro_batch = dtype, max_micro_batch
        self.limit = cluster.device.memory_bytes
        self.costs, self.regions, self.uniform = costs, regions, uniform
        self._chain_share: dict[CostPoint, float] = {}
        self._prefix: dict[tuple[CostPoint, bool | None, bool], dict[str, np.ndarray]] = {}
        self._work: dict[CostPoint, float] = {}
        self._balance: dict[tuple[int, int, int, bool, int], float] = {}
        self._static: dict[tuple[int, ...], tuple[int, str]] = {}
        self._least: dict[tuple[CostPoint, bool | None], list[BlockCost]] = {}
        self._pays: dict[tuple[int, int, int], bool] = {}
        self.choose_overlap = graph.tracer == "fx" if choose_overlap is None else choose_overlap
        """Whether an unpinned tp_overlap is searched. By default, for graphs traced by
        torch.fx, whose shapes follow the microbatch (``torch.export`` bakes the batch size
        into its views, so codegen runs such a stage's microbatches whole)."""

    def least_work_costs(self, tp: int, b: int, k: int = 1, sp: bool | None = None
                         ) -> list[BlockCost]:
        """Block costs with the time-optimal regions sharded (``free_choice``): the least
        work a configuration at ``tp`` and microbatch ``b`` can do (with sequence
        parallelism where the search may choose it: it keeps the least activation bytes;
        or, ``sp`` given, with sequence parallelism on or off as that says), the
        microbatch in ``k`` parts (``tp_overlap``)."""
        key = (CostPoint(tp, b, k), sp)
        if key not in self._least:
            shard = self.regions.free_choice(tp, b)
            choices = [(s, on) for s in ((shard, self.regions.all_regions(tp)) if k > 1
                                         else (shard,))   # overlapped, sharding may pay more
                       for on in self.sequence_parallel(tp) if (sp is None or on == sp)
                       and not (on and splits_sequence(b, k))
                       ] or [(shard, False)]
            costs = self.costs.get(tp, b, *choices[0], k)
            for other in (self.costs.get(tp, b, s, on, k) for s, on in choices[1:]):
                # each part at the least of sp or not, shards or not
                costs = [dataclasses.replace(
                    c, forward_s=min(c.forward_s, s.forward_s),
                    backward_input_s=min(c.backward_input_s, s.backward_input_s),
                    backward_weight_s=min(c.backward_weight_s, s.backward_weight_s),
                    saved_bytes=min(c.saved_bytes, s.saved_bytes))
                    for c, s in zip(costs, other)]
            self._least[key] = costs
        return self._least[key]

    # ---- enumeration -----------------------------------------------------------------

    def tp_degrees(self, devices: int) -> list[int]:
        proven = {d for r in self.graph.tp_regions for d in r.degrees}
        if self.pins.tp is not None:
            return [self.pins.tp]
        return [t for t in divisors(devices) if t == 1 or t in proven]

    def configs(self) -> list[ParallelConfig]:
        pins, devices = self.pins, self.cluster.devices
        n = len(self.graph.blocks)
        out = []
        for tp in self.tp_degrees(devices):
            if devices % tp:
                continue
            for pp in ([pins.pp] if pins.pp else divisors(devices // tp)):
                if devices % (tp * pp) or pp > n:
                    continue
                dp = devices // (tp * pp)
                if (pins.dp and dp != pins.dp) or self.batch % dp:
                    continue
                per_replica = self.batch // dp
                if pins.micro_batch_size:
                    sizes = [pins.micro_batch_size]
                elif pins.num_microbatches:
                    sizes = ([per_replica // pins.num_microbatches]
                             if per_replica % pins.num_microbatches == 0 else [])
                else:
                    sizes = [b for b in divisors(per_replica) if b <= self.max_micro_batch]
                for b in sizes:
                    if per_replica % b:
                        continue
                    m = per_replica // b
                    if pins.num_microbatches and m != pins.num_microbatches:
                        continue
                    for schedule, vpp in self._schedules_for(pp, m, n):
                        for zero in ([pins.zero] if pins.zero is not None else
                                     (list(ZERO_STAGES) if dp > 1 else [0])):
                            for sp in self.sequence_parallel(tp):
                                for k in self.tp_overlaps(tp, b, sp):
                                    out.append(ParallelConfig(
                                        dp=dp, tp=tp, pp=pp, micro_batch_size=b,
                                        num_microbatches=m, vpp=vpp, schedule=schedule,
                                        recompute=pins.recompute or "stage-aware",
                                        zero=zero, sp=sp, tp_overlap=k))
        return sorted(out, key=config_key)

    def sequence_parallel(self, tp: int) -> list[bool]:
        """The sp values tried at degree ``tp``: both where the sequence divides by tp and
        the graph has token-wise parts between its regions, else none (or the pin)."""
        possible = tp > 1 and self.graph.seq_len % tp == 0 and any(
            b.sequence_saved_bytes for b in self.graph.blocks)
        if self.pins.sp is not None:
            return [self.pins.sp] if possible or not self.pins.sp else []
        return [False, True] if possible else [False]

    def tp_overlaps(self, tp: int, b: int, sp: bool = False) -> list[int]:
        """The tp_overlap values tried at degree ``tp``, microbatch ``b`` and ``sp``: the pin
        where it divides the dim split (the batch; the sequence at ``b`` = 1, without sp),
        else one part (with ``choose_overlap``: those of TP_OVERLAPS that divide it and
        pay, one part at tp=1)."""
        def splits(k: int) -> bool:
            if k == 1:
                return True
            if splits_sequence(b, k):
                return not sp and self.graph.seq_len % k == 0
            return b % k == 0

        if self.pins.tp_overlap is not None:
            k = self.pins.tp_overlap
            return [k] if k == 1 or (tp > 1 and splits(k)) else []
        if tp == 1 or not self.choose_overlap:
            return [1]
        return [k for k in TP_OVERLAPS if splits(k) and (k == 1 or self._overlap_pays(tp, b, k))]

    def _overlap_pays(self, tp: int, b: int, k: int) -> bool:
        """Whether ``k`` parts take less block work than one with the time-optimal regions
        sharded, with or without sequence parallelism (without, at ``b`` = 1: the parts
        split the sequence): memory and schedule are the same at every k, so where the
        parts' compute loses more than the overlap hides, no configuration at ``k`` can
        win."""
        key = (tp, b, k)
        if key not in self._pays:
            shard = self.regions.free_choice(tp, b) or self.regions.all_regions(tp)

            def work(sp: bool, parts: int) -> float:
                return sum(c.forward_s + c.backward_input_s + c.backward_weight_s
                           for c in self.costs.get(tp, b, shard, sp, parts))

            self._pays[key] = any(
                work(sp, k) < work(sp, 1) for sp in self.sequence_parallel(tp)
                if not (sp and splits_sequence(b, k)))
        return self._pays[key]

    def _schedules_for(self, pp: int, m: int, blocks: int) -> list[tuple[str, int]]:
        pins = self.pins
        names = [pins.schedule] if pins.schedule else list(SCHEDULES)
        if pins.recompute == "none" and not pins.schedule:
            names.remove("scp")   # scp is 1f1b with recomputation
        if pp == 1 and not pins.schedule:
            names = ["1f1b"]  # one stage: every schedule is the same plain loop
        out = []
        for name in names:
            if name == "chimera" and (pp % 2 or m % 2):
                continue  # two pipelines need an even pp and microbatch count
            if name == "interleaved-1f1b":
                if pp == 1 or m % pp:
                    continue
                for v in ([pins.vpp] if pins.vpp else virtual_stages(pp, blocks)):
                    if v >= 2 and pp * v <= blocks:
                        out.append((name, v))
            elif pins.vpp in (None, 1):
                out.append((name, 1))
        return out

    # ---- bounds and screening --------------------------------------------------------

    def chain_share(self, tp: int, b: int, k: int = 1) -> float:
        """Least share of a block's work on the F ... B chain under zb-h1 (W off it), over
        the region choices a configuration may end with."""
        key = CostPoint(tp, b, k)
        if key not in self._chain_share:
            extremes = [self.least_work_costs(tp, b, k), self.costs.get(tp, b, frozenset()),
                        self.costs.get(tp, b, self.regions.all_regions(tp), False, k),
                        self.costs.get(tp, b, self.regions.all_regions(tp), True, k)
                        if not splits_sequence(b, k) else []]
            self._chain_share[key] = min(
                ((c.forward_s + c.backward_input_s)
                 / (c.forward_s + c.backward_input_s + c.backward_weight_s)
                 for cs in extremes for c in cs if c.forward_s + c.backward_input_s > 0),
                default=0.0)
        return self._chain_share[key]

    def lower_bound(self, cfg: ParallelConfig) -> float:
        key = CostPoint(cfg.tp, cfg.micro_batch_size, cfg.tp_overlap)
        if key not in self._work:
            self._work[key] = sum(c.forward_s + c.backward_input_s + c.backward_weight_s
                                  for c in self.least_work_costs(*key))
        work = self._work[key]
        m, p, v = cfg.num_microbatches, cfg.pp, cfg.vpp
        # share of each block's work that is forward: the chain before a stage's first F
        phi = 0.0   # share of a stage's work on the F ... B chain through it
        if cfg.schedule in ("gpipe", "1f1b", "scp"):
            phi = 1.0
        elif cfg.schedule == "zb-h1":  # W is off the chain
            phi = self.chain_share(cfg.tp, cfg.micro_batch_size, cfg.tp_overlap)
        bound = m * work / p
        if p > 1 and 0 < phi / m < 1 and v == 1:
            bound = max(bound, phi * work / (1.0 - (1.0 - phi / m) ** p))
        return bound + self.tail_bound(cfg)

    def tail_bound(self, cfg: ParallelConfig) -> float:
        """Least time rank 0 spends after its last backward: reducing its last gradient
        bucket and the optimizer step, for no more than the first block's parameters."""
        params = self.costs.get(cfg.tp, cfg.micro_batch_size,
                                self.regions.all_regions(cfg.tp))[0].params   # the fewest
        # the optimizer's charge leaves out its per-tensor launches, so bounds stay bounds
        shards = cfg.dp * cfg.pipelines if cfg.zero else 1
        optimizer = params / shards * optimizer_s_per_param(self.cluster)
        if cfg.dp == 1 or not params:
            return optimizer
        grad = min(params * dtype_bytes(self.dtype), BUCKET_BYTES)
        reduce = reduce_scatter_time if cfg.zero else all_reduce_time
        return optimizer + reduce(self.cluster, grad, cfg.dp, cfg.tp)

    def prefix(self, tp: int, b: int, k: int = 1, sp: bool | None = None, *,
               least_memory: bool = False) -> dict[str, np.ndarray]:
        """Prefix sums over blocks of forward, total work, saved, input bytes and params,
        with the time-optimal regions sharded (or, ``least_memory``, every proven one),
        the microbatch in ``k`` parts, with sequence parallelism as ``sp`` says (None:
        the least work and bytes of on or off, where the search may choose it)."""
        key = (CostPoint(tp, b, k), sp, least_memory)
        if key not in self._prefix:
            on = True in self.sequence_parallel(tp) if sp is None else sp
            costs = (self.costs.get(tp, b, self.regions.all_regions(tp), on, k)
                     if least_memory else self.least_work_costs(tp, b, k, sp))

            def cum(values) -> np.ndarray:
                return np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])

            self._prefix[key] = {
                "fwd": cum([c.forward_s for c in costs]),
                "work": cum([c.forward_s + c.backward_input_s + c.backward_weight_s
                             for c in costs]),
                "weight": cum([c.backward_weight_s for c in costs]),
                "act": cum([c.saved_bytes for c in costs]),
                "sel": cum([c.selective_bytes for c in costs]),
                "sel_s": cum([c.selective_s for c in costs]),
                "inp": cum([c.input_bytes for c in costs]),
                "params": cum([c.params for c in costs]),
            }
        return self._prefix[key]

    def screen(self, cfg: ParallelConfig) -> float:
        """A quick step-time estimate (uniform split by layers, the recompute share each
        stage needs to fit, the partition objective, the gradient reduction and optimizer
        step of an average stage); it only orders the candidates."""
        pre = self.prefix(cfg.tp, cfg.micro_batch_size, cfg.tp_overlap, cfg.sp)
        k = cfg.pp * cfg.vpp
        firsts = self.uniform(k)
        if firsts is None:
            return math.inf
        cuts = np.array((*firsts, len(self.graph.blocks)))
        lo, hi = cuts[:-1], cuts[1:]

        def span(name: str) -> np.ndarray:
            return pre[name][hi] - pre[name][lo]

        copies = cfg.dp * cfg.pipelines
        model, optimizer = bytes_per_param(self.dtype, cfg.zero, copies)
        fwd, work = span("fwd"), span("work")
        if cfg.recompute == "selective":  # every stage re-runs its segments
            work = work + span("sel_s")
        inflight = np.asarray(warmup_in_flight(cfg.schedule, cfg.pp, cfg.num_microbatches,
                                               cfg.vpp), dtype=np.float64)
        share = self._recompute_share(cfg, span, inflight, model + optimizer)
        if share is None:   # try the memory of every proven region sharded
            least = self.prefix(cfg.tp, cfg.micro_batch_size, cfg.tp_overlap, cfg.sp,
                                least_memory=True)
            share = self._recompute_share(cfg, lambda name: least[name][hi] - least[name][lo],
                                          inflight, model + optimizer)
            if share is None:
                return math.inf
        if cfg.recompute == "full":
            share[:] = 1.0
        times = work + share * fwd
        m, v = cfg.num_microbatches, cfg.vpp
        # the partition moves layers off a stage that holds a heavy embedding or head:
        # the slowest stage of the most even split, plus the most recomputation
        slowest = min(float(times.max()), self._balanced(cfg.tp, cfg.micro_batch_size,
                                                         cfg.tp_overlap, cfg.sp, k)
                      + float((share * fwd).max()))
        pipeline = float(times.sum()) / v + (m * v - 1) * slowest
        if cfg.pipelines == 2:  # rank r runs m / 2 of stages r and pp-1-r; Chimera's bubble
            rank = float((times + times[::-1]).max()) * m / 2
            pipeline = rank * (1 + (cfg.pp - 2) / (2 * m))
        if cfg.schedule == "zb-h1":  # its bubble is (p - 1)(F + B - W), 1F1B's (p - 1)(F + B + W)
            weight = float(pre["weight"][-1]) / k
            pipeline -= min(2 * weight, slowest) * (cfg.pp - 1)
        params = float(pre["params"][-1]) / cfg.pp * cfg.pipelines
        tail = params * optimizer_s_per_param(self.cluster)
        if copies > 1:
            reduce = reduce_scatter_time if cfg.zero else all_reduce_time
            tail /= copies if cfg.zero else 1
            grad = params * dtype_bytes(self.dtype)
            total = reduce(self.cluster, grad, cfg.dp, cfg.tp)
            if cfg.pipelines == 2:  # and the sum between the two holders of rank 0's stages
                total += all_reduce_time(self.cluster, grad / (cfg.dp if cfg.zero else 1), 2,
                                         mirror_stride(self.cluster, cfg, 0))
            # overlapped with the last microbatch's backward of each of the rank's stages,
            # as stage_costs has it (not m microbatches': the reduction runs once a step)
            exposed = total - v * cfg.pipelines * float((times - fwd).min())
            tail += max(reduce(self.cluster, min(grad, BUCKET_BYTES), cfg.dp, cfg.tp), exposed)
            if cfg.zero:
                tail += (all_gather_time(self.cluster, grad, copies, cfg.tp)
                         + zero_copy_time(self.cluster, grad))
        return pipeline + tail

    def _balanced(self, tp: int, b: int, parts: int, sp: bool, k: int) -> float:
        """The least work of the slowest stage over every split of the blocks into ``k``
        contiguous stages (a bisection over that work, each test a greedy fill)."""
        key = (tp, b, parts, sp, k)
        if key not in self._balance:
            prefix = self.prefix(tp, b, parts, sp)["work"]
            work = prefix.tolist()  # bisect on a list: scalar searchsorted dominated the search
            n = len(work) - 1
            lo = max(work[-1] / k, float(np.diff(prefix).max()))
            hi = work[-1]
            for _ in range(40):
                cap = (lo + hi) / 2
                at, stages = 0, 0
                while at < n and stages < k:
                    at = bisect.bisect_right(work, work[at] + cap * (1 + 1e-12)) - 1
                    stages += 1
                lo, hi = (lo, cap) if at >= n else (cap, hi)
                if hi - lo <= 1e-6 * hi:
                    break
            self._balance[key] = hi
        return self._balance[key]

    def _recompute_share(self, cfg: ParallelConfig, span, inflight: np.ndarray,
                         per_param: float) -> np.ndarray | None:
        """Per stage of the uniform split, the share of its recomputable bytes it drops
        so that each pipeline rank fits (its virtual stages share the device: their sum
        at the rank's peak binds); None when a rank cannot fit."""
        act = span("act")
        if cfg.recompute == "selective":  # every stage keeps less
            act = act - span("sel")
        held = (span("params") * per_param + inflight * act).reshape(-1, cfg.pp)
        freed = (inflight * (act - span("inp"))).reshape(-1, cfg.pp)
        if cfg.pipelines == 2:  # chimera: rank r holds stages r and pp-1-r
            held, freed = held + held[:, ::-1], freed + freed[:, ::-1]
        freed = freed.sum(axis=0)
        need = held.sum(axis=0) - self.limit   # per pipeline rank
        share = np.zeros(cfg.pp)
        short = need > 0
        if short.any():
            if cfg.recompute in ("none", "selective") or np.any(need[short] > freed[short]):
                return None
            share[short] = need[short] / freed[short]
        return np.tile(share, cfg.vpp)

    def static_overflow(self, cfg: ParallelConfig) -> tuple[int, str]:
        """Bytes by which the busiest device's static memory exceeds the device, at least
        (every proven region sharded, the weights spread evenly over the stages), and
        when it does (> 0) why (``static_message``); once per (tp, micro-batch, pp, dp,
        ZeRO, and two pipelines or one), whatever else the schedule and virtual stages."""
        key = (cfg.tp, cfg.micro_batch_size, cfg.pp, cfg.dp, cfg.zero, cfg.pipelines)
        if key not in self._static:
            over = self._overflow(cfg)
            self._static[key] = (over, self.static_message(cfg, over) if over > 0 else "")
        return self._static[key]

    def _overflow(self, cfg: ParallelConfig) -> int:
        model, optimizer = bytes_per_param(self.dtype, cfg.zero, cfg.dp * cfg.pipelines)
        costs = self.costs.get(cfg.tp, cfg.micro_batch_size, self.regions.all_regions(cfg.tp))
        total = sum(c.params for c in costs) * (model + optimizer)
        return math.ceil(total * cfg.pipelines / cfg.pp) - self.limit

    def static_message(self, cfg: ParallelConfig, over: int) -> str:
        """Why ``cfg`` cannot hold its weights: the stage, the bytes short, the fix."""
        model, optimizer = bytes_per_param(self.dtype, cfg.zero, cfg.dp)
        costs = self.costs.get(cfg.tp, cfg.micro_batch_size, self.regions.all_regions(cfg.tp))
        per_block = [c.params * (model + optimizer) for c in costs]
        try:
            firsts = (*uniform_boundaries(self.graph, cfg.pp), len(costs))
        except ConfigError:
            firsts = (0, len(costs))
        spans = [(sum(per_block[a:b]), a, b) for a, b in zip(firsts, firsts[1:])]
        need_s, a, b = max(spans, key=lambda x: x[0])
        stage = spans.index((need_s, a, b))
        need = over + self.limit
        names = self.graph.blocks
        replica = sum(per_block) * cfg.tp
        devices = math.ceil(replica / self.limit)
        return (f"pipeline stage {stage} of {cfg.pp} ({names[a].name}..{names[b - 1].name}) "
                f"needs at least {need} bytes ({need / 1e9:.1f} GB) for weights, gradients and "
                f"optimizer state alone (even split, every proven region sharded at "
                f"tp={cfg.tp}), {over} bytes more than the {self.limit} bytes "
                f"({self.limit / 1e9:.1f} GB) of a device; fix: one model replica needs at "
                f"least {devices} such devices (tp*pp >= {devices}), so use more devices "
                f"(at least {math.ceil(devices / self.cluster.devices_per_node)} nodes of "
                f"{self.cluster.devices_per_node}), or devices with more memory")
