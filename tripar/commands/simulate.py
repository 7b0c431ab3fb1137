"""``tripar simulate``: cost and simulate one fully given parallel configuration.

Stages are split uniformly by layers (embedding with the first stage, head
with the last); the cost model prices each stage, the schedule generator
writes every rank's actions, and the simulator plays one training step.
"""

from __future__ import annotations

import argparse
import json

from tripar.commands._cluster_args import add_cluster_args, cluster_from_args
from tripar.commands._model_args import add_model_args, load_proxy_graph
from tripar.errors import InfeasibleError
from tripar.plan import fmt_bytes
from tripar.plan.config import RECOMPUTE, SCHEDULES, ZERO_STAGES, ParallelConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate", help="simulate one given dp/tp/pp configuration (step time, memory)")
    add_model_args(parser)
    add_cluster_args(parser)
    group = parser.add_argument_group("configuration")
    group.add_argument("--global-batch", type=int, required=True, metavar="B",
                       help="samples per training step, all replicas together")
    group.add_argument("--dp", type=int, default=1, help="data-parallel degree")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    group.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    group.add_argument("--vpp", type=int, default=1,
                       help="virtual stages per pipeline rank (implies interleaved-1f1b)")
    group.add_argument("--micro-batch", type=int, default=1, metavar="b",
                       help="samples per microbatch (default 1)")
    group.add_argument("--schedule", choices=SCHEDULES, default=None,
                       help="pipeline schedule (default 1f1b, interleaved-1f1b when --vpp > 1)")
    group.add_argument("--recompute", choices=RECOMPUTE, default="none",
                       help="activation recomputation (default none)")
    group.add_argument("--zero", type=int, choices=ZERO_STAGES, default=0,
                       help="ZeRO stage: 1 shards optimizer state across data-parallel ranks, 2 "
                            "the gradients too")
    group.add_argument("--sp", action=argparse.BooleanOptionalAction, default=False,
                       help="sequence parallelism: the token-wise parts between "
                            "tensor-parallel regions on a 1/tp slice of the sequence "
                            "(default off)")
    group.add_argument("--tp-overlap", type=int, default=1, metavar="K",
                       help="sub-pipelined tensor parallelism: each microbatch in K parts "
                            "along the batch (the sequence at --micro-batch 1), one part's "
                            "collectives overlapping the next "
                            "part's compute (needs --tp > 1; default: 1, off)")
    group.add_argument("--dtype", default=None,
                       help="training dtype (default bf16 on GPUs, fp32 on cpu)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--timeline", default=None, metavar="FILE",
                        help="draw the timeline to FILE.png or FILE.svg")
    parser.set_defaults(func=run)


def _pins(args: argparse.Namespace):
    """Every choice of the configuration, pinned (a fully given configuration)."""
    from tripar.partitioner import Pins

    return Pins(dp=args.dp, tp=args.tp, pp=args.pp, vpp=args.vpp,
                micro_batch_size=args.micro_batch,
                schedule=args.schedule or ("interleaved-1f1b" if args.vpp > 1 else "1f1b"),
                recompute=args.recompute, zero=args.zero, sp=args.sp,
                tp_overlap=args.tp_overlap)


def parallel_config(args: argparse.Namespace, devices: int) -> ParallelConfig:
    """The configuration the flags give, checked against the devices and the batch
    (``check_pins``: ConfigError naming the flags, with a fix)."""
    from tripar.partitioner import Spelling, check_pins

    pins = _pins(args)
    check_pins(pins, devices, args.global_batch, spelling=Spelling.CLI)
    return ParallelConfig(dp=args.dp, tp=args.tp, pp=args.pp,
                          micro_batch_size=args.micro_batch,
                          num_microbatches=args.global_batch // (args.dp * args.micro_batch),
                          vpp=args.vpp, schedule=pins.schedule, recompute=args.recompute,
                          zero=args.zero, sp=args.sp, tp_overlap=args.tp_overlap)


def run(args: argparse.Namespace) -> int:
    from tripar.partitioner import Spelling, check_pins, step_estimate

    cluster = cluster_from_args(args)
    config = parallel_config(args, cluster.devices)
    degrees = tuple(sorted({2, 4, 8, config.tp} - {1}))
    graph = load_proxy_graph(args, tp_degrees=degrees)  # costs scale to the microbatch
    check_pins(_pins(args), cluster.devices, args.global_batch, graph=graph,
               spelling=Spelling.CLI)  # the model: a pinned tp its regions support, pp*vpp
    estimate = step_estimate(graph, cluster, config, dtype=args.dtype,
                             record_timeline=bool(args.timeline))
    if args.timeline:
        from tripar.partitioner.timeline import draw_timeline

        draw_timeline(estimate.sim, args.timeline)
    report = to_report(args.model, graph, cluster, config, estimate)
    if args.format == "json":
        print(json.dumps(report))
    else:
        _print(report, args.timeline)
    if not estimate.fits:
        raise InfeasibleError(does_not_fit(estimate, config))
    return 0


def does_not_fit(estimate, config: ParallelConfig) -> str:
    """The shortfall of a configuration that needs more memory than a device has, and fixes."""
    ranks = estimate.rank_memory_bytes or (estimate.peak_memory_bytes,)
    rank = max(range(len(ranks)), key=lambda r: ranks[r])
    need, limit = estimate.peak_memory_bytes, estimate.memory_limit_bytes
    stages = [s for s in range(config.pp * config.vpp) if s % config.pp == rank]
    fixes = ["--recompute full"] if config.recompute != "full" else []
    if config.dp > 1 and not config.zero:
        fixes.append("--zero 1")
    if config.micro_batch_size > 1:
        fixes.append("a smaller --micro-batch")
    fixes += ["a larger --pp or --tp", "more devices, or `tripar plan` to search"]
    return (f"the configuration does not fit: pipeline rank {rank} (stage"
            f"{'s' if len(stages) > 1 else ''} {', '.join(map(str, stages))}) needs {need} "
            f"bytes ({need / 2**30:.2f} GiB) at its peak, {need - limit} bytes more than the "
            f"{limit} bytes ({limit / 2**30:.2f} GiB) a device has; fix: {', '.join(fixes)}")


def to_report(model: str, graph, cluster, config: ParallelConfig, estimate) -> dict:
    """The JSON object ``--format json`` prints."""
    model_flops_per_s = graph.flops_per_sample * config.global_batch_size / estimate.step_time_s
    bounds = (*estimate.boundaries, len(graph.blocks))
    stages = []
    for s, cost in enumerate(estimate.stage_costs):
        blocks = graph.blocks[bounds[s]:bounds[s + 1]]
        stages.append({
            "stage": s, "rank": s % config.pp,
            "blocks": [blocks[0].name, blocks[-1].name],
            "block_range": [bounds[s], bounds[s + 1] - 1],
            "layers": sum(b.kind == "layer" for b in blocks),
            "time_s": estimate.stage_time_s[s],
            "forward_s": cost.forward_s, "backward_input_s": cost.backward_input_s,
            "backward_weight_s": cost.backward_weight_s, "recompute_s": cost.recompute_s,
            "send_s": cost.send_s, "tail_s": cost.tail_s,
            "activation_bytes": cost.activation_bytes, "static_bytes": cost.static_bytes,
            "memory_bytes": estimate.stage_memory_bytes[s],
            "memory_at_rank_peak_bytes": estimate.sim.stage_bytes_at_rank_peak[s],
            "recompute": estimate.recompute[s],
            "selective": bool(estimate.selective and estimate.selective[s]),
        })
    devices = [{"rank": r, "peak_bytes": estimate.rank_memory_bytes[r],
                "stages": list(range(r, len(stages), config.pp))} for r in range(config.pp)]
    return {
        "model": model,
        "cluster": {"name": cluster.name, "device": cluster.device.name,
                    "nodes": cluster.nodes, "devices_per_node": cluster.devices_per_node},
        "config": {"dp": config.dp, "tp": config.tp, "pp": config.pp, "vpp": config.vpp,
                   "micro_batch_size": config.micro_batch_size,
                   "num_microbatches": config.num_microbatches,
                   "global_batch_size": config.global_batch_size,
                   "schedule": config.schedule, "recompute": config.recompute,
                   "zero": config.zero, "sp": config.sp, "tp_overlap": config.tp_overlap,
                   "seq_len": graph.seq_len},
        "estimate": {"step_time_s": estimate.step_time_s,
                     "tokens_per_s": estimate.tokens_per_s,
                     "samples_per_s": estimate.samples_per_s,
                     "peak_memory_bytes": estimate.peak_memory_bytes,
                     "memory_limit_bytes": estimate.memory_limit_bytes,
                     "fits": estimate.fits,
                     "bubble_fraction": estimate.bubble_fraction,
                     "model_flops_per_s_per_device": model_flops_per_s / config.devices},
        "stages": stages,
        "devices": devices,
    }


def _print(report: dict, timeline: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    est, cfg, cl = report["estimate"], report["config"], report["cluster"]
    console = Console()
    console.print(
        f"[bold]{report['model']}[/] on {cl['nodes']} x {cl['devices_per_node']} "
        f"{cl['device']}: dp={cfg['dp']} tp={cfg['tp']} pp={cfg['pp']} vpp={cfg['vpp']}, "
        f"{cfg['num_microbatches']} microbatches of {cfg['micro_batch_size']} "
        f"(global batch {cfg['global_batch_size']}, seq {cfg['seq_len']}), {cfg['schedule']}, "
        f"recompute {cfg['recompute']}, zero {cfg['zero']}"
        + (", sequence parallel" if cfg.get("sp") else "")
        + (f", tp-overlap {cfg['tp_overlap']}" if cfg.get("tp_overlap", 1) > 1 else ""))
    fits = "[green]fits[/]" if est["fits"] else "[red]DOES NOT FIT[/]"
    console.print(
        f"step {est['step_time_s'] * 1e3:.1f} ms | {est['tokens_per_s']:,.0f} tokens/s | "
        f"{est['model_flops_per_s_per_device'] / 1e12:.3g} model TFLOP/s per device | "
        f"bubble {est['bubble_fraction']:.1%} | peak memory "
        f"{est['peak_memory_bytes'] / 2**30:.2f} of {est['memory_limit_bytes'] / 2**30:.1f} GiB "
        f"({fits})")
    table = Table(title="stages: ms per microbatch, peak GiB", box=None, pad_edge=False)
    for column in ("stage", "rank", "blocks", "layers", "F", "B", "W", "R", "send", "tail",
                   "recomp", "peak"):
        table.add_column(column, justify="right")
    for st in report["stages"]:
        table.add_row(str(st["stage"]), str(st["rank"]), "-".join(map(str, st["block_range"])),
                      str(st["layers"]), *(_ms(st[k]) for k in (
                          "forward_s", "backward_input_s", "backward_weight_s", "recompute_s",
                          "send_s", "tail_s")),
                      ("sel" if st["selective"] and not st["recompute"] else
                       f"{st['recompute']:.0%}" + (" +sel" if st["selective"] else "")),
                      f"{st['memory_bytes'] / 2**30:.2f}")
    console.print(table)
    if cfg["vpp"] > 1:
        console.print("device memory at each rank's peak = its virtual stages' parts:")
        for dev in report["devices"]:
            parts = " + ".join(
                f"stage {s} {fmt_bytes(report['stages'][s]['memory_at_rank_peak_bytes'])}"
                for s in dev["stages"])
            console.print(f"  rank {dev['rank']}: {fmt_bytes(dev['peak_bytes'])} = {parts}",
                          highlight=False)
    if timeline:
        console.print(f"timeline written to {timeline}")


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"
