"""The planner against the runs of Korthikanti et al. (arXiv 2205.05198).

For each run of ``KORTHIKANTI_RUNS`` (A100-80GB, seq 2048, global batch = GPUs / t / p x
the published one): the published model FLOPs utilization, the published configuration
(t, p, dp 1, micro batch 1, 1F1B) simulated by tripar's cost model without recomputation,
without and with sequence parallelism (as published; selective recomputation is
``korthikanti_selective.py``'s), and tripar's own
plan for the same GPUs and batch, nothing pinned, with its configuration, MFU and search
time (wall and CPU seconds; the CPU ones hold up on a busy machine). MFU counts
``72 B s l h^2 (1 + s/(6h) + V/(12 l h))`` FLOPs per step (``megatron.model_flops``).

    python benchmarks/korthikanti_plans.py [--rows 1,2,3,4]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from tripar.commands._model_args import proxy_graph_for
from tripar.partitioner import search_with_stats, step_estimate
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.megatron import (
    A100_PEAK_TFLOPS,
    KORTHIKANTI_RUNS,
    MEGATRON_WEIGHTS,
    SEQ,
    gpt_spec,
    model_flops,
)
from tripar.plan.config import ParallelConfig


def row_report(row: tuple) -> str:
    """One markdown row: published MFU, the published configuration simulated, the plan."""
    name, heads, hidden, layers, t, p, gpus, batch, mfu, _ = row
    graph = proxy_graph_for(gpt_spec(heads, hidden, layers), batch_size=1, seq_len=SEQ,
                            weights_dtype=MEGATRON_WEIGHTS)
    cluster = Cluster.builtin("a100-80g", nodes=max(1, gpus // 8), gpus_per_node=8)
    flops = model_flops(batch, layers, hidden)

    def utilization(step_s: float) -> float:
        return flops / step_s / gpus / (A100_PEAK_TFLOPS * 1e12)

    published = ParallelConfig(dp=gpus // (t * p), tp=t, pp=p, micro_batch_size=1,
                               num_microbatches=batch // (gpus // (t * p)),
                               schedule="1f1b", recompute="none")

    def simulated(config: ParallelConfig) -> str:
        est = step_estimate(graph, cluster, config, record_timeline=False)
        return (f"{utilization(est.step_time_s):.1%}" if est.fits else
                f"does not fit: {max(est.rank_memory_bytes) / 2**30:.1f} GiB on a device")

    as_published = (f"{simulated(published)} | "
                    f"{simulated(dataclasses.replace(published, sp=True))}")
    wall, cpu = time.perf_counter(), time.process_time()
    plan, _stats = search_with_stats(graph, cluster, batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    par = plan.parallel
    recomputing = sum(1 for st in plan.stages if st.recompute)
    chosen = (f"dp{par.dp} tp{par.tp} pp{par.pp} v{par.vpp} b{par.micro_batch_size} "
              f"{par.schedule} {par.recompute} ({recomputing}/{len(plan.stages)} stages "
              f"recompute) z{par.zero}" + (" sp" if par.sp else ""))
    return (f"| {name}, {gpus} | {mfu:.1f}% | {as_published} | "
            f"{utilization(plan.estimate.step_time_s):.1%} | {chosen} | "
            f"{plan.estimate.peak_memory_bytes / 2**30:.1f} | {wall:.1f} / {cpu:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4", help="1-based rows, comma-separated")
    args = parser.parse_args()
    print(f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| model, GPUs | published MFU | published config, simulated (recompute none) | "
          "the same with sequence parallelism | tripar's plan MFU | tripar's plan | "
          "plan peak GiB | search s (wall / CPU) |")
    print("|---|---:|---|---|---:|---|---:|---:|")
    for i in (int(x) for x in args.rows.split(",")):
        print(row_report(KORTHIKANTI_RUNS[i - 1]), flush=True)


if __name__ == "__main__":
    main()
