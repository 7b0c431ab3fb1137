"""``tripar explain PLAN.json``: why this plan, what binds it, how the runners-up compare."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tripar.plan import (
    Binding,
    Plan,
    fmt_bytes,
    fmt_device_memory,
    fmt_estimate,
    fmt_parallel,
    fmt_time,
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "explain", help="why a plan was chosen and what limits it",
        description=__doc__.splitlines()[0])
    parser.add_argument("plan", metavar="PLAN", help="a plan JSON written by `tripar plan --out`")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.set_defaults(func=run)


def bindings(plan: Plan) -> list[tuple[Binding, str]]:
    """What limits the plan, most binding first, each with its numbers."""
    est, cl, par = plan.estimate, plan.cluster, plan.parallel
    out: list[tuple[float, Binding, str]] = []
    share = est.peak_memory_bytes / cl.device_memory_bytes
    recomputing = [st for st in plan.stages if st.recompute]
    selective = [st for st in plan.stages if st.selective]
    memory = (f"peak memory {fmt_bytes(est.peak_memory_bytes)} is {share:.0%} of the "
              f"{fmt_bytes(cl.device_memory_bytes)} device")
    if recomputing:
        memory += (f"; {len(recomputing)} of {len(plan.stages)} stages recompute to fit "
                   f"(stage {recomputing[0].index}: {len(recomputing[0].recompute)} of "
                   f"{len(recomputing[0].blocks)} blocks)")
    if selective:
        memory += (f"; {len(selective)} of {len(plan.stages)} stages recompute selectively "
                   f"(stage {selective[0].index}: {len(selective[0].selective)} nodes of its "
                   "blocks, the parts cheap to recompute and costly to keep, such as the "
                   "attention scores and softmax)")
        recomputing = recomputing or selective
    out.append((share + (0.5 if recomputing else 0.0), Binding.MEMORY, memory))
    if par.pp > 1:
        out.append((est.bubble_fraction * 2, Binding.BUBBLE,
                    f"pipeline bubble {est.bubble_fraction:.1%} of the busiest device's compute "
                    f"with pp={par.pp}, {par.num_microbatches} microbatches, {par.schedule}"))
    if est.step_time_s > 0:
        comm = est.communication_s / est.step_time_s
        out.append((comm * 2, Binding.COMMUNICATION,
                    f"{fmt_time(est.communication_s)} ({comm:.1%} of the step) after the "
                    f"pipeline: gradient reduction over dp={par.dp}"
                    + (f", ZeRO-{par.zero} gathers" if par.zero else "") + ", optimizer step"))
        busy = est.compute_s / est.step_time_s
        out.append((busy, Binding.COMPUTE, f"the busiest device computes {fmt_time(est.compute_s)}"
                                           f" ({busy:.0%} of the step)"))
    return [(b, text) for _, b, text in sorted(out, key=lambda x: (-x[0], x[1].value))]


def explanation(plan: Plan) -> dict:
    return {
        "parallel": fmt_parallel(plan.parallel),
        "estimate": fmt_estimate(plan.estimate, plan.cluster.device_memory_bytes),
        "binds": [{"binding": b.value, "detail": text} for b, text in bindings(plan)],
        "alternatives": [
            {"parallel": fmt_parallel(a.parallel), "binding": a.binding.value,
             "reason": a.reason,
             "step_time_s": a.estimate.step_time_s if a.estimate else None}
            for a in plan.alternatives],
        "notes": list(plan.notes),
        "device_memory": fmt_device_memory(plan.stages, plan.device_memory(),
                                           plan.cluster.device_memory_bytes),
    }


def run(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan, validate=True)
    report = explanation(plan)
    if args.format == "json":
        print(json.dumps(report))
        return 0
    print(f"chosen:   {report['parallel']}")
    print(f"estimate: {report['estimate']}")
    print("\nwhat binds it (most first):")
    for item in report["binds"]:
        print(f"  [{item['binding']}] {item['detail']}")
    if report["device_memory"]:
        print()
        print("\n".join(report["device_memory"]))
    if plan.alternatives:
        print("\nwhy not the runners-up:")
        for alt in plan.alternatives:
            step = (f"{fmt_time(alt.estimate.step_time_s)} "
                    f"({alt.estimate.step_time_s / plan.estimate.step_time_s - 1:+.1%})"
                    if alt.estimate and plan.estimate.step_time_s > 0 else "not costed")
            print(f"  {fmt_parallel(alt.parallel)}\n    {step}: {alt.reason} "
                  f"[{alt.binding.value}]")
    for note in plan.notes:
        print(f"note: {note}")
    return 0
