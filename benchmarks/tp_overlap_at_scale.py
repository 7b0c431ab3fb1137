"""Sub-pipelined tensor parallelism (``tp_overlap``) at scale: what the planner would choose,
and where splitting a microbatch pays on GPUs.

1. Plans. For each row of Megatron-LM's Table 1 (arXiv 2104.04473) and for GPT-3 175B on
   1024 A100-80G at global batch 1536 (the cases and graphs of ``chimera_at_scale.py``):
   the search with tp_overlap chosen by the planner (``choose_overlap=True``, what it does
   by default for torch.fx graphs such as these) against the search with one part
   (``choose_overlap=False``), on the same graph and cluster (and GPT-3 again on the slow
   link of item 2). Whether each
   plan chooses chimera or tp_overlap > 1, both simulated steps and the change. (Chimera allowed against left out of the schedules:
   ``chimera_at_scale.py``.)
2. Published configurations. Each Table 1 row with t > 1 at its published t, p, d, 1F1B
   and full recomputation: at micro-batch 1, as published (the parts split the
   sequence), and at micro-batches 2 and 4 (fewer microbatches, the same samples per
   step; the parts split the batch), the simulated step at k = 1, 2 and 4, on the A100's
   NVLink (300 GB/s inside a node) and on a PCIe-class link (``--slow``, default a
   tenth of it: 30 GB/s).

    python benchmarks/tp_overlap_at_scale.py [--rows 1,...,10] [--no-gpt3] [--no-plans]
        [--no-published] [--slow 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from chimera_at_scale import cases, fmt, graph_and_cluster

from tripar.errors import ConfigError
from tripar.partitioner import search_with_stats, step_estimate
from tripar.partitioner.megatron import MEGATRON_TABLE, megatron_flops
from tripar.plan.config import ParallelConfig

PARTS = (1, 2, 4)
MICRO_BATCHES = (1, 2, 4)


def plans(name: str, spec: str, gpus: int, batch: int, slow: float = 1.0) -> str:
    """One markdown row: the plan with tp_overlap chosen, the plan with one part, the change;
    the intra-node bandwidth divided by ``slow``."""
    graph, cluster = graph_and_cluster(spec, gpus)
    if slow != 1:
        cluster = dataclasses.replace(cluster, intra_bandwidth=cluster.intra_bandwidth / slow)
        name = f"{name}, intra / {slow:g}"
    start = time.perf_counter()
    allowed = search_with_stats(graph, cluster, batch, model_spec=spec, choose_overlap=True)[0]
    default = search_with_stats(graph, cluster, batch, model_spec=spec,
                                choose_overlap=False)[0]
    seconds = time.perf_counter() - start
    par = allowed.parallel
    chooses = ", ".join(
        [f"tp_overlap={par.tp_overlap}"] * (par.tp_overlap > 1)
        + ["chimera"] * (par.schedule == "chimera")) or "neither"
    change = allowed.estimate.step_time_s / default.estimate.step_time_s - 1
    return (f"| {name} | {gpus} | {batch} | {fmt(par)} | {allowed.estimate.step_time_s:.3f} | "
            f"{fmt(default.parallel)} | {default.estimate.step_time_s:.3f} | {change:+.2%} | "
            f"{chooses} | {seconds:.0f} |")


def published(index: int, slow: float) -> list[str]:
    """Markdown rows for Table 1 row ``index`` (1-based): its t, p, d at each micro-batch
    size, k = 1, 2, 4, on NVLink and on the intra-node link divided by ``slow``."""
    params, heads, hidden, layers, t, p, gpus, batch, tflops = MEGATRON_TABLE[index - 1]
    name, spec, _, _ = cases(str(index), False)[0]
    graph, fast = graph_and_cluster(spec, gpus)
    links = {"NVLink": fast,
             f"intra / {slow:g}": dataclasses.replace(
                 fast, intra_bandwidth=fast.intra_bandwidth / slow)}
    d = gpus // (t * p)
    flops = megatron_flops(batch, layers, hidden)
    out = []
    for b in MICRO_BATCHES:
        for link, cluster in links.items():
            steps = []
            for k in PARTS:
                try:
                    cfg = ParallelConfig(dp=d, tp=t, pp=p, micro_batch_size=b,
                                         num_microbatches=batch // d // b, schedule="1f1b",
                                         recompute="full", tp_overlap=k)
                except ConfigError:
                    steps.append(None)
                    continue
                est = step_estimate(graph, cluster, cfg, record_timeline=False)
                steps.append((est.step_time_s, est.fits))
            base = steps[0][0]
            cells = []
            for step in steps:
                if step is None:
                    cells.append("no split")
                    continue
                s, fits = step
                cells.append(f"{s:.3f}" + ("" if s == base else f" ({s / base - 1:+.1%})")
                             + ("" if fits else ", over memory"))
            best = min((s for s in steps if s is not None), key=lambda x: x[0])[0]
            out.append(f"| {name} | {t},{p},{d} | {b}x{batch // d // b} | {link} | "
                       + " | ".join(cells)
                       + f" | {flops / best / gpus / 1e12:.0f} (published {tflops}) |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4,5,6,7,8,9,10",
                        help="1-based rows of Megatron-LM's Table 1, comma-separated")
    parser.add_argument("--no-gpt3", action="store_true", help="leave out GPT-3 175B")
    parser.add_argument("--no-plans", action="store_true", help="leave out the searches")
    parser.add_argument("--no-published", action="store_true",
                        help="leave out the published configurations")
    parser.add_argument("--slow", type=float, default=10.0,
                        help="divide the intra-node bandwidth by this for the slow link")
    args = parser.parse_args()
    if not args.no_plans:
        print("| model | GPUs | batch | plan (tp_overlap chosen) | step s | plan with one "
              "part | step s | change | chooses | search s |")
        print("|---|---:|---:|---|---:|---|---:|---:|---|---:|")
        for case in cases(args.rows, not args.no_gpt3):
            print(plans(*case), flush=True)
        for case in cases("", not args.no_gpt3):   # and on the slow link
            print(plans(*case, slow=args.slow), flush=True)
        print()
    if not args.no_published:
        print("| row | t,p,d | micro-batch x m | link | k=1 step s | k=2 | k=4 | best TFLOP/s "
              "per GPU |")
        print("|---|---|---|---|---:|---:|---:|---:|")
        for i in (int(x) for x in args.rows.split(",") if x):
            if MEGATRON_TABLE[i - 1][4] > 1:   # t > 1: there are collectives to overlap
                print("\n".join(published(i, args.slow)), flush=True)


if __name__ == "__main__":
    main()
