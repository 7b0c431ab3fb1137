"""``tripar show PLAN.json``: the plan, and its schedule as a steps x ranks timeline."""

from __future__ import annotations

import argparse
from typing import Any

from tripar.plan.plan import Plan
from tripar.plan.schedule import PIPELINE_MARKS, Schedule, format_grid


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "show", help="print a plan and its schedule timeline",
        description=__doc__.splitlines()[0])
    parser.add_argument("plan", metavar="PLAN", help="a plan JSON written by `tripar plan --out`")
    parser.add_argument("--steps", type=int, default=24,
                        help="schedule steps to print per rank (default 24)")
    parser.add_argument("--timeline", default=None, metavar="FILE",
                        help="draw the simulated timeline to FILE.png or FILE.svg")
    parser.set_defaults(func=run)


def timeline_result(plan: Plan):
    """Replay the plan's schedule with its stage times (F one third, backward the rest)."""
    from tripar.partitioner.simulator import simulate
    from tripar.partitioner.stage_cost import StageCost

    schedule = plan.to_schedule()
    costs = [StageCost(forward_s=st.time_s / 3, backward_input_s=st.time_s / 3,
                       backward_weight_s=st.time_s / 3,
                       recompute_s=st.time_s / 3 if st.recompute else 0.0)
             for st in plan.stages]
    return simulate(schedule, costs)


def pipelines_legend(schedule: Schedule) -> str:
    """The key to the grid's pipeline marks, for a schedule of two pipelines (chimera).

    >>> print(pipelines_legend(Schedule("chimera", 4, 1, 4, ((),) * 4, pipelines=2)))
    v: the down pipeline, microbatches 0-1 (rank r runs stage r)
    ^: the up pipeline, microbatches 2-3 (rank r runs stage 3-r)
    """
    half = schedule.num_microbatches // 2
    down, up = PIPELINE_MARKS
    return (f"{down}: the down pipeline, microbatches 0-{half - 1} (rank r runs stage r)\n"
            f"{up}: the up pipeline, microbatches {half}-{schedule.num_microbatches - 1} "
            f"(rank r runs stage {schedule.pp - 1}-r)")


def run(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan, validate=True)
    print(plan.render(), end="")
    if plan.schedule:
        schedule = plan.to_schedule()
        columns = [[schedule.cell(a) for a in acts[:args.steps]] for acts in schedule.actions]
        longest = max(len(acts) for acts in schedule.actions)
        print(f"\ntimeline (first {min(args.steps, longest)} of {longest} steps per rank):")
        print(format_grid(columns), end="")
        if schedule.pipelines == 2:
            print(pipelines_legend(schedule))
    if args.timeline:
        from tripar.partitioner.timeline import draw_timeline

        schedule = plan.to_schedule()
        path = draw_timeline(timeline_result(plan), args.timeline,
                             title=f"{plan.model.spec}: {plan.parallel.schedule}",
                             pipeline_of=schedule.pipeline_of if schedule.pipelines == 2
                             else None)
        print(f"timeline drawn to {path}")
    return 0
