"""Plan GPT-3 175B on 1024 A100-80G (128 nodes of 8) at global batch 1536.

Times the whole ``tripar plan`` command first (a fresh process each time: imports,
the 175B graph on the meta device, the search, the plan file), then builds the real
proxy graph of the zoo ``gpt`` on the meta device in this process and times the
full search (``tripar.partitioner.search_with_stats``) on its own and prints
both times (the search's also in CPU seconds, which hold up on a busy machine), the plan, the search's statistics and how the stage split was chosen (the
partition DP's or the uniform one, whichever simulated faster).

    python benchmarks/plan_gpt3.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from tripar.commands._model_args import proxy_graph_for
from tripar.partitioner import search_with_stats
from tripar.partitioner.hardware import Cluster

SPEC = "gpt:layers=96,hidden=12288,heads=96,vocab=51200,seq=2048"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="search runs (best is shown)")
    args = parser.parse_args()
    command = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(max(1, args.repeat)):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "tripar.cli", "plan", SPEC, "--gpu", "a100-80g",
                            "--nodes", "128", "--gpus-per-node", "8", "--global-batch", "1536",
                            "--out", os.path.join(tmp, "plan.json")],
                           check=True, stdout=subprocess.DEVNULL)
            command.append(time.perf_counter() - start)
    print(f"tripar plan : {min(command):.2f} s best of {len(command)} "
          f"({', '.join(f'{t:.2f}' for t in command)}), the whole command")
    start = time.perf_counter()
    graph = proxy_graph_for(SPEC, batch_size=1, seq_len=2048, tp_degrees=(2, 4, 8))
    graph_s = time.perf_counter() - start
    cluster = Cluster.builtin("a100-80g", nodes=128, gpus_per_node=8)
    times, cpu = [], []
    for _ in range(max(1, args.repeat)):
        start, start_cpu = time.perf_counter(), time.process_time()
        plan, stats = search_with_stats(graph, cluster, 1536, model_spec=SPEC)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    par = plan.parallel
    print(f"GPT-3 175B ({len(graph.blocks)} blocks, {len(graph.tp_regions)} TP regions), "
          f"1024 x a100-80g, global batch 1536")
    print(f"graph build : {graph_s:.2f} s")
    print(f"search      : {min(times):.2f} s best of {len(times)} "
          f"({', '.join(f'{t:.2f}' for t in times)}); CPU {min(cpu):.2f} s "
          f"({', '.join(f'{t:.2f}' for t in cpu)}); load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"plan        : dp={par.dp} tp={par.tp} pp={par.pp} vpp={par.vpp} "
          f"micro-batch={par.micro_batch_size} x {par.num_microbatches} {par.schedule} "
          f"recompute={par.recompute} zero={par.zero}")
    print(f"estimate    : step {plan.estimate.step_time_s:.2f} s, "
          f"{plan.estimate.tokens_per_s:,.0f} tokens/s, peak "
          f"{plan.estimate.peak_memory_bytes / 1e9:.1f} GB, bubble "
          f"{plan.estimate.bubble_fraction:.1%}")
    print(f"search      : {stats.candidates} candidates, {stats.evaluated} simulated, "
          f"{stats.pruned_by_bound} by bound, {stats.pruned_by_memory} by memory, "
          f"{stats.pruned_by_screen} after screening; work {stats.work} "
          f"(partition {stats.partition_work}); status {plan.solvers[0].status}")
    print(next(n for n in plan.notes if n.startswith("stage split")))


if __name__ == "__main__":
    main()
