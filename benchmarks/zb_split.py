"""Measured on this machine: 1F1B against ZB-H1, whose W does only weight-gradient work.

Two local CPU processes (gloo, one compute thread each) train the zoo ``gpt`` (8 layers)
with ``pp=2``, ``dp=1``, on the shipped corpus. Both systems come from one plan: the
planner splits the model for ``1f1b`` on the calibrated CPU profile, and the ``zb-h1``
system is the same plan, stages and microbatches with the ZB-H1 action lists, so only
the schedule (and the B / W split it runs) differs. Both train from the same initial
weights on the same batches; their losses must agree.

Systems are interleaved: each round runs one step of each, in an order that alternates
from round to round, each step bracketed by barriers. Reported: median step wall time
(rank 0, between barriers), the busiest rank's median CPU seconds per step, and per
rank the median CPU milliseconds spent in F, B and W actions per step (for 1F1B, B is the
whole backward; for ZB-H1, B + W should add up to it, as W no longer repeats B's work).

    OMP_NUM_THREADS=1 python benchmarks/zb_split.py [--rounds N] [--microbatches M]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from pipeline_vs_torch import MeasureConfig

SYSTEMS = ("1f1b", "zb-h1")
DEFAULT = replace(MeasureConfig(), rounds=10, systems=SYSTEMS)
"""What to measure (pipeline_vs_torch's model and microbatches); the same for both systems."""


def _loss(out, mb):
    import torch.nn.functional as F

    return F.cross_entropy(out.reshape(-1, out.shape[-1]), mb[1].reshape(-1))


def _with_schedule(plan, name: str):
    """The same plan (stages, microbatches) run with schedule ``name``."""
    from tripar.partitioner.schedules import build_schedule

    par = plan.parallel
    sched = build_schedule(name, par.pp, par.num_microbatches, vpp=par.vpp)
    lines = sched.to_text().splitlines()[1:]
    actions = tuple(line.split(":", 1)[1].strip() for line in lines)
    return replace(plan, parallel=replace(par, schedule=name), schedule=actions).validate()


def _time_actions(pm) -> dict[str, float]:
    """Make ``pm``'s executor add each action's CPU seconds, by kind (F, B, W...), to the
    dict returned (the caller clears it between steps)."""
    executor = pm.executor
    run = executor._run
    spent: dict[str, float] = {}

    def timed(action) -> None:
        start = time.process_time()
        run(action)
        key = action.kind.value
        spent[key] = spent.get(key, 0.0) + time.process_time() - start

    executor._run = timed
    return spent


def _rank_main(cfg: MeasureConfig) -> dict:
    import torch
    import torch.distributed as dist

    from tripar.api import auto_parallel, capture_model
    from tripar.data import CharTokenizer, TextBatches, corpus
    from tripar.models.spec import load_model
    from tripar.partitioner.hardware import Cluster

    torch.set_num_threads(1)
    rank = dist.get_rank()
    text = corpus(2000, seed=0)
    tok = CharTokenizer.from_text(text)
    batch_size = cfg.micro_batch_size * cfg.num_microbatches
    data = TextBatches(tok.encode(text), batch_size, cfg.seq, seed=1)
    spec = (f"gpt:layers={cfg.layers},hidden={cfg.hidden},heads={cfg.heads},"
            f"vocab={tok.vocab_size},seq={cfg.seq}")
    model = load_model(spec, batch_size=batch_size, seed=0).model
    example = data.batch(0)
    captured = capture_model(model, (example[0],))
    common = dict(example_inputs=(example[0],), loss_fn=_loss, captured=captured)
    first = auto_parallel(model, cluster=Cluster.from_file(cfg.profile), pp=2, dp=1,
                          num_microbatches=cfg.num_microbatches, schedule="1f1b",
                          recompute="none", global_batch_size=batch_size, **common)
    models = {"1f1b": first,
              "zb-h1": auto_parallel(model, plan=_with_schedule(first.plan, "zb-h1"), **common)}
    stages = " | ".join(f"{s.blocks[0]}..{s.blocks[-1]}" for s in first.plan.stages)
    spent = {name: _time_actions(pm) for name, pm in models.items()}

    wall = {n: [] for n in SYSTEMS}
    cpu = {n: [] for n in SYSTEMS}
    actions = {n: [] for n in SYSTEMS}
    losses = {n: [] for n in SYSTEMS}
    for r in range(cfg.warmup + cfg.rounds):
        batch = data.batch(r)
        order = SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]
        for name in order:
            spent[name].clear()
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = models[name].train_step(batch)
            used = time.process_time() - start_cpu
            dist.barrier()
            elapsed = time.perf_counter() - start
            losses[name].append(loss)
            if r >= cfg.warmup:
                wall[name].append(elapsed)
                cpu[name].append(used)
                actions[name].append(dict(spent[name]))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"cpu": cpu, "actions": actions})
    for pm in models.values():
        pm.close()
    if rank != 0:
        return {}
    return {"wall": wall, "losses": losses, "stages": stages,
            "cpu": {n: [max(g["cpu"][n][i] for g in gathered) for i in range(cfg.rounds)]
                    for n in SYSTEMS},
            "actions": [{n: {k: statistics.median(s.get(k, 0.0) for s in g["actions"][n])
                             for k in "FBW"} for n in SYSTEMS} for g in gathered]}


def measure(cfg: MeasureConfig) -> dict:
    """Run both systems on 2 local gloo processes; rank 0's results."""
    from tripar.runtime.launch import launch_local

    if not Path(cfg.profile).exists():
        raise SystemExit(f"no CPU profile at {cfg.profile}; run `tripar calibrate --out "
                         f"{cfg.profile}` first")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load = os.getloadavg()
    start = time.perf_counter()
    out = launch_local(_rank_main, 2, cfg, timeout_s=600)[0]
    return {**out, "seconds": time.perf_counter() - start, "load_before": load,
            "load_after": os.getloadavg()}


def report(cfg: MeasureConfig, res: dict) -> str:
    lines = [f"gpt layers={cfg.layers} hidden={cfg.hidden} heads={cfg.heads} seq={cfg.seq}, "
             f"pp=2, {cfg.num_microbatches} microbatches of {cfg.micro_batch_size}; stages "
             f"[{res['stages']}]; {cfg.rounds} rounds after {cfg.warmup} warm-up, interleaved; "
             f"load average {res['load_before'][0]:.1f} before, {res['load_after'][0]:.1f} "
             f"after; run took {res['seconds']:.0f} s",
             "", "| system | median step s | busiest rank CPU s | rank 0 F / B / W ms | "
             "rank 1 F / B / W ms | last loss |", "|---|---:|---:|---|---|---:|"]
    for n in SYSTEMS:
        per_rank = [" / ".join(f"{1e3 * r[n][k]:.1f}" for k in "FBW") for r in res["actions"]]
        lines.append(f"| {n} | {statistics.median(res['wall'][n]):.3f} | "
                     f"{statistics.median(res['cpu'][n]):.3f} | {per_rank[0]} | {per_rank[1]} | "
                     f"{res['losses'][n][-1]:.5f} |")
    a, b = (statistics.median(res["wall"][n]) for n in SYSTEMS)
    lines.append(f"\nzb-h1 / 1f1b median step time: {b / a:.3f}")
    for rank, r in enumerate(res["actions"]):
        full, split = r["1f1b"]["B"], r["zb-h1"]["B"] + r["zb-h1"]["W"]
        if full > 0:
            lines.append(f"rank {rank}: zb-h1 (B + W) / 1f1b B CPU time: {split / full:.3f}")
    same = all(abs(x - y) <= 1e-4 * max(1.0, abs(x))
               for x, y in zip(res["losses"]["1f1b"], res["losses"]["zb-h1"]))
    lines.append(f"losses of the two systems agree step by step: {same}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    default = DEFAULT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=default.rounds)
    parser.add_argument("--microbatches", type=int, default=default.num_microbatches)
    parser.add_argument("--hidden", type=int, default=default.hidden)
    args = parser.parse_args(argv)
    cfg = replace(DEFAULT, rounds=args.rounds, num_microbatches=args.microbatches,
                  hidden=args.hidden)
    res = measure(cfg)
    print(report(cfg, res))
    print({"config": asdict(cfg)})


if __name__ == "__main__":
    main()
