"""Fit the GPU efficiency curve to the Megatron-LM weak-scaling table and write
``tripar/partitioner/calibration.json``.

Table 1 of Narayanan et al. (arXiv 2104.04473, shared/REFERENCE.md): GPT
models on A100 80GB nodes of 8, sequence 2048, vocabulary 51200, full
activation recomputation, FLOPs counted with the 96-factor formula. For each
row the proxy graph of the zoo ``gpt`` is built on the meta device, costed
with t, p, d, the batch, microbatch 1, full recomputation and 1F1B, and
simulated; the predicted TFLOP/s per GPU is formula FLOPs / step time / GPUs.
The fit minimises the squared log error over the rows with Nelder-Mead on
(matmul_max, matmul_half), and memory_traffic with ``--fit-traffic``; the
other fields stay at the values in the file. memory_traffic is kept at 1 by
default: every byte saved for backward is written once by the forward (and
read by the backward); fitting it drives it to about 0 with no better error,
since the size curve already charges small models.

    python benchmarks/fit_calibration.py              # fit on all rows, write the JSON
    python benchmarks/fit_calibration.py --holdout    # fit on even rows, report odd rows
    python benchmarks/fit_calibration.py --check      # predict with the shipped numbers
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

from tripar.graph import analyze
from tripar.models import load_model
from tripar.partitioner import step_estimate
from tripar.partitioner.hardware import Cluster, Efficiency, load_calibration
from tripar.partitioner.megatron import MEGATRON_TABLE, SEQ, VOCAB, megatron_flops
from tripar.plan.config import ParallelConfig

CALIBRATION = Path(__file__).resolve().parents[1] / "tripar" / "partitioner" / "calibration.json"



def build_graphs(rows=MEGATRON_TABLE) -> list:
    """Proxy graphs of the zoo gpt for each row, on meta, batch 1."""
    graphs = []
    for _, heads, hidden, layers, *_ in rows:
        spec = f"gpt:layers={layers},hidden={hidden},heads={heads},vocab={VOCAB},seq={SEQ}"
        loaded = load_model(spec, batch_size=1, device="meta")
        graphs.append(analyze(loaded.model, loaded.example_inputs, loaded.example_kwargs,
                              model_config=loaded.config))
    return graphs


def predict(row, graph, efficiency: Efficiency | None = None) -> float:
    """Predicted TFLOP/s per GPU for one table row."""
    _, _, hidden, layers, t, p, gpus, batch, _ = row
    d = gpus // (t * p)
    cluster = Cluster.builtin("a100-80g", nodes=gpus // 8, gpus_per_node=8)
    if efficiency is not None:
        cluster = replace(cluster, device=replace(cluster.device, efficiency=efficiency))
    config = ParallelConfig(dp=d, tp=t, pp=p, micro_batch_size=1, num_microbatches=batch // d,
                            schedule="1f1b", recompute="full")
    estimate = step_estimate(graph, cluster, config, record_timeline=False)
    return megatron_flops(batch, layers, hidden) / estimate.step_time_s / gpus / 1e12


def nelder_mead(f, x0, steps, iterations=120, tolerance=1e-7):
    """Minimise f from x0 (a small, dependency-free Nelder-Mead)."""
    simplex = [list(x0)] + [[x + (s if i == j else 0) for j, x in enumerate(x0)]
                            for i, s in enumerate(steps)]
    values = [f(x) for x in simplex]
    for _ in range(iterations):
        order = sorted(range(len(simplex)), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < tolerance:
            break
        centroid = [sum(col) / (len(simplex) - 1) for col in zip(*simplex[:-1])]

        def towards(scale, centroid=centroid, worst=simplex[-1]):
            return [c + scale * (w - c) for c, w in zip(centroid, worst)]

        reflected = towards(-1.0)
        fr = f(reflected)
        if fr < values[0]:
            expanded = towards(-2.0)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = towards(0.5)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (x - b) for b, x in zip(best, p)]
                                    for p in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    i = min(range(len(simplex)), key=values.__getitem__)
    return simplex[i], values[i]


def fit(rows, graphs, base: Efficiency, *, fit_traffic: bool = False) -> Efficiency:
    """Least squared log error over ``rows``: (matmul_max, log matmul_half), and
    memory_traffic too with ``fit_traffic`` (else it stays at ``base``'s value)."""
    def make(x) -> Efficiency | None:
        e_max, log_half = x[0], x[1]
        traffic = x[2] if fit_traffic else base.memory_traffic
        if not 0.05 < e_max <= 1.0 or traffic < 0 or not -2 < log_half < 9:
            return None
        return replace(base, matmul_max=e_max, matmul_half=math.exp(log_half),
                       memory_traffic=traffic)

    def loss(x) -> float:
        eff = make(x)
        if eff is None:
            return 1e9
        return sum(math.log(predict(r, g, eff) / r[-1]) ** 2 for r, g in zip(rows, graphs))

    x0 = [base.matmul_max, math.log(max(base.matmul_half, 1.0))]
    steps = [0.1, 1.0]
    if fit_traffic:
        x0, steps = x0 + [base.memory_traffic], steps + [1.0]
    best, value = nelder_mead(loss, x0, steps=steps)
    print(f"fit: squared log error {value:.5f}", file=sys.stderr)
    return make(best)


def report(rows, graphs, eff: Efficiency, label: str) -> list[dict]:
    out = []
    for row, graph in zip(rows, graphs):
        predicted = predict(row, graph, eff)
        out.append({"params_b": row[0], "t": row[4], "p": row[5], "gpus": row[6],
                    "batch": row[7], "published": row[8], "predicted": round(predicted, 1),
                    "error": round(predicted / row[8] - 1, 4)})
        print(f"{label:8} {row[0]:7.1f}B t={row[4]} p={row[5]:2} d={row[6] // (row[4] * row[5]):3}"
              f"  predicted {predicted:6.1f}  published {row[8]}  "
              f"error {100 * (predicted / row[8] - 1):+5.1f}%")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holdout", action="store_true",
                        help="fit on rows 0, 2, 4, ... and report the others (does not write)")
    parser.add_argument("--check", action="store_true", help="predict with the shipped numbers")
    parser.add_argument("--fit-traffic", action="store_true",
                        help="fit memory_traffic too (default: keep the file's value)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    graphs = build_graphs()
    print(f"built {len(graphs)} proxy graphs in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    data = load_calibration()
    base = Efficiency.from_dict(data["efficiency"]["gpu"])
    rows = list(MEGATRON_TABLE)
    if args.check:
        report(rows, graphs, base, "shipped")
        return 0
    if args.holdout:
        train = [i for i in range(len(rows)) if i % 2 == 0]
        test = [i for i in range(len(rows)) if i % 2 == 1]
        eff = fit([rows[i] for i in train], [graphs[i] for i in train], base,
                  fit_traffic=args.fit_traffic)
        print(f"fitted on {len(train)} rows: {eff}")
        report([rows[i] for i in train], [graphs[i] for i in train], eff, "fitted")
        report([rows[i] for i in test], [graphs[i] for i in test], eff, "held-out")
        return 0
    eff = fit(rows, graphs, base, fit_traffic=args.fit_traffic)
    eff = replace(eff, matmul_max=round(eff.matmul_max, 4),
                  matmul_half=round(eff.matmul_half, 2),
                  memory_traffic=round(eff.memory_traffic, 3),
                  source="benchmarks/fit_calibration.py: Megatron-LM Table 1 "
                         "(arXiv 2104.04473), 10 rows")
    rows_out = report(rows, graphs, eff, "fitted")
    data["efficiency"]["gpu"] = eff.to_dict()
    data["megatron_fit"] = rows_out
    CALIBRATION.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {CALIBRATION} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
