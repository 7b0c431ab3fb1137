"""Fit the GPU efficiency curve to the Megatron-LM weak-scaling table and write
``tripar/partitioner/calibration.json``.

Table 1 of Narayanan et al. (arXiv 2104.04473, shared/REFERENCE.md): GPT
models on A100 80GB nodes of 8, sequence 2048, vocabulary 51200, full
activation recomputation, FLOPs counted with the 96-factor formula. For each
row the proxy graph of the zoo ``gpt`` is built on the meta device, costed
with t, p, d, the batch, microbatch 1, full recomputation and 1F1B, and
simulated; the predicted TFLOP/s per GPU is formula FLOPs / step time / GPUs.
The fit (``tripar.partitioner.calibrate_fit.fit_efficiency``) minimises the squared
log error over the rows with Nelder-Mead on (matmul_max, matmul_half), and
memory_traffic with ``--fit-traffic``; the other fields stay at the values in the
file. memory_traffic is kept at 1 by default: every byte saved for backward is
written once by the forward (and read by the backward); fitting it drives it to
about 0 with no better error, since the size curve already charges small models.

    python benchmarks/fit_calibration.py                  # fit on all rows, write the JSON
    python benchmarks/fit_calibration.py --leave-one-out  # each row from a fit without it
    python benchmarks/fit_calibration.py --check          # predict with the shipped numbers

``tests/partitioner/test_calibration.py`` runs the same leave-one-out
(``test_leave_one_out``) and refits the shipped curve.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from tripar.graph import analyze
from tripar.models import load_model
from tripar.partitioner.calibrate_fit import CalibrationRun, fit_efficiency, leave_one_out
from tripar.partitioner.hardware import Efficiency, load_calibration
from tripar.partitioner.megatron import MEGATRON_TABLE, MEGATRON_WEIGHTS, gpt_spec, table_run

CALIBRATION = Path(__file__).resolve().parents[1] / "tripar" / "partitioner" / "calibration.json"


def build_runs(rows=MEGATRON_TABLE) -> list[CalibrationRun]:
    """Each row with the proxy graph of its zoo gpt (meta device, batch 1)."""
    runs = []
    for row in rows:
        loaded = load_model(gpt_spec(*row[1:4]), batch_size=1, device="meta")
        loaded.model.to(MEGATRON_WEIGHTS)   # half precision, as Megatron-LM holds it
        graph = analyze(loaded.model, loaded.example_inputs, loaded.example_kwargs,
                        model_config=loaded.config)
        runs.append(table_run(row, graph))
    return runs


def report(runs, predicted, label: str) -> list[dict]:
    out = []
    for run, value in zip(runs, predicted):
        config = run.config
        error = value / run.published - 1
        out.append({"params_b": float(run.name.removesuffix("B")), "t": config.tp,
                    "p": config.pp, "gpus": config.devices,
                    "batch": config.global_batch_size, "published": int(run.published),
                    "predicted": round(value, 1), "error": round(error, 4)})
        print(f"{label:8} {run.name:>8} t={config.tp} p={config.pp:2} d={config.dp:3}"
              f"  predicted {value:6.1f}  published {run.published:g}  "
              f"error {100 * error:+5.1f}%")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leave-one-out", action="store_true",
                        help="predict each row from a fit to the other nine (does not write)")
    parser.add_argument("--check", action="store_true", help="predict with the shipped numbers")
    parser.add_argument("--fit-traffic", action="store_true",
                        help="fit memory_traffic too (default: keep the file's value)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    runs = build_runs()
    print(f"built {len(runs)} proxy graphs in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    data = load_calibration()
    base = Efficiency.from_dict(data["efficiency"]["gpu"])
    if args.check:
        report(runs, [run.predict(base) for run in runs], "shipped")
        return 0
    if args.leave_one_out:
        predicted = leave_one_out(runs, base, fit_traffic=args.fit_traffic)
        rows = report(runs, predicted, "held-out")
        print(f"largest held-out error {100 * max(abs(r['error']) for r in rows):.1f}%")
        return 0
    fit = fit_efficiency(runs, base, fit_traffic=args.fit_traffic)
    print(f"fit: squared log error {fit.loss:.5f} ({fit.rounds} rounds)", file=sys.stderr)
    eff = replace(fit.efficiency, matmul_max=round(fit.efficiency.matmul_max, 4),
                  matmul_half=round(fit.efficiency.matmul_half, 2),
                  memory_traffic=round(fit.efficiency.memory_traffic, 3),
                  source="benchmarks/fit_calibration.py: Megatron-LM Table 1 "
                         "(arXiv 2104.04473), 10 rows")
    rows_out = report(runs, [run.predict(eff) for run in runs], "fitted")
    data["efficiency"]["gpu"] = eff.to_dict()
    data["megatron_fit"] = rows_out
    CALIBRATION.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {CALIBRATION} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
