"""The outer search: dp, tp, pp, virtual stages, microbatches, schedule, ZeRO, recompute.

``search(graph, cluster, global_batch)`` enumerates every configuration with
``dp * tp * pp`` equal to the cluster's devices (pins fixed, the rest free),
orders them by a lower bound on their step time and costs them in that order
until the bound of the next one cannot beat the best found. Costing one
configuration means: block costs from the cost model (cached per tensor-parallel
degree and microbatch size; identical blocks costed once), the exact stage
partition with per-stage recomputation (:func:`~tripar.partitioner.partition.
solve_partition_dp`) under the in-flight microbatch counts of its schedule,
then the schedule played by the simulator. The DP minimises a proxy of the step, so
the uniform split by layers, with the DP's per-stage recomputation for it under the same
budget, is simulated too and kept when faster (``Evaluator.best_split``; the plan's notes
say which split won and by how much). The result is a validated
:class:`~tripar.plan.plan.Plan` with the runners-up and why each lost.

Lower bound (never above the simulated step time): for gpipe, 1f1b and scp,
stage ``j`` cannot start before the first microbatch's forward has crossed the
stages before it, runs ``m`` forward+backward of its own, and the last
backward must then cross those stages again, so ``T >= sum_{s<j} t_s + m t_j``
for every j; over all splits of the total work ``W`` this is at least
``W / (1 - (1 - 1/m)^p)``. Interleaved and zero-bubble schedules get the
busiest-rank bound ``m W / p``. A configuration whose weights, gradients and
optimizer state alone exceed ``p`` devices is not costed.

Only the bound pruning is exact: candidates left after screening (see ``search``)
were not costed, and the plan's search status then says ``screened``, not
``optimal``. Deterministic: candidates are ordered by (bound, configuration), ties never
depend on dict or set order, and no clock enters a decision.

The parts are objects handed to each other (``driver.search_parts``), one job per module:

* ``pins``: what the user fixed, and the error for pins that cannot hold;
* ``cache``: the typed cache keys, and the block costs and uniform splits computed once;
* ``regions``: the tensor-parallel regions a configuration shards (:class:`RegionChooser`);
* ``space``: the candidates, their screening estimate and lower bound
  (:class:`SearchSpace`);
* ``evaluate``: one configuration partitioned, scheduled and simulated (:class:`Evaluator`);
* ``result``: the plan assembled from the best, with the runners-up (``assemble_plan``);
* ``driver``: the loop (:func:`search`, :func:`search_with_stats`) and the baselines a
  plan is checked against.
"""

from tripar.partitioner.plan_search.driver import (
    SearchParts,
    evaluate_split,
    partition_problem,
    search,
    search_parts,
    search_with_stats,
    uniform_split_of,
)
from tripar.partitioner.plan_search.evaluate import Evaluated, Evaluator
from tripar.partitioner.plan_search.pins import Pins, Spelling, check_pins
from tripar.partitioner.plan_search.regions import RegionChooser
from tripar.partitioner.plan_search.result import SearchStats
from tripar.partitioner.plan_search.space import SearchSpace

__all__ = ["Evaluated", "Evaluator", "Pins", "RegionChooser", "Spelling", "check_pins",
           "SearchParts", "SearchSpace", "SearchStats", "evaluate_split", "partition_problem",
           "search", "search_parts", "search_with_stats", "uniform_split_of"]
