"""``tripar codegen PLAN.json --out DIR``: every rank's stage programs as readable Python.

The model is rebuilt from the plan's MODEL spec (or the MODEL given) on the meta
device, so no weight is allocated, and goes through the capture pass ``auto_parallel``
uses (``tripar.graph.captured.capture_model`` at ``--batch``, the batch the plan was
measured on, then ``for_micro_batch`` at the plan's microbatch size); it is checked
against the plan (blocks, parameter count, fingerprint). Codegen's ``build_pipeline``
then makes every rank's stage programs as the ranks run them, tensor-parallel rewrite
and per-block recomputation included. For each rank ``(pp_rank, tp_rank)`` the command
writes ``DIR/rank_pp{p}_tp{t}/stage_{s}.py`` (one per virtual stage the rank holds:
``forward`` and, for recomputed blocks, the checkpointed segments) and
``param_map.json`` (local parameter name -> original FQN, the dim it is cut on and the
index ranges kept), plus ``DIR/param_map.json`` with every rank's map.
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


def _capture(loaded: Any) -> Any:
    """The capture pass of ``auto_parallel`` for the loaded model and its example batch
    (regions are proven again for the plan's degree by the build, not here)."""
    from tripar.graph.captured import capture_model

    return capture_model(loaded.model, loaded.example_inputs, loaded.example_kwargs,
                         model_config=dict(loaded.config), tp_degrees=())


def run(args: argparse.Namespace) -> int:
    from tripar.codegen.build import build_pipeline, write_rank
    from tripar.codegen.split import propagate_values
    from tripar.graph.captured import for_micro_batch
    from tripar.plan.plan import Plan, model_fingerprint

    for name in ("batch", "seq"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {value}")
    plan = Plan.load(args.plan).validate()
    spec = args.model or plan.model.spec
    seq = args.seq or plan.inputs.seq_len
    captured = _capture(_load(spec, args.batch, seq))
    fingerprint = model_fingerprint(captured.graph.blocks)
    if fingerprint != plan.model.fingerprint:
        raise PlanError(
            f"{args.plan} was made for model {plan.model.spec!r} (fingerprint "
            f"{plan.model.fingerprint}); {spec!r} measured at --batch {args.batch} has "
            f"fingerprint {fingerprint}: give the MODEL and --batch the plan was made with, "
            "or re-plan (tripar plan ... --out)")
    micro = for_micro_batch(captured, plan.parallel.micro_batch_size)
    flat = list(micro.constants)
    values = propagate_values(micro.gm, flat)  # shared by every tensor-parallel rank's build
    out = Path(args.out)
    programs = []
    for tp_rank in range(plan.parallel.tp):
        for program in build_pipeline(micro.gm, plan, flat, tp_rank=tp_rank,
                                      materialize=False, values=values):
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
