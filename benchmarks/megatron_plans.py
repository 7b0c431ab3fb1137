"""The planner against every row of Megatron-LM's weak-scaling table.

For each row of Table 1 (arXiv 2104.04473; shared/REFERENCE.md): the zoo ``gpt`` graph
(built once per row and reused), on a100-80g nodes of 8 with the row's GPUs and
global batch, nothing else pinned. Prints the published configuration (t, p, d, micro
batch 1, 1f1b, full recomputation) simulated with tripar's cost model, the plan's
simulated step time and configuration, the plan's configuration on the uniform split by
layers costed as the search costs it (``search.uniform_split_of``; the plan must be no
slower, ``plan/uniform <= 1``), and the graph and search times. Row 10's search takes
longer than the planner's tests allow, so this is where its check runs.

    python benchmarks/megatron_plans.py [--rows 8,9,10]
"""

from __future__ import annotations

import argparse
import time

from tripar.commands._model_args import proxy_graph_for
from tripar.partitioner import search_with_stats, step_estimate, uniform_split_of
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.megatron import MEGATRON_TABLE, MEGATRON_WEIGHTS, SEQ, VOCAB
from tripar.plan.config import ParallelConfig


def compare(row: tuple) -> dict:
    """Published configuration and plan for one row, on one graph."""
    _, heads, hidden, layers, t, p, gpus, batch = row[:8]
    spec = f"gpt:layers={layers},hidden={hidden},heads={heads},vocab={VOCAB},seq={SEQ}"
    start = time.perf_counter()
    graph = proxy_graph_for(spec, batch_size=1, seq_len=SEQ, weights_dtype=MEGATRON_WEIGHTS)
    graph_s = time.perf_counter() - start
    cluster = Cluster.builtin("a100-80g", nodes=gpus // 8, gpus_per_node=8)
    d = gpus // (t * p)
    published = ParallelConfig(dp=d, tp=t, pp=p, micro_batch_size=1,
                               num_microbatches=batch // d, schedule="1f1b", recompute="full")
    reference = step_estimate(graph, cluster, published, record_timeline=False)
    start = time.perf_counter()
    plan, stats = search_with_stats(graph, cluster, batch, model_spec=spec)
    search_s = time.perf_counter() - start
    uniform = uniform_split_of(plan, graph, cluster)
    return {"row": row, "graph_s": graph_s, "search_s": search_s,
            "published_s": reference.step_time_s, "published_fits": reference.fits,
            "plan_s": plan.estimate.step_time_s, "plan": plan,
            "uniform_s": uniform.step_time_s, "split": next(n for n in plan.notes if n.startswith("stage split"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4,5,6,7,8,9,10",
                        help="1-based rows of the table, comma-separated")
    args = parser.parse_args()
    print("| row | params (B) | GPUs | batch | published t,p,d | published step s | plan | "
          "plan step s | plan/published | uniform split s | plan/uniform | graph s | "
          "search s |")
    print("|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
    splits = []
    for i in (int(x) for x in args.rows.split(",")):
        got = compare(MEGATRON_TABLE[i - 1])
        params, _, _, _, t, p, gpus, batch = got["row"][:8]
        par = got["plan"].parallel
        plan = (f"dp{par.dp} tp{par.tp} pp{par.pp} v{par.vpp} b{par.micro_batch_size} "
                f"{par.schedule} {par.recompute} z{par.zero}")
        fits = "" if got["published_fits"] else " (over memory)"
        print(f"| {i} | {params} | {gpus} | {batch} | {t},{p},{gpus // (t * p)} | "
              f"{got['published_s']:.3f}{fits} | {plan} | {got['plan_s']:.3f} | "
              f"{got['plan_s'] / got['published_s']:.3f} | {got['uniform_s']:.3f} | "
              f"{got['plan_s'] / got['uniform_s']:.4f} | {got['graph_s']:.1f} | "
              f"{got['search_s']:.2f} |", flush=True)
        splits.append(f"row {i}: {got['split']}")
        if got["plan_s"] > got["uniform_s"]:
            raise SystemExit(f"row {i}: the plan ({got['plan_s']:.3f} s) is slower than its "
                             f"configuration's uniform split ({got['uniform_s']:.3f} s)")
    print()
    print("\n".join(splits))


if __name__ == "__main__":
    main()
