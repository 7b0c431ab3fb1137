"""Chimera at scale: which of the planner's plans choose it, and what it changes.

For each row of Megatron-LM's Table 1 (arXiv 2104.04473) and for GPT-3 175B on 1024
A100-80G at global batch 1536: the search as it runs now (Chimera among the schedules)
and the same search with Chimera left out of its schedules (the search before Chimera
existed), on the same graph and cluster. Prints both plans and their simulated steps,
and, at the degrees and microbatches of the plan without Chimera (one stage per rank and
pipeline), Chimera's own step and per-device peak memory there (``step_estimate`` on the
uniform split, stage-aware recomputation where that plan recomputed nothing), where its
even-pp and even-microbatch rule allows it: what Chimera would do in place of the
winning schedule, and why it wins or loses.

    python benchmarks/chimera_at_scale.py [--rows 1,2,3] [--no-gpt3]
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import replace

from tripar.commands._model_args import proxy_graph_for
from tripar.partitioner import search_with_stats, step_estimate
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.megatron import MEGATRON_TABLE, MEGATRON_WEIGHTS, SEQ, VOCAB
from tripar.partitioner.plan_search import space

GPT3 = ("GPT-3 175B", "gpt:layers=96,hidden=12288,heads=96,vocab=51200,seq=2048", 1024, 1536)


def _without_chimera(graph, cluster, batch, spec):
    """The search with chimera left out of the schedules it tries."""
    kept = space.SCHEDULES
    space.SCHEDULES = tuple(s for s in kept if s != "chimera")
    try:
        return search_with_stats(graph, cluster, batch, model_spec=spec)[0]
    finally:
        space.SCHEDULES = kept


def fmt(par) -> str:
    """A configuration in one short line (sequence parallelism and tp_overlap when on)."""
    return (f"dp{par.dp} tp{par.tp} pp{par.pp} v{par.vpp} b{par.micro_batch_size}x"
            f"{par.num_microbatches} {par.schedule} {par.recompute} z{par.zero}"
            + (" sp" if par.sp else "") + (f" k{par.tp_overlap}" if par.tp_overlap > 1 else ""))


def cases(rows: str, gpt3: bool) -> list[tuple[str, str, int, int]]:
    """(name, model spec, GPUs, global batch) of the 1-based ``rows`` of Megatron-LM's
    Table 1 (comma-separated) and, with ``gpt3``, of GPT-3 175B."""
    out = []
    for i in (int(x) for x in rows.split(",") if x):
        params, heads, hidden, layers, _t, _p, gpus, batch = MEGATRON_TABLE[i - 1][:8]
        out.append((f"row {i}: {params}B", f"gpt:layers={layers},hidden={hidden},heads="
                    f"{heads},vocab={VOCAB},seq={SEQ}", gpus, batch))
    return out + ([GPT3] if gpt3 else [])


@functools.cache
def graph_and_cluster(spec: str, gpus: int):
    """The proxy graph of ``spec`` (batch 1, tp degrees 2, 4 and 8) and ``gpus`` A100-80G
    in nodes of 8; built once per process."""
    graph = proxy_graph_for(spec, batch_size=1, seq_len=SEQ, tp_degrees=(2, 4, 8),
                            weights_dtype=MEGATRON_WEIGHTS)
    return graph, Cluster.builtin("a100-80g", nodes=gpus // 8, gpus_per_node=8)


def compare(name: str, spec: str, gpus: int, batch: int) -> dict:
    """Both searches and Chimera at the degrees of the plan without it."""
    graph, cluster = graph_and_cluster(spec, gpus)
    start = time.perf_counter()
    now = search_with_stats(graph, cluster, batch, model_spec=spec)[0]
    before = _without_chimera(graph, cluster, batch, spec)
    par = before.parallel
    there = None
    if par.pp > 1 and par.pp % 2 == 0 and par.num_microbatches % 2 == 0:
        cfg = replace(par, schedule="chimera", vpp=1,  # one stage per pipeline per rank
                      recompute="stage-aware" if par.recompute == "none" else par.recompute)
        there = step_estimate(graph, cluster, cfg, record_timeline=False)
    return {"name": name, "gpus": gpus, "batch": batch, "now": now, "before": before,
            "there": there, "seconds": time.perf_counter() - start}


def row_markdown(got: dict) -> str:
    now, before, there = got["now"], got["before"], got["there"]
    change = now.estimate.step_time_s / before.estimate.step_time_s - 1
    if there is None:
        at = "not allowed (pp=1, or an odd pp or microbatch count)"
    else:
        fits = "fits" if there.fits else "over memory"
        at = (f"{there.step_time_s:.3f} s ({there.step_time_s / before.estimate.step_time_s - 1:+.1%}), "
              f"peak {there.peak_memory_bytes / 1e9:.1f} GB ({fits}) vs "
              f"{before.estimate.peak_memory_bytes / 1e9:.1f} GB, bubble "
              f"{there.bubble_fraction:.1%} vs {before.estimate.bubble_fraction:.1%}")
    return (f"| {got['name']} | {got['gpus']} | {got['batch']} | {fmt(now.parallel)} | "
            f"{now.estimate.step_time_s:.3f} | {fmt(before.parallel)} | "
            f"{before.estimate.step_time_s:.3f} | {change:+.2%} | {at} | "
            f"{got['seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4,5,6,7,8,9,10",
                        help="1-based rows of Megatron-LM's Table 1, comma-separated")
    parser.add_argument("--no-gpt3", action="store_true", help="leave out GPT-3 175B")
    args = parser.parse_args()
    print("| model | GPUs | batch | plan (chimera allowed) | step s | plan without chimera | "
          "step s | change | chimera at the degrees without it | search s |")
    print("|---|---:|---:|---|---:|---|---:|---:|---|---:|")
    for case in cases(args.rows, not args.no_gpt3):
        print(row_markdown(compare(*case)), flush=True)


if __name__ == "__main__":
    main()
