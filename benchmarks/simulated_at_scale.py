"""Simulated at scale: tripar's plans against Megatron-LM's published configurations and naive baselines.

For each row of Megatron-LM's weak-scaling table (arXiv 2104.04473, Table 1; GPT 1.7B
to 1T on A100-80G nodes of 8, sequence 2048, vocabulary 51200), the zoo ``gpt`` graph
is built once on the meta device and every configuration below is costed on it with
tripar's cost model and simulator (``step_estimate``; one model for all, so the
comparison is of plans, not of cost models):

- ``tripar``: ``search(graph, cluster, batch)``, nothing pinned.
- ``megatron``: the published t, p, d; micro batch 1; 1F1B; full recomputation;
  uniform split (what Megatron-LM ran).
- ``dp+zero1``: pure data parallelism with ZeRO-1 (micro batch 1, gradient
  accumulation; no recomputation, or full recomputation when that does not fit);
  "over memory" where even that does not fit.
- ``uniform split``: tripar's configuration (and sharded regions) on the uniform split
  by layers, costed as the search costs it (``search.uniform_split_of``: whole blocks
  recomputed per stage under the same memory budget). The search simulates this split
  for every configuration it costs and keeps it when faster, so tripar's step is never
  above it; equal when pp = 1 or when the partition DP's split is the uniform one. Its
  note gives the same split with fractional per-stage recompute shares
  (``step_estimate``'s stage-aware rule), which a plan cannot express (it recomputes
  whole blocks): the gap is what sub-block recomputation could add.
- ``merak defaults``: the published degrees (Merak leaves them to the user), uniform
  split, 1F1B, micro batch 1 and one fixed recomputed share ``MERAK_RATIO`` on every
  stage (Merak's user-given ratio).

Then the schedules at fixed degrees: for one row, ``search`` with dp, tp, pp and the
micro batch pinned to the published ones and the schedule pinned to each of
tripar's schedules (partition and recomputation chosen by the search).

    python benchmarks/simulated_at_scale.py [--quick] [--rows 1,5,10] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tripar.partitioner.megatron import MEGATRON_WEIGHTS, SEQ, VOCAB

RESULTS = Path(__file__).resolve().parent / "results"

MERAK_RATIO = 0.5
"""The recomputed share of every stage in the Merak-defaults baseline."""
SCHEDULE_ROW = 7
"""1-based row whose published degrees the schedule comparison pins (145.6B, t=8 p=8)."""
QUICK_ROW = 5
"""The one row of ``--quick`` (39.1B on 512 GPUs, t=8 p=2)."""


def megatron_table() -> tuple[tuple, ...]:
    """Rows (params B, heads, hidden, layers, t, p, GPUs, batch) of Megatron's Table 1."""
    from tripar.partitioner.megatron import MEGATRON_TABLE

    return tuple(row[:8] for row in MEGATRON_TABLE)


@dataclass(frozen=True, slots=True)
class Costed:
    """One configuration of one row, as the simulator sees it."""

    system: str
    config: str
    step_s: float | None
    """None: does not fit in memory (or the batch does not divide)."""
    peak_gb: float | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class RowResult:
    row: int
    params_b: float
    gpus: int
    batch: int
    costed: tuple[Costed, ...]
    graph_s: float
    search_s: float

    def get(self, system: str) -> Costed:
        return next(c for c in self.costed if c.system == system)


@functools.lru_cache(maxsize=2)
def _graph(spec: str):
    """The proxy graph of ``spec`` (built once per spec: seconds for the large models)."""
    from tripar.commands._model_args import proxy_graph_for

    return proxy_graph_for(spec, batch_size=1, seq_len=SEQ, weights_dtype=MEGATRON_WEIGHTS)


def _spec(row: tuple) -> str:
    _, heads, hidden, layers, *_ = row
    return f"gpt:layers={layers},hidden={hidden},heads={heads},vocab={VOCAB},seq={SEQ}"


def _describe(cfg) -> str:
    text = f"d{cfg.dp} t{cfg.tp} p{cfg.pp}"
    if cfg.vpp > 1:
        text += f" v{cfg.vpp}"
    return (f"{text} b{cfg.micro_batch_size}x{cfg.num_microbatches} {cfg.schedule} "
            f"{cfg.recompute}{' zero1' if cfg.zero else ''}")


def _estimate(system: str, graph, cluster, cfg, boundaries=None, recompute=None,
              note: str = "") -> Costed:
    from tripar.errors import TriparError
    from tripar.partitioner import step_estimate

    try:
        est = step_estimate(graph, cluster, cfg, boundaries, recompute=recompute,
                            record_timeline=False)
    except TriparError as error:
        return Costed(system, _describe(cfg), None, None, f"not runnable: {error}"[:120])
    if not est.fits:
        return Costed(system, _describe(cfg), None, est.peak_memory_bytes / 1e9,
                      f"over memory ({est.peak_memory_bytes / 1e9:.0f} GB > "
                      f"{est.memory_limit_bytes / 1e9:.0f} GB)")
    return Costed(system, _describe(cfg), est.step_time_s, est.peak_memory_bytes / 1e9, note)


def _uniform_split(graph, cluster, plan) -> Costed:
    """The plan's configuration and regions on the uniform split by layers, costed as the
    search costs it; the note adds fractional recompute shares on the same split."""
    from tripar.errors import TriparError
    from tripar.partitioner import step_estimate, uniform_split_of

    par = plan.parallel
    cfg = replace(par, recompute="stage-aware") if par.recompute == "none" else par
    regions = [r.name for r in plan.tp_regions]
    try:
        got = uniform_split_of(plan, graph, cluster)
    except TriparError as error:
        return Costed("uniform split", _describe(par), None, None,
                      f"does not fit: {error}"[:120])
    same = "same split as tripar; " if got.boundaries == tuple(
        plan.model.blocks.index(st.blocks[0]) for st in plan.stages) else ""
    try:
        frac = step_estimate(graph, cluster, cfg, recompute=cfg.recompute,
                             record_timeline=False, tp_regions=regions)
        ideal = (f"fractional recompute shares: {frac.step_time_s:.2f} s"
                 + ("" if frac.fits else " (over memory)"))
    except TriparError:
        ideal = ""
    return Costed("uniform split", _describe(par), got.step_time_s,
                  got.peak_memory_bytes / 1e9, same + ideal)


def compare_row(index: int, row: tuple) -> RowResult:
    """Every system of the module docstring for 1-based row ``index`` of the table."""
    from tripar.partitioner import search
    from tripar.partitioner.hardware import Cluster
    from tripar.plan.config import ParallelConfig

    params, _, _, _, t, p, gpus, batch = row
    start = time.perf_counter()
    graph = _graph(_spec(row))
    graph_s = time.perf_counter() - start
    cluster = Cluster.builtin("a100-80g", nodes=gpus // 8, gpus_per_node=8)
    start = time.perf_counter()
    plan = search(graph, cluster, batch, model_spec=_spec(row))
    search_s = time.perf_counter() - start
    par = plan.parallel
    costed = [Costed("tripar", _describe(par), plan.estimate.step_time_s,
                     plan.estimate.peak_memory_bytes / 1e9)]

    d = gpus // (t * p)
    megatron = ParallelConfig(dp=d, tp=t, pp=p, micro_batch_size=1,
                              num_microbatches=batch // d, schedule="1f1b", recompute="full")
    costed.append(_estimate("megatron", graph, cluster, megatron))

    if batch % gpus:
        costed.append(Costed("dp+zero1", f"d{gpus}", None, None,
                             f"batch {batch} does not divide over {gpus} replicas"))
    else:
        dp_cfg = ParallelConfig(dp=gpus, tp=1, pp=1, micro_batch_size=1,
                                num_microbatches=batch // gpus, zero=1)
        got = _estimate("dp+zero1", graph, cluster, dp_cfg)
        if got.step_s is None:
            got = _estimate("dp+zero1", graph, cluster, replace(dp_cfg, recompute="full"))
        costed.append(got)

    costed.append(_uniform_split(graph, cluster, plan))
    merak = ParallelConfig(dp=d, tp=t, pp=p, micro_batch_size=1, num_microbatches=batch // d,
                           schedule="1f1b", recompute="none")
    costed.append(_estimate("merak defaults", graph, cluster, merak, None,
                            [MERAK_RATIO] * p, note=f"recompute share {MERAK_RATIO}"))
    return RowResult(index, params, gpus, batch, tuple(costed), graph_s, search_s)


@dataclass(frozen=True, slots=True)
class ScheduleResult:
    schedule: str
    config: str
    step_s: float | None
    bubble: float | None
    peak_gb: float | None
    note: str = ""


def compare_schedules(index: int, row: tuple) -> list[ScheduleResult]:
    """Every schedule at the row's published dp, tp, pp and micro batch 1 (search, pinned)."""
    from tripar.errors import TriparError
    from tripar.partitioner import Pins, search
    from tripar.partitioner.hardware import Cluster
    from tripar.plan.config import SCHEDULES

    _, _, _, _, t, p, gpus, batch = row
    graph = _graph(_spec(row))
    cluster = Cluster.builtin("a100-80g", nodes=gpus // 8, gpus_per_node=8)
    d = gpus // (t * p)
    out = []
    for name in SCHEDULES:
        pins = Pins(dp=d, tp=t, pp=p, micro_batch_size=1, schedule=name)
        try:
            plan = search(graph, cluster, batch, pins=pins, model_spec=_spec(row))
        except TriparError as error:
            out.append(ScheduleResult(name, "", None, None, None, str(error)[:120]))
            continue
        est = plan.estimate
        out.append(ScheduleResult(name, _describe(plan.parallel), est.step_time_s,
                                  est.bubble_fraction, est.peak_memory_bytes / 1e9))
    return out


SYSTEMS = ("tripar", "megatron", "dp+zero1", "uniform split", "merak defaults")


def markdown_rows(rows: list[RowResult]) -> str:
    lines = ["| row | params (B) | GPUs | batch | " + " | ".join(
        f"{s} step s" for s in SYSTEMS) + " | tripar config | megatron/tripar | "
        "graph s | search s |",
        "|---:|---:|---:|---:|" + "---:|" * len(SYSTEMS) + "---|---:|---:|---:|"]
    for r in rows:
        cells = []
        for s in SYSTEMS:
            c = r.get(s)
            cells.append(f"{c.step_s:.2f}" if c.step_s is not None
                         else ("over memory" if c.peak_gb else "n/a"))
        meg, tri = r.get("megatron").step_s, r.get("tripar").step_s
        speed = f"{meg / tri:.2f}" if meg and tri else "-"
        lines.append(f"| {r.row} | {r.params_b} | {r.gpus} | {r.batch} | "
                     + " | ".join(cells)
                     + f" | {r.get('tripar').config} | {speed} | {r.graph_s:.1f} | "
                     f"{r.search_s:.2f} |")
    lines += ["", "Configurations of the baselines (d, t, p; micro batch x microbatches; "
              "schedule; recomputation) and why one is missing:", "",
              "| row | system | config | peak GB | note |", "|---:|---|---|---:|---|"]
    for r in rows:
        for c in r.costed:
            if c.system == "tripar":
                continue
            peak = f"{c.peak_gb:.1f}" if c.peak_gb else "-"
            lines.append(f"| {r.row} | {c.system} | {c.config} | {peak} | {c.note} |")
    return "\n".join(lines) + "\n"


def markdown_schedules(index: int, row: tuple, results: list[ScheduleResult]) -> str:
    params, _, _, _, t, p, gpus, batch = row
    lines = [f"Row {index} ({params}B, {gpus} GPUs, batch {batch}) at its published degrees "
             f"t={t}, p={p}, d={gpus // (t * p)}, micro batch 1; partition and "
             f"recomputation chosen by the search for each schedule.", "",
             "| schedule | step s | bubble | peak GB | config | note |",
             "|---|---:|---:|---:|---|---|"]
    for r in results:
        step = f"{r.step_s:.2f}" if r.step_s is not None else "-"
        bubble = f"{r.bubble:.1%}" if r.bubble is not None else "-"
        peak = f"{r.peak_gb:.1f}" if r.peak_gb is not None else "-"
        lines.append(f"| {r.schedule} | {step} | {bubble} | {peak} | {r.config} | {r.note} |")
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[RowResult], path: Path) -> None:
    """Throughput of each system relative to Megatron's published configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(SYSTEMS)
    for k, system in enumerate(SYSTEMS):
        xs, ys = [], []
        for i, r in enumerate(rows):
            meg, c = r.get("megatron").step_s, r.get(system).step_s
            if meg and c:
                xs.append(i + (k - (len(SYSTEMS) - 1) / 2) * width)
                ys.append(meg / c)
        ax.bar(xs, ys, width, label=system)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), [f"{r.params_b}B\n{r.gpus} GPUs" for r in rows],
                  fontsize=8)
    ax.set(ylabel="throughput / Megatron published (simulated)",
           title="GPT on A100-80G (simulated; missing bar = does not fit)")
    ax.legend(fontsize=8, ncol=len(SYSTEMS))
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_schedules(results: list[ScheduleResult], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ok = [r for r in results if r.step_s is not None]
    ax.barh([r.schedule for r in ok], [r.step_s for r in ok], color="tab:blue")
    for i, r in enumerate(ok):
        ax.annotate(f"{r.step_s:.2f} s, bubble {r.bubble:.0%}", (r.step_s, i), fontsize=8,
                    va="center")
    ax.invert_yaxis()
    ax.set(xlabel="simulated step s", title=title)
    ax.set_xlim(0, max(r.step_s for r in ok) * 1.45)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_all(out: Path, *, quick: bool = False,
            rows: list[int] | None = None) -> tuple[str, str]:
    """Compare every row (quick: row 5 only) and the schedules (quick: on row 5); write
    ``at_scale.png`` and ``schedules.png`` into ``out``; return the two markdown tables."""
    table = megatron_table()
    rows = rows or ([QUICK_ROW] if quick else list(range(1, len(table) + 1)))
    results = [compare_row(i, table[i - 1]) for i in rows]
    plot_rows(results, out / "at_scale.png")
    srow = QUICK_ROW if quick else SCHEDULE_ROW
    schedules = compare_schedules(srow, table[srow - 1])
    params, _, _, _, t, p, gpus, _ = table[srow - 1]
    plot_schedules(schedules, f"{params}B on {gpus} GPUs, t={t} p={p} (simulated)",
                   out / "schedules.png")
    return markdown_rows(results), markdown_schedules(srow, table[srow - 1], schedules)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"row {QUICK_ROW} only")
    parser.add_argument("--rows", default=None, help="1-based rows, comma-separated")
    parser.add_argument("--out", default=str(RESULTS), help="where the PNGs go")
    args = parser.parse_args(argv)
    rows = [int(x) for x in args.rows.split(",")] if args.rows else None
    for text in run_all(Path(args.out), quick=args.quick, rows=rows):
        print(text)


if __name__ == "__main__":
    main()
