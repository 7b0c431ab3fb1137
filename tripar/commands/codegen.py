"""``tripar codegen PLAN.json --out DIR``: every rank's stage programs as readable Python.

The model is rebuilt from the plan's MODEL spec (or the MODEL given) on the meta
device, so no weight is allocated; it is captured at the plan's microbatch size and
checked against the plan (blocks, parameter count, fingerprint). For each rank
``(pp_rank, tp_rank)`` the command writes ``DIR/rank_pp{p}_tp{t}/stage_{s}.py`` (one
per virtual stage the rank holds) and ``param_map.json`` (local parameter name ->
original FQN, the dim it is cut on and the index ranges kept), plus
``DIR/param_map.json`` with every rank's map.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tripar.commands._model_args import MODEL_HELP
from tripar.errors import ConfigError, ModelSpecError, PlanError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "codegen", help="write every rank's stage programs and the parameter map",
        description=__doc__.splitlines()[0])
    parser.add_argument("plan", metavar="PLAN", help="a plan JSON written by `tripar plan --out`")
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="the model, when the plan's spec cannot rebuild it: " + MODEL_HELP)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write into")
    parser.add_argument("--batch", type=int, default=1, metavar="N",
                        help="the --batch the plan was made with (its fingerprint depends on "
                             "it; default 1)")
    parser.add_argument("--seq", type=int, default=None, metavar="S",
                        help="sequence length (default: the plan's)")
    parser.set_defaults(func=run)


def _load(spec: str, batch: int, seq: int | None) -> Any:
    from tripar.models.spec import load_model

    try:
        return load_model(spec, batch_size=batch, seq_len=seq, device="meta")
    except ModelSpecError as error:
        raise ModelSpecError(f"cannot rebuild the plan's model {spec!r}: {error}; pass the "
                             "model as MODEL after the plan file") from None


def _capture(loaded: Any) -> tuple[Any, list[Any]]:
    from tripar.graph.capture import capture, flat_graph_inputs

    gm = capture(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    return gm, flat_graph_inputs(gm, loaded.example_inputs, loaded.example_kwargs)


def _fingerprint(gm: Any, loaded: Any, batch: int, seq: int | None) -> str:
    """``model_fingerprint`` of the proxy graph, as ``tripar plan`` measured it."""
    from tripar.graph.annotate import annotate
    from tripar.graph.build import build_proxy_graph
    from tripar.plan.plan import model_fingerprint

    annotate(gm, loaded.example_inputs, loaded.example_kwargs)
    graph = build_proxy_graph(gm, batch_size=batch, seq_len=seq or 1, tp_degrees=())
    return model_fingerprint(graph.blocks)


def run(args: argparse.Namespace) -> int:
    from tripar.codegen.build import build_pipeline, write_rank
    from tripar.plan.plan import Plan

    for name in ("batch", "seq"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {value}")
    plan = Plan.load(args.plan).validate()
    spec = args.model or plan.model.spec
    seq = args.seq or plan.inputs.seq_len
    micro = plan.parallel.micro_batch_size
    loaded = _load(spec, micro, seq)
    gm, flat = _capture(loaded)
    if args.batch == micro:
        fingerprint = _fingerprint(gm, loaded, args.batch, seq)
    else:
        measured = _load(spec, args.batch, seq)
        fingerprint = _fingerprint(_capture(measured)[0], measured, args.batch, seq)
    if fingerprint != plan.model.fingerprint:
        raise PlanError(
            f"{args.plan} was made for model {plan.model.spec!r} (fingerprint "
            f"{plan.model.fingerprint}); {spec!r} measured at --batch {args.batch} has "
            f"fingerprint {fingerprint}: give the MODEL and --batch the plan was made with, "
            "or re-plan (tripar plan ... --out)")
    out = Path(args.out)
    programs = []
    for tp_rank in range(plan.parallel.tp):
        for program in build_pipeline(gm, plan, flat, tp_rank=tp_rank, materialize=False):
            write_rank(program, out / f"rank_pp{program.pp_rank}_tp{tp_rank}")
            programs.append(program)
    programs.sort(key=lambda p: (p.pp_rank, p.tp_rank))
    index = {"plan": str(args.plan), "model": spec, "pp": plan.parallel.pp,
             "tp": plan.parallel.tp, "vpp": plan.parallel.vpp,
             "ranks": [p.param_map() for p in programs]}
    (out / "param_map.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _summary(plan, programs, out)
    return 0


def _summary(plan: Any, programs: list[Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    par = plan.parallel
    table = Table(title=f"{plan.model.spec}: pp={par.pp} tp={par.tp} vpp={par.vpp}, "
                        f"microbatch {par.micro_batch_size}", box=None, pad_edge=False)
    for column in ("rank", "stage", "blocks", "params", "receives", "sends", "sliced"):
        table.add_column(column, justify="right" if column in ("params", "sliced") else "left",
                         no_wrap=True, overflow="ellipsis",
                         max_width=36 if column == "blocks" else None)
    for program in programs:
        for stage in program.stages:
            blocks = stage.blocks[0] if len(stage.blocks) == 1 else \
                f"{len(stage.blocks)}: {stage.blocks[0]} .. {stage.blocks[-1]}"
            count = sum(p.numel() for p in stage.module.parameters())
            sliced = sum(1 for _, fqn in stage.params if fqn in program.shards)
            table.add_row(f"pp{program.pp_rank} tp{program.tp_rank}", str(stage.index), blocks,
                          f"{count:,}", _io(stage.received), _io(stage.sent), str(sliced))
    console = Console(file=sys.stdout, width=max(120, Console().width))
    console.print(table)
    files = sum(len(p.stages) + 1 for p in programs) + 1
    console.print(f"wrote {files} files for {len(programs)} ranks to {out}")


_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
          "bool": "bool"}


def _io(specs: Any) -> str:
    if not specs:
        return "-"
    first = specs[0]
    text = f"{_SHORT.get(first.dtype_name, first.dtype_name)}[{','.join(map(str, first.shape))}]"
    return text if len(specs) == 1 else f"{text} +{len(specs) - 1}"
