"""What selective recomputation changes at scale: the Korthikanti et al. runs (arXiv
2205.05198; A100-80G nodes of 8, sequence 2048, vocabulary 51200, microbatch 1, dp 1,
1F1B), published configuration and tripar's own plan, with and without it.

Each row's zoo ``gpt`` graph is built with ``attention=eager``: the attention written
out, as Megatron-LM ran it in 2022 (no fused kernel), so the graph keeps the
``a s^2 b`` score and probability tensors and ``tripar.graph.selective`` finds the core.
On that graph, one cost model for all:

- ``published none`` / ``published selective``: the published t and p, uniform split,
  no recomputation, or selective recomputation on every stage (what the published runs
  did, sequence parallelism aside): MFU and the peak memory of the busiest rank.
- ``tripar``: ``search`` with nothing pinned (per stage: none, selective, blocks
  recomputed whole, or both), its MFU and the granularities its stages use.
- ``tripar, no selective``: the same search with each stage limited to none or whole
  blocks (``recompute`` choices ``none``/``full``/``stage-aware`` on a graph whose blocks
  carry no selective segments): what the search found before.

MFU counts Megatron's model FLOPs (the 72 factor) over the simulated step.

    python benchmarks/korthikanti_selective.py [--rows 1,2,3,4] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from tripar.commands._model_args import proxy_graph_for
from tripar.partitioner import search, step_estimate
from tripar.partitioner.hardware import Cluster
from tripar.partitioner.megatron import (
    A100_PEAK_TFLOPS,
    KORTHIKANTI_RUNS,
    MEGATRON_WEIGHTS,
    SEQ,
    VOCAB,
    model_flops,
)
from tripar.plan.config import ParallelConfig


def _mfu(flops: float, step_s: float, gpus: int) -> float:
    return flops / step_s / gpus / (A100_PEAK_TFLOPS * 1e12)


def _plan_line(plan, flops: float, gpus: int) -> str:
    par = plan.parallel
    kinds = sorted({st.granularity.split("+")[0] if "/" not in st.granularity
                    else st.granularity for st in plan.stages})
    shown = kinds if len(kinds) <= 4 else [*kinds[:3], f"... ({len(kinds)} kinds)"]
    return (f"{_mfu(flops, plan.estimate.step_time_s, gpus):.1%} (dp{par.dp} tp{par.tp} "
            f"pp{par.pp} v{par.vpp} b{par.micro_batch_size} {par.schedule}; stages: "
            f"{', '.join(shown)})")


def row(index: int) -> str:
    name, heads, hidden, layers, t, p, gpus, batch, mfu, _ = KORTHIKANTI_RUNS[index]
    spec = (f"gpt:layers={layers},hidden={hidden},heads={heads},vocab={VOCAB},seq={SEQ},"
            "attention=eager")
    start = time.perf_counter()
    graph = proxy_graph_for(spec, batch_size=1, seq_len=SEQ, weights_dtype=MEGATRON_WEIGHTS)
    graph_s = time.perf_counter() - start
    cluster = Cluster.builtin("a100-80g", nodes=max(1, gpus // 8), gpus_per_node=8)
    flops = model_flops(batch, layers, hidden)
    cells = [name, str(gpus), f"{mfu:.1f}%"]
    for recompute in ("none", "selective"):
        cfg = ParallelConfig(dp=1, tp=t, pp=p, micro_batch_size=1, num_microbatches=batch,
                             schedule="1f1b", recompute=recompute)
        est = step_estimate(graph, cluster, cfg, record_timeline=False)
        peak = f"{est.peak_memory_bytes / 2**30:.1f} GiB"
        cells.append(f"{_mfu(flops, est.step_time_s, gpus):.1%}, {peak}"
                     if est.fits else f"does not fit: {peak}")
    start = time.perf_counter()
    cells.append(_plan_line(search(graph, cluster, batch, model_spec=spec), flops, gpus))
    search_s = time.perf_counter() - start
    plain = dataclasses.replace(graph, blocks=[
        dataclasses.replace(b, selective_nodes=(), selective_bytes=0, selective_flops=0,
                            selective_ops=0) for b in graph.blocks])
    cells.append(_plan_line(search(plain, cluster, batch, model_spec=spec), flops, gpus))
    cells.append(f"{graph_s:.0f} / {search_s:.1f}")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4", help="1-based rows, comma-separated")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    lines = ["| model | GPUs | published MFU | published config, none | published config, "
             "selective | tripar | tripar, no selective | graph / search s |",
             "|---|---:|---:|---|---|---|---|---:|"]
    print("\n".join(lines), flush=True)
    for i in (int(x) for x in args.rows.split(",")):
        lines.append(row(i - 1))
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
