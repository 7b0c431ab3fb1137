"""``tripar train MODEL --nproc N``: train on N local CPU processes, with a progress bar.

Every rank builds the model from MODEL with the same seed, calls
``tripar.auto_parallel`` (the plan options pin what they name, the search chooses the
rest) and trains ``--steps`` steps. Causal language models (``gpt``, ``llama``) read
the text corpus tripar generates (:mod:`tripar.data`, one token per character; the
vocabulary is the corpus's unless the spec sets a larger one); other models train on
a fixed pool of their own example batches. Rank 0 reports each step's loss, time and
tokens per second to the launcher, which draws them. A failing rank stops the job with
an error naming it; Ctrl-C stops every local process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from tripar.commands._model_args import MODEL_HELP
from tripar.errors import ConfigError
from tripar.plan.config import SCHEDULES

TEXT_FAMILIES = ("gpt", "llama")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model on N local CPU processes with the plan tripar chooses",
        description=__doc__.splitlines()[0])
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--nproc", type=int, default=2, help="local processes (default 2)")
    parser.add_argument("--global-batch", type=int, default=16, metavar="B",
                        help="samples per step, all replicas together (default 16)")
    parser.add_argument("--seq", type=int, default=None, metavar="S",
                        help="sequence length (default: the spec's seq)")
    parser.add_argument("--steps", type=int, default=100, metavar="K", help="steps (default 100)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--clip", type=float, default=1.0,
                        help="clip gradients to this global norm (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="weights and data seed")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: autocast with fp32 master weights (default fp32)")
    group = parser.add_argument_group("plan pins (anything not pinned is searched)")
    for name in ("dp", "tp", "pp", "vpp"):
        group.add_argument(f"--{name}", type=int, default=None, help=f"pin {name}")
    group.add_argument("--microbatches", type=int, default=None, metavar="M",
                       help="pin the microbatches per step and replica")
    group.add_argument("--schedule", choices=("auto", *SCHEDULES), default="auto")
    group.add_argument("--recompute", choices=("auto", "none", "full", "stage-aware"),
                       default="auto")
    group.add_argument("--zero", choices=("auto", "0", "1"), default="auto")
    parser.add_argument("--save", default=None, metavar="DIR", help="save a checkpoint at the end")
    parser.add_argument("--load", default=None, metavar="DIR", help="start from a checkpoint")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SEC",
                        help="seconds a rank waits for another before giving up (default 120)")
    parser.add_argument("--log-every", type=int, default=0, metavar="N",
                        help="print a line every N steps (default: about 10 lines)")
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="json: one JSON summary on stdout, no progress bar")
    parser.set_defaults(func=run)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    for name in ("nproc", "global_batch", "steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got "
                              f"{getattr(args, name)}")
    if args.seq is not None and args.seq < 1:
        raise ConfigError(f"--seq must be a positive integer, got {args.seq}")
    if not args.lr > 0 or args.clip < 0 or not args.timeout > 0:
        raise ConfigError("--lr and --timeout must be positive and --clip >= 0")
    return {
        "model": args.model, "global_batch": args.global_batch, "seq": args.seq,
        "steps": args.steps, "lr": args.lr, "clip": args.clip or None, "seed": args.seed,
        "dp": args.dp, "tp": args.tp, "pp": args.pp, "vpp": args.vpp,
        "num_microbatches": args.microbatches,
        "schedule": None if args.schedule == "auto" else args.schedule,
        "recompute": None if args.recompute == "auto" else args.recompute,
        "zero": None if args.zero == "auto" else int(args.zero),
        "save": args.save, "load": args.load, "timeout": args.timeout,
        "precision": args.precision,
    }


def _spec(model: str) -> str:
    """MODEL, with the corpus's vocabulary for a text model that does not set one."""
    from tripar.data import CharTokenizer, corpus
    from tripar.models.spec import parse_spec

    family, raw = parse_spec(model)
    if family in TEXT_FAMILIES and "vocab" not in raw:
        vocab = CharTokenizer.from_text(corpus()).vocab_size
        return f"{model}{',' if ':' in model else ':'}vocab={vocab}"
    return model


def _data(opts: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(LoadedModel, example batch, batch(step) function giving global batches)."""
    from tripar.models.spec import load_model, parse_spec

    family, _ = parse_spec(opts["model"])
    spec, batch = _spec(opts["model"]), opts["global_batch"]
    if family in TEXT_FAMILIES:
        from tripar.data import CharTokenizer, TextBatches, corpus

        tok = CharTokenizer.from_text(corpus())
        loaded = load_model(spec, batch_size=batch, seq_len=opts["seq"], seed=opts["seed"])
        if loaded.config["vocab"] < tok.vocab_size:
            raise ConfigError(f"the model's vocab={loaded.config['vocab']} is smaller than the "
                              f"corpus's {tok.vocab_size} characters; drop vocab= from MODEL")
        seq = loaded.example_inputs[0].shape[1]
        text = TextBatches(tok.encode(corpus()), batch, seq, seed=opts["seed"])
        return loaded, loaded.example_inputs, text.batch
    loaded = load_model(spec, batch_size=batch, seq_len=opts["seq"], seed=opts["seed"])
    pool = [load_model(spec, batch_size=batch, seq_len=opts["seq"], seed=opts["seed"] + 1 + k,
                       device="cpu") for k in range(4)]
    batches = [p.example_kwargs or p.example_inputs for p in pool]
    return loaded, loaded.example_kwargs or loaded.example_inputs, \
        lambda step: batches[step % len(batches)]


def train_rank(opts: dict[str, Any]) -> dict[str, Any]:
    """What each rank runs (inside ``launch_local``, or under torchrun)."""
    import torch
    import torch.distributed as dist

    from tripar.api import auto_parallel
    from tripar.runtime.launch import report

    loaded, example, batch_of = _data(opts)
    args = example if isinstance(example, tuple) else ()
    kwargs = example if isinstance(example, dict) else None
    t0 = time.perf_counter()
    model = auto_parallel(
        loaded.model, example_inputs=args, example_kwargs=kwargs,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=opts["lr"]),
        global_batch_size=opts["global_batch"], dp=opts["dp"], tp=opts["tp"], pp=opts["pp"],
        vpp=opts["vpp"], num_microbatches=opts["num_microbatches"], schedule=opts["schedule"],
        recompute=opts["recompute"], zero=opts["zero"], max_grad_norm=opts["clip"],
        precision=opts.get("precision", "fp32"), seed=opts["seed"], timeout_s=opts["timeout"],
        model_spec=loaded.spec)
    build_s = time.perf_counter() - t0
    rank = dist.get_rank()
    par = model.plan.parallel
    if rank == 0:
        report({"event": "plan", "build_s": build_s,
                "text": f"dp={par.dp} tp={par.tp} pp={par.pp} vpp={par.vpp} | micro-batch "
                        f"{par.micro_batch_size} x {par.num_microbatches} | {par.schedule} | "
                        f"ZeRO-{par.zero}"})
    if opts["load"]:
        model.load(opts["load"])
    tokens = opts["global_batch"] * (loaded.config.get("seq") if loaded.family in TEXT_FAMILIES
                                     else 1)
    losses = []
    start = model.steps
    for step in range(start, start + opts["steps"]):
        t = time.perf_counter()
        loss = model.train_step(batch_of(step))
        dt = time.perf_counter() - t
        losses.append(loss)
        if rank == 0:
            report({"event": "step", "step": step + 1, "loss": loss, "time_s": dt,
                    "tokens_per_s": tokens / dt})
    if opts["save"]:
        model.save(opts["save"])
    model.close()
    return {"losses": losses, "plan": par.__repr__(), "build_s": build_s}


class _Progress:
    """Draws rank 0's reports: a rich progress bar and a line every ``every`` steps."""

    def __init__(self, total: int, every: int, enabled: bool) -> None:
        self.total, self.every, self.enabled = total, every, enabled
        self.first: float | None = None
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.console = Console(stderr=False)
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[step_ms]} ms/step"),
                TextColumn("{task.fields[tps]} tokens/s"), console=self.console, transient=False)
            self.task = self.progress.add_task("train", total=total, loss="-", step_ms="-",
                                               tps="-")

    def __enter__(self) -> _Progress:
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, rank: int, message: dict) -> None:
        if not self.enabled:
            return
        if message["event"] == "plan":
            self.console.print(f"plan: {message['text']} (built in {message['build_s']:.1f} s)")
            return
        step, loss = message["step"], message["loss"]
        if self.first is None:
            self.first = loss
        self.progress.update(self.task, completed=step, loss=f"{loss:.3f}",
                             step_ms=f"{message['time_s'] * 1e3:.0f}",
                             tps=f"{message['tokens_per_s']:,.0f}")
        if step % self.every == 0 or step == 1:
            self.console.print(f"step {step:>5}  loss {loss:7.4f}  "
                               f"{message['time_s'] * 1e3:6.0f} ms  "
                               f"{message['tokens_per_s']:>9,.0f} tokens/s")


def _check_before_launch(opts: dict[str, Any], nproc: int) -> None:
    """Fail before any process starts, naming the flags, on a bad MODEL, pins no plan can
    meet, or a checkpoint to load that is missing, corrupt or of another version."""
    from tripar.models import load_model
    from tripar.partitioner import Pins, Spelling, check_pins

    loaded = load_model(_spec(opts["model"]), seq_len=opts["seq"], device="meta")
    pins = Pins(**{k: opts[k] for k in ("dp", "tp", "pp", "vpp", "num_microbatches",
                                        "schedule", "recompute", "zero")})
    check_pins(pins, nproc, opts["global_batch"], heads=loaded.config.get("heads"),
               hidden=loaded.config.get("hidden"), spelling=Spelling.CLI)
    if opts["load"]:
        from tripar.runtime.checkpoint import read_manifest

        read_manifest(opts["load"])


def run(args: argparse.Namespace) -> int:
    from tripar.runtime.launch import launch_local

    opts = _options(args)
    _check_before_launch(opts, args.nproc)
    every = args.log_every or max(1, math.ceil(opts["steps"] / 10))
    t0 = time.perf_counter()
    with _Progress(opts["steps"], every, args.format == "text") as progress:
        results = launch_local(train_rank, args.nproc, opts, timeout_s=opts["timeout"],
                               on_message=progress)
    wall = time.perf_counter() - t0
    losses = results[0]["losses"]
    if args.format == "json":
        json.dump({"losses": losses, "plan": results[0]["plan"], "wall_s": wall,
                   "build_s": results[0]["build_s"]}, sys.stdout)
        print()
    else:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps, "
              f"{wall:.1f} s in all")
    return 0
