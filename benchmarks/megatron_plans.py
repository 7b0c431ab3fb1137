"""The planner against every row of Megatron-LM's weak-scaling table.

For each row of Table 1 (arXiv 2104.04473; shared/REFERENCE.md): the zoo ``gpt`` graph
(built once per row and reused), on a100-80g nodes of 8 with the row's GPUs and
global batch, nothing else pinned. Prints the published configuration (t, p, d, micro
batch 1, 1f1b, full recomputation) simulated with tripar's cost model, the plan's
simulated step time and configuration, and the graph and search times.

    python benchmarks/megatron_plans.py [--rows 8,9,10]
"""

from __future__ import annotations

import argparse
import time

from tripar.commands._model_args import proxy_graph_for
from tripar.partitioner.cost_model import step_estimate
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.megatron import MEGATRON_TABLE, SEQ, VOCAB
from tripar.partitioner.search import search_with_stats
from tripar.plan.config import ParallelConfig


def compare(row: tuple) -> dict:
    """Published configuration and plan for one row, on one graph."""
    _, heads, hidden, layers, t, p, gpus, batch = row[:8]
    spec = f"gpt:layers={layers},hidden={hidden},heads={heads},vocab={VOCAB},seq={SEQ}"
    start = time.perf_counter()
    graph = proxy_graph_for(spec, batch_size=1, seq_len=SEQ)
    graph_s = time.perf_counter() - start
    cluster = Cluster.builtin("a100-80g", nodes=gpus // 8, gpus_per_node=8)
    d = gpus // (t * p)
    published = ParallelConfig(dp=d, tp=t, pp=p, micro_batch_size=1,
                               num_microbatches=batch // d, schedule="1f1b", recompute="full")
    reference = step_estimate(graph, cluster, published, record_timeline=False)
    start = time.perf_counter()
    plan, stats = search_with_stats(graph, cluster, batch, model_spec=spec)
    return {"row": row, "graph_s": graph_s, "search_s": time.perf_counter() - start,
            "published_s": reference.step_time_s, "published_fits": reference.fits,
            "plan_s": plan.estimate.step_time_s, "plan": plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4,5,6,7,8,9,10",
                        help="1-based rows of the table, comma-separated")
    args = parser.parse_args()
    print("| row | params (B) | GPUs | batch | published t,p,d | published step s | plan | "
          "plan step s | plan/published | graph s | search s |")
    print("|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|")
    for i in (int(x) for x in args.rows.split(",")):
        got = compare(MEGATRON_TABLE[i - 1])
        params, _, _, _, t, p, gpus, batch = got["row"][:8]
        par = got["plan"].parallel
        plan = (f"dp{par.dp} tp{par.tp} pp{par.pp} v{par.vpp} b{par.micro_batch_size} "
                f"{par.schedule} {par.recompute} z{par.zero}")
        fits = "" if got["published_fits"] else " (over memory)"
        print(f"| {i} | {params} | {gpus} | {batch} | {t},{p},{gpus // (t * p)} | "
              f"{got['published_s']:.3f}{fits} | {plan} | {got['plan_s']:.3f} | "
              f"{got['plan_s'] / got['published_s']:.3f} | {got['graph_s']:.1f} | "
              f"{got['search_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
