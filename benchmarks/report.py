"""Write benchmarks/results/REPORT.md: measured, simulated at scale, planner cost.

Runs, in order (the measured part first, on a machine left otherwise idle):

1. ``pipeline_vs_torch.run_all``: ``tripar calibrate`` (the CPU profile), then tripar's
   runtime against ``torch.distributed.pipelining`` and single-process training on 2 CPU
   processes, and one transformer block against the cost model;
2. ``ddp_vs_tripar.measure``: tripar's data parallelism (the default plan at dp=2, and
   each ZeRO stage pinned) against torch's ``DistributedDataParallel``, on the same profile;
3. ``simulated_at_scale.run_all``: tripar's plans against Megatron-LM's published
   configurations and naive baselines, GPT 1.7B to 1T; the schedules at fixed degrees;
4. ``plan_scaling.py`` (planner cost against layers and devices), in a subprocess.

Every figure in the report has, above it, the one command that regenerates it.
``tripar bench [--quick] [--out DIR]`` calls :func:`generate`.

    python benchmarks/report.py [--quick] [--out DIR] [--no-calibrate]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import ddp_vs_tripar as ddp_bench  # noqa: E402
import pipeline_vs_torch as measured_bench  # noqa: E402
import simulated_at_scale as scale_bench  # noqa: E402

WITHIN = 0.20
"""Measured step time must be within this share of the simulated one."""
IDEAL_SHARE = 0.85
"""tripar's pp=2 tokens/s must reach this share of the ideal."""
DDP_SHARE = 0.98
"""tripar's default data-parallel plan must reach this share of torch DDP's tokens/s."""


def _rel(path: Path) -> str:
    try:
        return os.path.relpath(path, Path.cwd())
    except ValueError:
        return str(path)


def _out_flag(out: Path) -> str:
    return "" if out.resolve() == RESULTS.resolve() else f" --out {_rel(out)}"


def planner_cost(out: Path, quick: bool) -> tuple[str, str]:
    """Markdown of ``plan_scaling.py`` (run in a subprocess) and the command that makes its
    figure; the figure is copied into ``out`` when the script writes it elsewhere."""
    script = HERE / "plan_scaling.py"
    if not script.exists():
        return _own_planner_cost(out, quick), f"python {_rel(HERE / 'report.py')}"
    command = [sys.executable, str(script), *(["--quick"] if quick else [])]
    made = RESULTS / "plan_scaling.png"  # where the script always writes its figure
    elsewhere = made.resolve() != (out / "plan_scaling.png").resolve()
    kept = made.read_bytes() if elsewhere and made.exists() else None
    try:
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        if elsewhere and made.exists():
            shutil.copyfile(made, out / "plan_scaling.png")
    finally:
        if kept is not None:  # leave the committed figure as it was
            made.write_bytes(kept)
    text = "\n".join(line for line in done.stdout.splitlines()
                     if not line.startswith("plot:")).strip()
    text = re.sub(r"^## ", "#### ", text, flags=re.M)
    return text + "\n", f"python {_rel(script)}{' --quick' if quick else ''}"


def _own_planner_cost(out: Path, quick: bool) -> str:
    """A small search-time table and plot, for when plan_scaling.py is absent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tripar.partitioner import search
    from tripar.partitioner.examples import example_graph
    from tripar.partitioner.hardware import Cluster

    points = [(12, 8), (32, 64), (64, 512), (128, 4096)] if quick else [
        (12, 8), (24, 32), (48, 128), (64, 512), (96, 1024), (128, 4096)]
    rows = []
    for layers, devices in points:
        graph = example_graph(layers=layers, hidden=4096, seq=2048, vocab=51200, heads=32)
        gpn = min(8, devices)
        cluster = Cluster.builtin("a100-80g", nodes=devices // gpn, gpus_per_node=gpn)
        start = time.perf_counter()
        search(graph, cluster, max(512, devices))
        rows.append((layers, devices, time.perf_counter() - start))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([f"{n}L/{d}" for n, d, _ in rows], [s for _, _, s in rows], "o-")
    ax.set(xlabel="layers / devices", ylabel="search s")
    fig.tight_layout()
    fig.savefig(out / "plan_scaling.png", dpi=110)
    plt.close(fig)
    return "| layers | devices | search s |\n|---:|---:|---:|\n" + "".join(
        f"| {n} | {d} | {s:.2f} |\n" for n, d, s in rows)


def _figure(command: str, name: str, alt: str) -> str:
    return f"Regenerate: `{command}`\n\n![{alt}]({name})\n"


def _verdict(ok: bool) -> str:
    return "**yes**" if ok else "**no**"


def _headline_rows(m, run: str) -> list[str]:
    """The Must-show claims of one measured run, as table rows."""
    cfg = m.config
    ratio_1f1b = m.get("tripar 1f1b").tokens_per_s / m.get("torch 1f1b").tokens_per_s
    ratio_gpipe = m.get("tripar gpipe").tokens_per_s / m.get("torch gpipe").tokens_per_s
    ideal = m.get("tripar 1f1b").tokens_per_s / m.ideal_tokens_per_s
    scp = (m.get("tripar scp stage-aware").tokens_per_s
           / m.get("tripar 1f1b full-recompute").tokens_per_s)
    sims = [(s.name, s.median_s / s.predicted_s) for s in m.systems if s.predicted_s]
    worst = max(sims, key=lambda x: abs(x[1] - 1.0))
    cpu_ratio = m.get("torch 1f1b").median_cpu_s / m.get("tripar 1f1b").median_cpu_s
    single_cpu_ratio = m.get("single").median_cpu_s / m.get("single").predicted_s
    band = f"{1 - WITHIN:.2f}..{1 + WITHIN:.2f}"
    return [*_chimera_rows(m, run), *_tp_overlap_rows(m, run),
        f"| tripar / torch.distributed.pipelining, 1F1B, pp=2, same stages and microbatches "
        f"(tokens/s) | {run} | {ratio_1f1b:.3f} | >= 1.0 | {_verdict(ratio_1f1b >= 1.0)} |",
        f"| tripar / torch.distributed.pipelining, GPipe (tokens/s) | {run} | "
        f"{ratio_gpipe:.3f} | >= 1.0 | {_verdict(ratio_gpipe >= 1.0)} |",
        f"| tripar 1F1B / ideal (2 x single-process x m/(m+1), m={cfg.num_microbatches}) | "
        f"{run} | {ideal:.3f} | >= {IDEAL_SHARE} | {_verdict(ideal >= IDEAL_SHARE)} |",
        f"| torch / tripar busiest-rank CPU s per step, 1F1B (runtime overhead, load-free) | "
        f"{run} | {cpu_ratio:.3f} | >= 1.0 | {_verdict(cpu_ratio >= 1.0)} |",
        f"| tripar scp with stage-aware recomputation / 1F1B with full recomputation "
        f"(tokens/s) | {run} | {scp:.3f} | > 1 | {_verdict(scp > 1.0)} |",
        f"| measured / simulated step time, worst system ({worst[0]}) | {run} | "
        f"{worst[1]:.2f} | {band} | {_verdict(abs(worst[1] - 1) <= WITHIN)} |",
        f"| measured / simulated step time, every system | {run} | "
        f"{', '.join(f'{r:.2f}' for _, r in sims)} | {band} | "
        f"{sum(abs(r - 1) <= WITHIN for _, r in sims)} of {len(sims)} |",
        f"| single process: busiest-rank CPU s / simulated | {run} | {single_cpu_ratio:.2f} | "
        f"{band} | {_verdict(abs(single_cpu_ratio - 1) <= WITHIN)} |",
    ]


def _chimera_rows(m, run: str) -> list[str]:
    """Chimera against 1F1B at pp=2 (runs made before chimera was measured have none)."""
    return _pair_rows(m, run, "tripar chimera", "tripar 1f1b",
                      "tripar chimera / tripar 1f1b, pp=2, same microbatches (tokens/s): "
                      "measured, simulated (reported, no target: see the note under section 1)",
                      "chimera and 1f1b")


def _pair_rows(m, run: str, new: str, base: str, claim: str, pair: str) -> list[str]:
    """System ``new`` against ``base``: the measured tokens/s ratio and the simulator's
    (reported, no target), and each one's measured / simulated step; none when the run
    did not measure both."""
    names = {s.name for s in m.systems}
    if not {new, base} <= names:
        return []
    one, other = m.get(new), m.get(base)
    measured = one.tokens_per_s / other.tokens_per_s
    simulated = other.predicted_s / one.predicted_s
    return [
        f"| {claim} | {run} | {measured:.3f}, {simulated:.3f} | - | - |",
        f"| measured / simulated step time, {pair} | {run} | "
        f"{one.median_s / one.predicted_s:.2f}, {other.median_s / other.predicted_s:.2f} | "
        f"{1 - WITHIN:.2f}..{1 + WITHIN:.2f} | "
        f"{sum(abs(s.median_s / s.predicted_s - 1) <= WITHIN for s in (one, other))} of 2 |",
    ]


def _ddp_rows(run, where: str) -> list[str]:
    """The default data-parallel plan against torch DDP: measured tokens/s ratio and the
    simulator's ratio of that plan to the same plan at ZeRO-0 (DDP's algorithm)."""
    measured = run.ratio("tripar default")
    simulated = run.simulated_ratio("tripar default")
    return [
        f"| tripar default plan / torch DistributedDataParallel, dp=2, same model and "
        f"microbatches (tokens/s): measured; simulated against the plan at ZeRO-0 ({where}: "
        f"{run.plans['tripar default']}) | {where} | {measured:.3f}; "
        f"{'-' if simulated is None else f'{simulated:.3f}'} | >= {DDP_SHARE} | "
        f"{_verdict(measured >= DDP_SHARE)} |",
    ]


def _ddp_section(out: Path, ddp, quick: bool) -> list[str]:
    """Section 2: the data-parallel table (``ddp``: (DDPConfig, Run), or None: not run)."""
    if ddp is None:
        return []
    cfg, run = ddp
    flags = " --quick" if quick else ""
    if out.resolve() != RESULTS.resolve():
        flags += f" --profile {_rel(out / 'cpu_profile.json')} --out {_rel(out / 'DDP.md')}"
    return ["## 2. Measured: data parallelism against torch DistributedDataParallel", "",
            ddp_bench.__doc__.split("\n\n", 1)[1].split("\n    python")[0].strip(), "",
            ddp_bench.markdown(cfg, [run], title="", command=(
                f"python {_rel(HERE / 'ddp_vs_tripar.py')} --repeats 1{flags}")),
            f"More runs, each a fresh launch: "
            f"[DDP.md]({os.path.relpath(RESULTS / 'DDP.md', out.resolve())}).", ""]


def _tp_overlap_rows(m, run: str) -> list[str]:
    """Sub-pipelined tensor parallelism (two parts) against whole microbatches at tp=2."""
    return _pair_rows(m, run, "tripar tp=2 tp-overlap=2", "tripar tp=2",
                      "tripar tp=2 in 2 parts / whole microbatches (Merak's sub-pipelined TP; "
                      "tokens/s): measured, simulated (reported, no target: gloo's "
                      "communication thread competes with compute for 2 cores)",
                      "tp=2 in 2 parts and whole")


def write_report(out: Path, *, quick: bool, measurement, check, rows_md: str, sched_md: str,
                 scaling_md: str, scaling_cmd: str, wall_s: float, ddp=None) -> Path:
    """Assemble REPORT.md from the parts (pure formatting: nothing is measured here).
    ``ddp``: (DDPConfig, Run) of the data-parallel measurement, or None."""
    m = measurement
    flag = _out_flag(out)
    quick_flag = " --quick" if quick else ""
    load = "/".join(f"{x:.2f}" for x in m.load_before)
    lines = [
        "# tripar benchmark report", "",
        f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on "
        f"{platform.node()} ({m.cpu}), Python {platform.python_version()}, torch "
        f"{m.torch_version}; {'`--quick` (smoke-test sizes)' if quick else 'full run'} "
        f"in {wall_s:.0f} s. Load average (1/5/15 min) when the measured part started: "
        f"{load}. With a load above the core count other processes share the cores, so "
        f"wall-clock numbers of the measured part are noisy and the 2-process runs suffer "
        f"more than the 1-process baseline; the busiest-rank CPU seconds are given beside "
        f"them.", "",
        f"Regenerate everything (about 5 min on 2 busy cores; `--quick` about 1 min): "
        f"`tripar bench{quick_flag}{flag}` (or `python benchmarks/report.py{quick_flag}"
        f"{flag}`).", "",
        "## Headline", "",
        "| claim | run | number | target | met |", "|---|---|---:|---:|---|",
        *_headline_rows(m, "this machine"),
        *(_ddp_rows(ddp[1], "this machine") if ddp is not None else []),
        *(row for name, kept in _quiet_runs(out)
          for row in _headline_rows(kept, f"quiet machine, `{name}`")),
        "", "## 1. Measured: tripar's runtime against torch.distributed.pipelining", "",
        measured_bench.__doc__.split("\n\n", 1)[1].split("\n    python")[0].strip(), "",
        measured_bench.markdown(m),
        _figure(f"python benchmarks/pipeline_vs_torch.py --calibrate{quick_flag}{flag}",
                "measured.png", "measured tokens/s and measured vs simulated"), "",
        *_quiet_machine(out),
        "### Where the cost model stands on this CPU", "",
        "One block of the same model, one microbatch, in one process with one thread "
        "(`pipeline_vs_torch.block_check`: `time.process_time` around forward and "
        "backward; `torch.profiler` for the split by operator), against the cost model's "
        "`BlockCost` on the calibrated profile:", "",
        measured_bench.markdown_block(check),
        _cost_model_note(check), "",
        *_ddp_section(out, ddp, quick),
        "## 3. Simulated at scale: plans against Megatron-LM and naive baselines", "",
        scale_bench.__doc__.split("\n\n", 1)[1].split("\n    python")[0].strip(), "",
        rows_md,
        _figure(f"python benchmarks/simulated_at_scale.py{quick_flag}{flag}", "at_scale.png",
                "throughput relative to Megatron-LM's published configuration"), "",
        "### Schedules at fixed degrees", "", sched_md,
        _figure(f"python benchmarks/simulated_at_scale.py{quick_flag}{flag}",
                "schedules.png", "simulated step time per schedule"), "",
        "Which plans at these scales choose Chimera or sub-pipelined tensor parallelism, "
        "and what each changes in the predicted step: "
        f"[CHIMERA.md]({os.path.relpath(RESULTS / 'CHIMERA.md', out.resolve())}) and "
        f"[TP_OVERLAP.md]({os.path.relpath(RESULTS / 'TP_OVERLAP.md', out.resolve())}) "
        "(`python benchmarks/chimera_at_scale.py`, `python benchmarks/tp_overlap_at_scale.py`"
        "; not rerun by `tripar bench`).", "",
        "## 4. Planner cost", "",
        "Search time of `tripar.partitioner.search` against the number of identical layers "
        "and of devices (GPT-like graph, hidden 4096, sequence 2048).", "",
        scaling_md,
        _figure(scaling_cmd, "plan_scaling.png", "search time against layers and devices"),
    ]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


QUIET = "quiet_machine"
"""Sub-folder of earlier runs of the measured part on an otherwise idle machine (kept, not
re-run: ``python benchmarks/pipeline_vs_torch.py --calibrate --rounds 30 --out DIR``
there, then ``DIR/measured.json`` copied in as ``measured_<N>_rounds[_<where>].json`` and
its profile as ``cpu_profile[_<where>].json``)."""

KEPT_NOTES = {
    "measured_20_rounds.json": "16 idle cores of a GPU host. Its simulated column is the "
    "cost model and profile of 2026-11-25, before the calibration timed compute on CPU "
    "time and fitted whole-block scales; that model under-predicted every system by "
    "11-25%.",
    "measured_30_rounds_vm.json": "this 2-core VM with nothing else running, simulated on "
    "the current cost model and its own calibrated profile (`cpu_profile_vm.json`).",
}
"""What each kept run is, shown above its table."""


def _quiet_runs(out: Path) -> list[tuple[str, object]]:
    """(file name, Measurement) of the kept quiet-machine runs."""
    import json

    runs = sorted((out / QUIET).glob("measured_*.json")) if (out / QUIET).is_dir() else []
    return [(p.name, measured_bench.Measurement.from_dict(json.loads(p.read_text())))
            for p in runs]


def _quiet_machine(out: Path) -> list[str]:
    """The measured tables of the kept quiet-machine runs, if any."""
    import json

    runs = sorted((out / QUIET).glob("measured_*.json")) if (out / QUIET).is_dir() else []
    if not runs:
        return []
    lines = ["### The same measurement on a quiet machine (kept runs)", "",
             f"Runs of `python benchmarks/pipeline_vs_torch.py --calibrate --rounds N --out DIR` "
             f"on an otherwise idle machine (each rank still one process with one thread; "
             f"the `tripar calibrate` profile it was simulated with kept beside it), kept in "
             f"`{_rel(out / QUIET)}`; the generator does not re-run them.", ""]
    for path in runs:
        raw = json.loads(path.read_text())
        m = measured_bench.Measurement.from_dict(raw)
        note = KEPT_NOTES.get(path.name, "")
        lines += [f"`{path.name}`" + (f": {note}" if note else ":"), "",
                  measured_bench.markdown(m)]
        if "block_check" in raw:
            check = measured_bench.BlockCheck(**raw["block_check"])
            lines += [measured_bench.markdown_block(check), _cost_model_note(check), ""]
    return lines


def _cost_model_note(check) -> str:
    """What the block check says about the cost model, in numbers."""
    measured = check.measured_forward_ms + check.measured_backward_ms
    model = check.model_forward_ms + check.model_backward_ms
    products = check.matmul_ms + check.attention_ms
    return (
        f"The model predicts {model:.1f} ms for the block, {measured:.1f} ms were measured "
        f"({measured / model:.2f}x). Matrix products and attention take {products:.1f} ms "
        f"profiled (profiler overhead included) against {check.model_product_ms:.1f} ms "
        f"modelled ({products / check.model_product_ms:.2f}x); the profile's curve is fitted "
        f"to forward and backward products (transposed operands, cycled through more "
        f"memory than the caches hold). Everything else takes {check.other_ms:.1f} ms "
        f"profiled against {check.model_memory_ms:.1f} ms modelled "
        f"({check.other_ms / max(check.model_memory_ms, 1e-9):.2f}x): per tensor operator "
        f"and pass `op_s` plus `memory_traffic x saved bytes / bandwidth`, both fitted by "
        f"`tripar calibrate` to an operator set (norms, views, softmax, GELU, adds) timed "
        f"forward and backward at several sizes. The optimizer step (`optimizer_bytes` per "
        f"parameter, `optimizer_tensor_s` per tensor) is fitted to timed AdamW steps.\n")


def generate(out: Path = RESULTS, *, quick: bool = False, calibrate: bool = True) -> Path:
    """Run every benchmark and write ``out/REPORT.md`` with its PNGs; returns the path."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    measurement, check = measured_bench.run_all(out, quick=quick,
                                                recalibrate=calibrate and not quick)
    ddp_cfg = replace(ddp_bench.QUICK if quick else ddp_bench.DDPConfig(),
                      profile=str(out / "cpu_profile.json"))
    ddp = (ddp_cfg, ddp_bench.measure(ddp_cfg))
    rows_md, sched_md = scale_bench.run_all(out, quick=quick)
    scaling_md, scaling_cmd = planner_cost(out, quick)
    return write_report(out, quick=quick, measurement=measurement, check=check,
                        rows_md=rows_md, sched_md=sched_md, scaling_md=scaling_md,
                        scaling_cmd=scaling_cmd, wall_s=time.perf_counter() - start,
                        ddp=ddp)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes, under a minute")
    parser.add_argument("--out", default=str(RESULTS), help="folder for REPORT.md and PNGs")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="reuse OUT/cpu_profile.json instead of re-running tripar calibrate")
    args = parser.parse_args(argv)
    path = generate(Path(args.out), quick=args.quick, calibrate=not args.no_calibrate)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
