"""Measured on this machine: tripar's data parallelism against torch's DistributedDataParallel.

Two local CPU processes (gloo, one compute thread each) train the zoo ``gpt`` (6 layers,
hidden 256) on the shipped corpus with SGD. Every system trains the same model from the
same initial weights on the same global batches, split into the same microbatches:

- ``tripar default``: ``tripar.auto_parallel`` with ``dp=2`` pinned (a data-parallel row)
  and everything else -- the ZeRO stage, the microbatches -- left to the planner, on the
  calibrated CPU profile; timed through ``ParallelModel.train_step``.
- ``tripar zero=0`` / ``zero=1`` / ``zero=2``: the same with the ZeRO stage pinned.
- ``torch DDP``: ``DistributedDataParallel`` (default 25 MiB buckets) on a copy of the
  model, the default plan's microbatches accumulated under ``no_sync`` but the last, the
  same SGD.

Systems are interleaved: each round runs one step of every system, in an order that
rotates from round to round, each step bracketed by barriers, so that machine noise hits
them alike; the median over rounds is reported, with the busiest rank's CPU seconds per
step (the work, which a busy machine inflates less than the wall clock). ``--repeats N`` runs the whole
measurement N times (fresh processes) and reports the median and the spread of the
ratios; ``--out`` writes the markdown report (default ``benchmarks/results/DDP.md``).

    python benchmarks/ddp_vs_tripar.py [--quick] [--repeats 3] [--out FILE] [--profile FILE]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = RESULTS / "cpu_profile.json"
TRIPAR_SYSTEMS = {"tripar default": None, "tripar zero=0": 0, "tripar zero=1": 1,
                  "tripar zero=2": 2}
"""name -> the ZeRO stage pinned (None: the planner's choice)."""
DDP = "torch DDP"


@dataclass(frozen=True, slots=True)
class DDPConfig:
    """What to measure; every field is the same for every system."""

    layers: int = 6
    hidden: int = 256
    heads: int = 4
    seq: int = 64
    global_batch: int = 16
    rounds: int = 12
    """Timed rounds (one step of every system per round)."""
    warmup: int = 2
    profile: str = str(PROFILE)
    systems: tuple[str, ...] = (*TRIPAR_SYSTEMS, DDP)


QUICK = DDPConfig(layers=2, hidden=64, heads=2, seq=16, global_batch=4, rounds=2, warmup=1)


def _loss(out, mb):
    import torch.nn.functional as F

    return F.cross_entropy(out.reshape(-1, out.shape[-1]), mb[1].reshape(-1))


class _DDP:
    """torch's DistributedDataParallel: this rank's half of the batch in ``m``
    microbatches, accumulated under ``no_sync`` but the last, then SGD."""

    def __init__(self, model, m: int) -> None:
        import torch
        from torch.nn.parallel import DistributedDataParallel

        self.ddp = DistributedDataParallel(copy.deepcopy(model))
        self.m = m
        self.optimizer = torch.optim.SGD(self.ddp.parameters(), lr=1e-2)

    def step(self, batch) -> float:
        import contextlib

        import torch.distributed as dist
        import torch.nn.functional as F

        rank, world = dist.get_rank(), dist.get_world_size()
        ids, targets = (t.chunk(world)[rank] for t in batch)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        micro = list(zip(ids.chunk(self.m), targets.chunk(self.m)))
        for k, (x, y) in enumerate(micro):
            sync = contextlib.nullcontext() if k == self.m - 1 else self.ddp.no_sync()
            with sync:
                out = self.ddp(x)
                loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)) / self.m
                loss.backward()
            total += float(loss.detach())
        self.optimizer.step()
        return total


def _rank_main(cfg: DDPConfig) -> dict:
    """Runs on each of the 2 ranks; rank 0 returns the timings."""
    import torch
    import torch.distributed as dist

    from tripar.api import auto_parallel, capture_model
    from tripar.data import CharTokenizer, TextBatches, corpus
    from tripar.models.spec import load_model
    from tripar.partitioner.hardware import Cluster

    text = corpus(2000, seed=0)
    tok = CharTokenizer.from_text(text)
    data = TextBatches(tok.encode(text), cfg.global_batch, cfg.seq, seed=1)
    spec = (f"gpt:layers={cfg.layers},hidden={cfg.hidden},heads={cfg.heads},"
            f"vocab={tok.vocab_size},seq={cfg.seq}")
    model = load_model(spec, batch_size=cfg.global_batch, seed=0).model
    example = data.batch(0)
    captured = capture_model(model, (example[0],))
    cluster = Cluster.from_file(cfg.profile)

    steppers, plans, simulated = {}, {}, {}
    for name in cfg.systems:
        if name in TRIPAR_SYSTEMS:
            pm = auto_parallel(model, cluster=cluster, example_inputs=(example[0],),
                               loss_fn=_loss, captured=captured, dp=2, tp=1, pp=1,
                               zero=TRIPAR_SYSTEMS[name], global_batch_size=cfg.global_batch,
                               optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-2))
            steppers[name] = pm
            par = pm.plan.parallel
            simulated[name] = pm.plan.estimate.step_time_s
            plans[name] = (f"ZeRO-{par.zero}, {par.num_microbatches} x {par.micro_batch_size}"
                           f" samples, simulated {simulated[name] * 1e3:.0f} ms")
    default = steppers["tripar default"].plan.parallel
    if DDP in cfg.systems:
        steppers[DDP] = _DDP(model, default.num_microbatches)
        plans[DDP] = f"{default.num_microbatches} microbatches, no_sync but the last"

    times: dict[str, list[float]] = {n: [] for n in cfg.systems}
    cpu: dict[str, list[float]] = {n: [] for n in cfg.systems}
    losses: dict[str, list[float]] = {n: [] for n in cfg.systems}
    names = list(cfg.systems)
    for r in range(cfg.warmup + cfg.rounds):
        batch = data.batch(r)
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            stepper = steppers[name]
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = stepper.step(batch) if name == DDP else stepper.train_step(batch)
            used = time.process_time() - start_cpu
            dist.barrier()
            elapsed = time.perf_counter() - start
            if r >= cfg.warmup:
                times[name].append(elapsed)
                cpu[name].append(used)
            if name == DDP:  # this rank's half: the global mean, after the timing
                both = torch.tensor(loss)
                dist.all_reduce(both)
                loss = float(both) / dist.get_world_size()
            losses[name].append(loss)
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, cpu)
    if dist.get_rank() != 0:
        return {}
    busiest = {n: [max(rc[n][i] for rc in per_rank) for i in range(len(cpu[n]))]
               for n in names}
    return {"step_s": times, "cpu_s": busiest, "losses": losses, "plans": plans, "simulated_s": simulated,
            "torch": torch.__version__, "tokens": cfg.global_batch * cfg.seq}


@dataclass(frozen=True, slots=True)
class Run:
    """One measurement: each system's median tokens/s, its plan, the load around it."""

    tokens_per_s: dict[str, float]
    plans: dict[str, str]
    load: tuple[float, float]
    torch_version: str
    simulated_s: dict[str, float] = field(default_factory=dict)
    """The simulator's step time of each tripar system's plan on the calibrated profile."""
    cpu_s: dict[str, float] = field(default_factory=dict)
    """Median over rounds of the busiest rank's CPU seconds per step (``process_time``,
    gloo's threads included): the work of a step, which other processes on the cores do
    not inflate as they inflate the wall clock."""

    def ratio(self, name: str) -> float:
        return self.tokens_per_s[name] / self.tokens_per_s[DDP]

    def cpu_ratio(self, name: str) -> float | None:
        """DDP's CPU seconds per step over ``name``'s (above 1: ``name`` does less work)."""
        if name not in self.cpu_s or DDP not in self.cpu_s:
            return None
        return self.cpu_s[DDP] / self.cpu_s[name]

    def simulated_ratio(self, name: str) -> float | None:
        """The simulator's tokens/s of ``name``'s plan over the same plan at ZeRO-0 (the
        algorithm DDP runs: bucketed all-reduce, every rank steps every parameter); None
        when either was not measured."""
        if name not in self.simulated_s or "tripar zero=0" not in self.simulated_s:
            return None
        return self.simulated_s["tripar zero=0"] / self.simulated_s[name]


def measure(cfg: DDPConfig, *, timeout_s: float = 900.0) -> Run:
    """One measurement of every system of ``cfg`` on 2 local gloo processes."""
    from tripar.runtime.launch import launch_local

    if not Path(cfg.profile).exists():
        raise FileNotFoundError(f"no CPU profile at {cfg.profile}; run `tripar calibrate "
                                f"--out {cfg.profile}` first")
    before = os.getloadavg()[0]
    out = launch_local(_rank_main, 2, cfg, timeout_s=timeout_s)[0]
    first = {n: v[0] for n, v in out["losses"].items()}
    # same weights, same batch, same microbatches: the same first loss everywhere
    assert max(first.values()) - min(first.values()) < 1e-4, first
    tps = {n: out["tokens"] / statistics.median(v) for n, v in out["step_s"].items()}
    return Run(tps, out["plans"], (before, os.getloadavg()[0]), out["torch"],
               out["simulated_s"], {n: statistics.median(v) for n, v in out["cpu_s"].items()})


def markdown(cfg: DDPConfig, runs: list[Run], *, title: str = "#",
             command: str = "python benchmarks/ddp_vs_tripar.py --repeats 3") -> str:
    """The report: per system the median over runs of tokens/s and of the ratio to DDP,
    with the spread (min..max) of the ratio, and the simulator's ratio to ZeRO-0.
    ``title``: the heading's level (``""``: no heading); ``command``: what regenerates it."""
    lines = [
        *([f"{title} tripar data parallelism against torch DistributedDataParallel", ""]
          if title else []),
        f"2 CPU processes (gloo, 1 thread each), zoo gpt {cfg.layers} layers, hidden "
        f"{cfg.hidden}, seq {cfg.seq}, global batch {cfg.global_batch}, SGD; dp=2 pinned, "
        f"the rest planned on the calibrated CPU profile. {len(runs)} run(s) (fresh "
        f"processes), {cfg.rounds} timed rounds each (median), systems interleaved in each "
        f"round. torch {runs[0].torch_version}; 1-minute load before/after each run: "
        + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in (r.load for r in runs)) + ".",
        "",
        f"Regenerate: `{command}`",
        "",
        "| system | plan | tokens/s (median of runs) | / DDP, median | / DDP, min..max "
        "| DDP / system, busiest-rank CPU s per step (median) | simulated / ZeRO-0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in cfg.systems:
        tps = statistics.median(r.tokens_per_s[name] for r in runs)
        ratios = [r.ratio(name) for r in runs]
        sim = runs[0].simulated_ratio(name)
        cpus = [c for c in (r.cpu_ratio(name) for r in runs) if c is not None]
        lines.append(f"| {name} | {runs[0].plans.get(name, '')} | {tps:,.0f} | "
                     f"{statistics.median(ratios):.3f} | {min(ratios):.3f}..{max(ratios):.3f} "
                     f"| {f'{statistics.median(cpus):.3f}' if cpus else '-'} "
                     f"| {'-' if sim is None else f'{sim:.3f}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "DDP.md"))
    parser.add_argument("--profile", default=str(PROFILE),
                        help="the calibrated CPU profile (`tripar calibrate`) to plan on")
    args = parser.parse_args(argv)
    cfg = replace(QUICK if args.quick else DDPConfig(), profile=args.profile)
    runs = []
    for k in range(args.repeats):
        runs.append(measure(cfg))
        print(f"run {k + 1}: " + ", ".join(
            f"{n} {runs[-1].ratio(n):.3f}x (CPU {runs[-1].cpu_ratio(n):.3f}x)"
            for n in cfg.systems), flush=True)
    text = markdown(cfg, runs)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
