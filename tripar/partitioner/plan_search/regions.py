"""Which tensor-parallel regions a configuration of the search shards.

Regions proven at the degree are grouped so that identical layers share one decision:
by (block signature, kind, index), the index telling apart two regions of one kind in a
layer (t5's self- and cross-attention); groups that shard one weight (a tied embedding
and LM head) merge (``_merge_sharing``). :class:`RegionChooser` costs each group's effect
and picks the groups to shard: the tensor-parallel ILP (``tripar.partitioner.tp_choice``)
under pipeline rank 0's memory, and the time-optimal choice.
"""

from __future__ import annotations

from tripar.errors import InfeasibleError
from tripar.graph.proxy import ProxyGraph
from tripar.partitioner.cost.blocks import shardable_regions as _shardable
from tripar.partitioner.cost.stages import bytes_per_param, optimizer_s_per_param
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.plan_search.cache import BlockCostCache, CostPoint, RegionChoiceKey
from tripar.partitioner.schedules import warmup_in_flight
from tripar.partitioner.tp_choice import TPCandidate, choose_tp_regions
from tripar.plan.config import ParallelConfig


class RegionChooser:
    """The tensor-parallel regions of one search: groups, their effects, and the regions
    sharded for a configuration (the ILP's choice and the time-optimal one)."""

    def __init__(self, graph: ProxyGraph, cluster: Cluster, dtype: str,
                 costs: BlockCostCache) -> None:
        self.graph, self.cluster, self.dtype, self.costs = graph, cluster, dtype, costs
        self.limit = cluster.device.memory_bytes
        self._groups: dict[int, list[tuple[str, tuple[str, ...]]]] = {}
        self._all: dict[int, frozenset[str]] = {}
        self._free: dict[CostPoint, frozenset[str]] = {}
        self._effects: dict[CostPoint, list[tuple[float, float, float, float]]] = {}
        self._choices: dict[RegionChoiceKey, tuple[frozenset[str], str]] = {}

    def groups(self, tp: int) -> list[tuple[str, tuple[str, ...]]]:
        """Regions proven at ``tp`` grouped by (block signature, kind, index): identical
        layers share one decision, and a layer's regions of one kind (t5's self- and
        cross-attention) are decided apart. Each group: (name, region names)."""
        if tp not in self._groups:
            signature = {b.name: b.signature for b in self.graph.blocks}
            proven = set(_shardable(self.graph, tp))
            grouped: dict[tuple[str, str, int], list[str]] = {}
            weights: dict[tuple[str, str, int], set[str]] = {}
            for r in self.graph.tp_regions:
                name = r.name
                if name in proven:
                    key = (signature.get(r.block, r.block), r.kind, r.index)
                    grouped.setdefault(key, []).append(name)
                    weights.setdefault(key, set()).update(
                        [fqn for fqn, _ in r.shards] + list(r.tied))
            self._groups[tp] = [(names[0] + (f" (+{len(names) - 1} alike)" if len(names) > 1
                                              else ""), tuple(names))
                                for names in _merge_sharing(grouped, weights)]
        return self._groups[tp]

    def all_regions(self, tp: int) -> frozenset[str]:
        """Every region proven at ``tp``."""
        if tp not in self._all:
            self._all[tp] = frozenset(n for _, names in self.groups(tp) for n in names)
        return self._all[tp]

    def effects(self, tp: int, b: int) -> list[tuple[float, float, float, float]]:
        """Per group, for one microbatch on the whole model: (compute saved, collective
        time added, parameters saved, activation bytes saved) by sharding it alone."""
        key = CostPoint(tp, b)
        if key not in self._effects:
            none = self.costs.get(tp, b, frozenset())
            out = []
            for _name, names in self.groups(tp):
                alone = self.costs.get(tp, b, frozenset(names))
                work = sum(c.forward_s + c.backward_input_s + c.backward_weight_s - c.tp_comm_s
                           for c in alone)
                base = sum(c.forward_s + c.backward_input_s + c.backward_weight_s for c in none)
                out.append((max(0.0, base - work), sum(c.tp_comm_s for c in alone),
                            max(0, sum(c.params for c in none) - sum(c.params for c in alone)),
                            max(0, sum(c.saved_bytes for c in none)
                                - sum(c.saved_bytes for c in alone))))
            self._effects[key] = out
        return self._effects[key]

    def free_choice(self, tp: int, b: int) -> frozenset[str]:
        """The regions whose sharding saves more compute than its collectives cost (the
        tensor-parallel ILP's answer when memory does not bind)."""
        key = CostPoint(tp, b)
        if key not in self._free:
            if tp == 1:
                self._free[key] = frozenset()
            else:
                chosen = [names for (_n, names), (save, comm, _p, _a)
                          in zip(self.groups(tp), self.effects(tp, b)) if comm < save]
                self._free[key] = frozenset(n for names in chosen for n in names)
        return self._free[key]

    def tp_choice(self, cfg: ParallelConfig) -> tuple[frozenset[str], str]:
        """The regions to shard for ``cfg``: :func:`choose_tp_regions` on one decision per
        group, trading collective time against the memory of pipeline rank 0 (the rank
        holding the most microbatches) under a balanced split, without recomputation.
        When even sharding every region does not fit without recomputation, every region
        is sharded (recomputation then closes the gap)."""
        tp = cfg.tp
        if tp == 1:
            return frozenset(), ""
        inflight = warmup_in_flight(cfg.schedule, cfg.pp, cfg.num_microbatches, cfg.vpp)
        key = RegionChoiceKey(tp, cfg.micro_batch_size, cfg.pp, cfg.vpp, cfg.dp, cfg.zero,
                              inflight[0] if cfg.vpp == 1 else tuple(inflight[::cfg.pp]),
                              cfg.pipelines)
        if key not in self._choices:
            p, v, m = cfg.pp, cfg.vpp, cfg.num_microbatches
            held = sum(inflight[s] for s in range(0, p * v, p)) / (p * v)
            copies = cfg.dp * cfg.pipelines  # gradient copies summed (ZeRO shards over them)
            model, optimizer = bytes_per_param(self.dtype, cfg.zero, copies)
            per_param = (model + optimizer) * cfg.pipelines  # chimera: two stages per rank
            steps = (p + m * v - 1) / (p * v)
            none = self.costs.get(tp, cfg.micro_batch_size, frozenset())
            memory = int(sum(c.params for c in none) * per_param / p
                         + sum(c.saved_bytes for c in none) * held)
            candidates = []
            optimizer_s = optimizer_s_per_param(self.cluster)
            for (name, names), (save, comm, params, act) in zip(
                    self.groups(tp), self.effects(tp, cfg.micro_batch_size)):
                region = next(r for r in self.graph.tp_regions if r.name == names[0])
                # the optimizer steps over 1/dp of the parameters under ZeRO-1 (cost model)
                step_save = (save * steps
                             + params / p / (copies if cfg.zero else 1) * optimizer_s)
                candidates.append(TPCandidate(region, step_save, comm * steps,
                                              int(params * per_param / p + act * held),
                                              group=name))
            try:
                choice = choose_tp_regions(candidates, degree=tp, memory_bytes=memory,
                                           memory_limit_bytes=self.limit)
                picked = {c.group for c in candidates
                          if any(c.region is r for r in choice.sharded)}
                note = (f"tensor-parallel ILP ({choice.solver}, {choice.status}): "
                        f"{len(picked)} of {len(candidates)} region groups sharded")
            except InfeasibleError:
                picked = {c.group for c in candidates}
                note = ("every region sharded: even then rank 0 needs recomputation to fit "
                        "(tensor-parallel ILP infeasible without it)")
            chosen = frozenset(n for name, names in self.groups(tp) if name in picked
                               for n in names)
            self._choices[key] = (chosen, note)
        return self._choices[key]


def _merge_sharing(grouped: dict, weights: dict) -> list[list[str]]:
    """Merge region groups that shard one weight (a tied embedding and LM head): they
    must be sharded together or not at all, so they share one decision.

    >>> _merge_sharing({"a": ["emb"], "b": ["head"], "c": ["mlp"]},
    ...                {"a": {"wte.weight"}, "b": {"wte.weight"}, "c": {"fc.weight"}})
    [['emb', 'head'], ['mlp']]
    """
    merged: list[tuple[set[str], list[str]]] = []
    for key, names in grouped.items():
        own = set(weights.get(key, ()))
        names = list(names)
        for other in [m for m in merged if m[0] & own]:
            merged.remove(other)
            own |= other[0]
            names = other[1] + names
        merged.append((own, names))
    return [names for _, names in merged]
