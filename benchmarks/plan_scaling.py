"""Search time against the number of layers and the number of devices.

Uses the hand-built GPT-like proxy graph (``tripar.partitioner.examples``, hidden 4096,
32 heads, sequence 2048, vocabulary 51200) so that the graph costs nothing to build,
and prints two markdown tables (wall seconds and counted work: partition cells and
evaluations, simulated actions, screened candidates) and writes
``benchmarks/results/plan_scaling.png``.

    python benchmarks/plan_scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tripar.partitioner import search_with_stats
from tripar.partitioner.examples import example_graph
from tripar.partitioner.hardware import Cluster

RESULTS = Path(__file__).resolve().parent / "results"


def run(layers: int, devices: int, batch: int) -> tuple[float, int, str]:
    graph = example_graph(layers=layers, hidden=4096, seq=2048, vocab=51200, heads=32)
    gpn = min(8, devices)
    cluster = Cluster.builtin("a100-80g", nodes=devices // gpn, gpus_per_node=gpn)
    start = time.perf_counter()
    plan, stats = search_with_stats(graph, cluster, batch)
    par = plan.parallel
    return (time.perf_counter() - start, stats.work,
            f"dp{par.dp} tp{par.tp} pp{par.pp} v{par.vpp} b{par.micro_batch_size}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points")
    args = parser.parse_args()
    layer_points = (12, 32, 64, 128) if args.quick else (12, 24, 32, 48, 64, 96, 128)
    device_points = (8, 64, 512, 4096) if args.quick else (8, 32, 128, 512, 1024, 4096)
    by_layers = [(n, *run(n, 256, 1024)) for n in layer_points]
    by_devices = [(d, *run(48, d, max(512, d))) for d in device_points]
    print("## Search time against layers (256 x a100-80g, global batch 1024)\n")
    print("| layers | search s | work | plan |\n|---:|---:|---:|---|")
    for n, sec, work, plan in by_layers:
        print(f"| {n} | {sec:.2f} | {work} | {plan} |")
    print("\n## Search time against devices (48 layers, global batch max(512, devices))\n")
    print("| devices | search s | work | plan |\n|---:|---:|---:|---|")
    for d, sec, work, plan in by_devices:
        print(f"| {d} | {sec:.2f} | {work} | {plan} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r[0] for r in by_layers], [r[1] for r in by_layers], "o-")
    left.set(xlabel="identical layers", ylabel="search time (s)",
             title="256 devices, batch 1024")
    right.plot([r[0] for r in by_devices], [r[1] for r in by_devices], "o-")
    right.set(xscale="log", xlabel="devices", ylabel="search time (s)", title="48 layers")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "plan_scaling.png"
    fig.savefig(out, dpi=120)
    print(f"\nplot: {out}")


if __name__ == "__main__":
    main()
