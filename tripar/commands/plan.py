"""``tripar plan MODEL``: search dp, tp, pp, microbatches, schedule and recompute.

Prints a summary a person can act on (``--format text``) or the plan as one
JSON object (``--format json``); ``--out FILE`` also writes the JSON, which
``tripar explain``, ``tripar show`` and ``tripar codegen`` read.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tripar.commands._cluster_args import add_cluster_args, cluster_from_args
from tripar.commands._model_args import add_model_args, check_model_args, proxy_graph_for
from tripar.plan.config import SCHEDULES, ZERO_STAGES


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan", help="choose dp/tp/pp, microbatches, schedule and recompute for a model",
        description=__doc__.splitlines()[0])
    add_model_args(parser)
    add_cluster_args(parser)
    group = parser.add_argument_group("batch and pins (anything not pinned is searched)")
    group.add_argument("--global-batch", type=int, required=True, metavar="B",
                       help="samples per training step, all replicas together")
    for name, what in (("dp", "data-parallel"), ("tp", "tensor-parallel"),
                       ("pp", "pipeline-parallel")):
        group.add_argument(f"--{name}", type=int, default=None, help=f"pin the {what} degree")
    group.add_argument("--vpp", type=int, default=None,
                       help="pin virtual stages per pipeline rank (>1: interleaved-1f1b)")
    group.add_argument("--micro-batch", type=int, default=None, metavar="b",
                       help="pin the samples per microbatch")
    group.add_argument("--schedule", choices=("auto", *SCHEDULES), default="auto")
    group.add_argument("--recompute", choices=("auto", "none", "selective", "full", "stage-aware"),
                       default="auto",
                       help="auto recomputes per stage only what does not fit (stage-aware)")
    group.add_argument("--zero", choices=("auto", *map(str, ZERO_STAGES)), default="auto",
                       help="ZeRO stage: 1 shards optimizer state across data-parallel ranks, 2 "
                            "the gradients too")
    group.add_argument("--sp", action=argparse.BooleanOptionalAction, default=None,
                       help="sequence parallelism: the token-wise parts between "
                            "tensor-parallel regions on a 1/tp slice of the sequence "
                            "(default: the planner decides)")
    group.add_argument("--tp-overlap", type=int, default=None, metavar="K",
                       help="sub-pipelined tensor parallelism: each microbatch in K parts "
                            "along the batch (the sequence at --micro-batch 1), one part's "
                            "collectives overlapping the next "
                            "part's compute (needs --tp > 1; default: the planner decides)")
    group.add_argument("--dtype", default=None,
                       help="training dtype (default bf16 on GPUs, fp32 on cpu)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the plan JSON")
    parser.add_argument("--dump-lp", default=None, metavar="FILE",
                        help="write the chosen configuration's partition MILP (LP format)")
    parser.set_defaults(func=run)


def pins_from_args(args: argparse.Namespace):
    """The flags' pins (``auto`` and unset flags pin nothing)."""
    from tripar.partitioner import Pins

    return Pins(dp=args.dp, tp=args.tp, pp=args.pp, vpp=args.vpp,
                micro_batch_size=args.micro_batch,
                schedule=None if args.schedule == "auto" else args.schedule,
                recompute=None if args.recompute == "auto" else args.recompute,
                zero=None if args.zero == "auto" else int(args.zero), sp=args.sp,
                tp_overlap=args.tp_overlap)


def run(args: argparse.Namespace) -> int:
    from tripar.partitioner import Spelling, check_pins, search

    check_model_args(args)
    cluster = cluster_from_args(args)
    pins = pins_from_args(args)
    check_pins(pins, cluster.devices, args.global_batch, spelling=Spelling.CLI)  # before capture
    graph = proxy_graph_for(args.model, batch_size=args.batch, seq_len=args.seq)
    plan = search(graph, cluster, args.global_batch, pins=pins, model_spec=args.model,
                  dtype=args.dtype, spelling=Spelling.CLI)
    if args.out:
        plan.save(args.out)
    if args.dump_lp:
        from tripar.partitioner import build_partition_milp, partition_problem

        problem = partition_problem(graph, cluster, plan.parallel, dtype=args.dtype,
                                    tp_regions=[r.name for r in plan.tp_regions])
        build_partition_milp(problem).dump_lp(args.dump_lp)
    if args.format == "json":
        print(json.dumps(plan.to_dict()))
    else:
        print(plan.render(), end="")
        if args.out:
            print(f"plan written to {args.out}")
    return 0
