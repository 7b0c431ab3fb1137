"""``tripar train MODEL --nproc N``: train on N local CPU processes, with a progress bar.

Every rank builds the model from MODEL with the same seed, calls
``tripar.auto_parallel`` (the plan options pin what they name, the search chooses the
rest) and trains ``--steps`` steps. Causal language models (``gpt``, ``llama``, and
``hf:`` models whose batch is ``input_ids`` and ``labels``) read ``--data`` (text, token
files, records: :func:`tripar.data.read_tokens`), tokenized by ``--tokenizer`` or as
bytes, or without it the text corpus tripar generates (one token per character); the
vocabulary is the data's unless the spec sets a larger one. Other models train on a
fixed pool of their own example batches. Batches come in seeded epochs
(:class:`tripar.data.TokenBatches`); every rank draws the same global batch and each
data-parallel rank trains on its rows. ``--save`` keeps the data position in the
checkpoint's manifest (``extra.data``), so ``--load`` continues the same stream.
``--init-from DIR`` starts from a transformers checkpoint's weights (MODEL defaults to
``hf:DIR``): the model is built on the meta device and each rank reads only the slices
it holds (:mod:`tripar.runtime.pretrained`).

Rank 0 reports each step's loss, time and tokens per second to the launcher, which draws
them and, with ``--metrics``, writes one JSON line per logged step: step, loss, learning
rate, gradient norm, tokens/s, model TFLOP/s per device and MFU (from the proxy graph's
FLOPs, as ``tripar simulate`` counts them, and the plan's peak FLOP/s), peak memory of
every rank, times. A failing rank stops the job with an error naming it; Ctrl-C stops
every local process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from tripar.commands._model_args import MODEL_HELP
from tripar.errors import ConfigError
from tripar.partitioner.hardware import OPTIMIZER_STEP_BYTES
from tripar.plan.config import SCHEDULES, ZERO_STAGES

TEXT_FAMILIES = ("gpt", "llama")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model on N local CPU processes with the plan tripar chooses",
        description=__doc__.splitlines()[0])
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help=f"{MODEL_HELP} (default with --init-from DIR: hf:DIR, the model "
                             "its config.json names)")
    parser.add_argument("--nproc", type=int, default=2, help="local processes (default 2)")
    parser.add_argument("--global-batch", type=int, default=16, metavar="B",
                        help="samples per step, all replicas together (default 16)")
    parser.add_argument("--seq", type=int, default=None, metavar="S",
                        help="sequence length (default: the spec's seq)")
    parser.add_argument("--steps", type=int, default=100, metavar="K", help="steps (default 100)")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZER_STEP_BYTES), default="adamw",
                        help="adamw (torch's defaults but the learning rate), or plain sgd; "
                             "the planner costs its step (default adamw)")
    parser.add_argument("--lr", type=float, default=3e-3, help="(peak) learning rate")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                        help="after --warmup: constant, or cosine decay to --lr-min at "
                             "--decay-steps (default constant)")
    parser.add_argument("--warmup", type=int, default=0, metavar="K",
                        help="linear warmup: step k of the first K runs at lr (k+1)/K "
                             "(default 0)")
    parser.add_argument("--lr-min", type=float, default=None,
                        help="the cosine schedule's final learning rate (default lr/10)")
    parser.add_argument("--decay-steps", type=int, default=None, metavar="T",
                        help="the step the cosine reaches --lr-min (default: this run's last "
                             "step; give it when a run is resumed)")
    parser.add_argument("--clip", type=float, default=1.0,
                        help="clip gradients to this global norm (0: off; the norm is "
                             "measured and recorded either way)")
    parser.add_argument("--seed", type=int, default=0, help="weights and data seed")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: autocast with fp32 master weights (default fp32)")
    group = parser.add_argument_group("plan pins (anything not pinned is searched)")
    for name in ("dp", "tp", "pp", "vpp"):
        group.add_argument(f"--{name}", type=int, default=None, help=f"pin {name}")
    group.add_argument("--microbatches", type=int, default=None, metavar="M",
                       help="pin the microbatches per step and replica")
    group.add_argument("--schedule", choices=("auto", *SCHEDULES), default="auto")
    group.add_argument("--recompute", choices=("auto", "none", "selective", "full", "stage-aware"),
                       default="auto")
    group.add_argument("--zero", choices=("auto", *map(str, ZERO_STAGES)), default="auto",
                       help="ZeRO stage (auto: the planner decides)")
    group.add_argument("--sp", action=argparse.BooleanOptionalAction, default=None,
                       help="sequence parallelism (default: the planner decides)")
    group.add_argument("--tp-overlap", type=int, default=None, metavar="K",
                       help="sub-pipelined tensor parallelism: each microbatch in K parts "
                            "along the batch (the sequence at one sample per microbatch), one "
                            "part's collectives overlapping the next part's compute (needs "
                            "--tp > 1; default: the planner decides)")
    data = parser.add_argument_group("data (default: a generated text corpus)")
    data.add_argument("--data", default=None, metavar="PATH",
                      help="text (a file or a directory of files), a token file (.npy, or .bin "
                           "of uint16/uint32 tokens), .jsonl/.parquet records or a dataset "
                           "saved with save_to_disk (the last two need the datasets extra)")
    data.add_argument("--tokenizer", default=None, metavar="DIR",
                      help="a local transformers tokenizer directory (default: text as bytes, "
                           "vocabulary 256)")
    data.add_argument("--data-dtype", choices=("uint16", "uint32"), default=None,
                      help="dtype of a .bin token file (default uint16, or uint32 when the "
                           "tokenizer's vocabulary exceeds 65536)")
    data.add_argument("--text-column", default="text", metavar="NAME",
                      help="the text column of records and datasets (default text)")
    data.add_argument("--eval-data", default=None, metavar="PATH",
                      help="held-out data, in any --data form, read with the same tokenizer")
    data.add_argument("--eval-every", type=int, default=0, metavar="N",
                      help="report the held-out loss every N steps and at the end (default: "
                           "at the log interval)")
    data.add_argument("--eval-batches", type=int, default=4, metavar="K",
                      help="batches the held-out loss averages (default 4)")
    parser.add_argument("--metrics", default=None, metavar="FILE",
                        help="write a JSON line per logged step (see `tripar report`)")
    parser.add_argument("--save", default=None, metavar="DIR", help="save a checkpoint at the end")
    parser.add_argument("--load", default=None, metavar="DIR", help="start from a checkpoint")
    parser.add_argument("--init-from", default=None, metavar="DIR",
                        help="start from pretrained weights: a transformers checkpoint "
                             "directory (config.json and safetensors, sharded or not); each "
                             "rank reads only the slices it holds")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SEC",
                        help="seconds a rank waits for another before giving up (default 120)")
    parser.add_argument("--log-every", type=int, default=0, metavar="N",
                        help="print a line, and write a --metrics line, every N steps "
                             "(default: about 10 lines)")
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
    lr_min = args.lr / 10 if args.lr_min is None else args.lr_min
    if not 0 <= lr_min <= args.lr:
        raise ConfigError(f"--lr-min must be between 0 and --lr {args.lr}, got {lr_min}")
    for name in ("warmup", "eval_every"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got "
                              f"{getattr(args, name)}")
    for name in ("decay_steps", "eval_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got "
                              f"{getattr(args, name)}")
    if args.model is None and args.init_from is None:
        raise ConfigError("give MODEL, or --init-from DIR to train the model a transformers "
                          "checkpoint directory holds")
    if args.init_from is not None:
        from tripar.runtime.pretrained import weight_map

        weight_map(args.init_from, flag="--init-from ")  # a checkpoint directory, or the error
    if args.init_from is not None and args.load is not None:
        raise ConfigError("--init-from starts from pretrained weights and --load resumes a "
                          "tripar checkpoint; give one of them")
    if (args.tokenizer or args.data_dtype or args.eval_data) and not args.data:
        raise ConfigError("--tokenizer, --data-dtype and --eval-data read files given with "
                          "--data PATH; give --data")
    return {
        "model": args.model or f"hf:{args.init_from}", "init_from": args.init_from,
        "global_batch": args.global_batch, "seq": args.seq,
        "steps": args.steps, "lr": args.lr, "optimizer": args.optimizer, "clip": args.clip,
        "seed": args.seed,
        "lr_schedule": args.lr_schedule, "warmup": args.warmup, "lr_min": lr_min,
        "decay_steps": args.decay_steps, "eval_every": args.eval_every,
        "eval_batches": args.eval_batches, "data": None, "eval_data": None,
        "dp": args.dp, "tp": args.tp, "pp": args.pp, "vpp": args.vpp,
        "num_microbatches": args.microbatches,
        "schedule": None if args.schedule == "auto" else args.schedule,
        "recompute": None if args.recompute == "auto" else args.recompute,
        "zero": None if args.zero == "auto" else int(args.zero), "sp": args.sp,
        "tp_overlap": args.tp_overlap,
        "save": args.save, "load": args.load, "timeout": args.timeout,
        "precision": args.precision, "tokenizer": args.tokenizer, "data_dtype": args.data_dtype,
        "text_column": args.text_column, "metrics": args.metrics,
    }


def _spec(model: str, vocab: int | None = None) -> str:
    """MODEL, with the data's vocabulary (default: the generated corpus's) for a zoo text
    model that does not set one."""
    from tripar.data import CharTokenizer, corpus
    from tripar.models.spec import parse_spec

    family, raw = parse_spec(model)
    if family in TEXT_FAMILIES and "vocab" not in raw:
        vocab = vocab or CharTokenizer.from_text(corpus()).vocab_size
        return f"{model}{',' if ':' in model else ':'}vocab={vocab}"
    return model


def _prepare(path: str | None, opts: dict[str, Any], tokenizer: Any, workdir: str
             ) -> dict[str, Any] | None:
    """Read ``path`` once, before the ranks start: a token file is passed on as it is, text
    and records are tokenized into ``workdir`` (a .npy the ranks memory-map)."""
    if path is None:
        return None
    from tripar.data import TOKEN_SUFFIXES, read_tokens

    src = read_tokens(path, tokenizer, dtype=opts["data_dtype"], text_column=opts["text_column"])
    file = path if os.path.isfile(path) and path.endswith(TOKEN_SUFFIXES) else None
    if file is None:
        import numpy as np

        file = os.path.join(workdir, f"tokens-{len(os.listdir(workdir))}.npy")
        np.save(file, src.tokens)
    return {"file": file, "dtype": str(src.tokens.dtype), "vocab": src.vocab_size,
            "description": src.description, "path": path}


def _open_tokens(data: dict[str, Any]) -> Any:
    import numpy as np

    if data["file"].endswith(".npy"):
        return np.load(data["file"], mmap_mode="r", allow_pickle=False)
    return np.memmap(data["file"], dtype=data["dtype"], mode="r")


def _text_batch(loaded: Any) -> Any:
    """How a window batch ``(ids, targets)`` becomes the model's batch, or None when the
    model is not a causal language model: the zoo's ``(input_ids, targets)``, or an ``hf:``
    causal LM's ``input_ids``/``labels`` dict (labels = input_ids: the model shifts them)."""
    example = loaded.example_kwargs or loaded.example_inputs
    if loaded.family in TEXT_FAMILIES and isinstance(example, tuple) and len(example) == 2:
        return lambda ids, targets: (ids, targets)
    class_name = type(getattr(loaded.model, "model", loaded.model)).__name__ \
        if loaded.family == "hf" else ""
    if ("CausalLM" in class_name or "LMHead" in class_name) and isinstance(example, dict) \
            and {"input_ids", "labels"} <= set(example) \
            and tuple(example["labels"].shape) == tuple(example["input_ids"].shape):
        keys = set(example)

        def as_dict(ids: Any, targets: Any) -> dict[str, Any]:
            import torch

            out = {"input_ids": ids, "labels": ids.clone()}
            if "attention_mask" in keys:
                out["attention_mask"] = torch.ones_like(ids)
            return out
        return as_dict
    return None


def _data(opts: dict[str, Any]) -> tuple[Any, Any, Any, Any, Any]:
    """(LoadedModel, example batch, batch(position) giving global batches, the batches'
    TokenBatches or None, the held-out batches)."""
    import numpy as np

    from tripar.data import CharTokenizer, TokenBatches, corpus
    from tripar.models.spec import load_model

    data, batch = opts["data"], opts["global_batch"]
    spec = _spec(opts["model"], data["vocab"] if data else None)
    # pretrained weights are read slice by slice into the stages: no rank builds them all
    loaded = load_model(spec, batch_size=batch, seq_len=opts["seq"], seed=opts["seed"],
                        device="meta" if opts.get("init_from") else "cpu")
    example = loaded.example_kwargs or loaded.example_inputs
    form = _text_batch(loaded)
    if form is not None and (data or loaded.family in TEXT_FAMILIES):
        first = example[0] if isinstance(example, tuple) else example["input_ids"]
        seq = int(first.shape[1])
        if data:
            tokens = _open_tokens(data)
        else:
            text = corpus()
            tokens = np.asarray(CharTokenizer.from_text(text).encode(text))
        windows = TokenBatches(tokens, batch, seq, seed=opts["seed"])
        held = []
        if opts["eval_data"]:
            ev = TokenBatches(_open_tokens(opts["eval_data"]), batch, seq, seed=opts["seed"])
            held = [form(*ev.batch(k)) for k in range(min(opts["eval_batches"],
                                                          ev.steps_per_epoch))]
        return loaded, example, lambda pos: form(*windows.batch(pos)), windows, held
    pool = [load_model(spec, batch_size=batch, seq_len=opts["seq"], seed=opts["seed"] + 1 + k,
                       device="cpu") for k in range(4)]
    batches = [p.example_kwargs or p.example_inputs for p in pool]
    return loaded, example, lambda step: batches[step % len(batches)], None, []


def optimizer_factory(name: str, lr: float) -> Any:
    """``auto_parallel``'s ``optimizer``: params -> torch's AdamW or SGD at ``lr`` (the names
    of ``OPTIMIZER_STEP_BYTES``, whose bytes ``tripar plan --optimizer`` costs)."""
    import torch

    kind = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    return lambda params: kind(params, lr=lr)


def learning_rate(step: int, opts: dict[str, Any]) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warmup over
    ``warmup`` steps, then constant or a cosine from ``lr`` to ``lr_min`` at
    ``decay_steps``.

    >>> o = {"lr": 1.0, "lr_min": 0.1, "warmup": 2, "decay_steps": 12, "lr_schedule": "cosine"}
    >>> [round(learning_rate(s, o), 3) for s in (0, 1, 2, 7, 12, 20)]
    [0.5, 1.0, 1.0, 0.55, 0.1, 0.1]
    """
    lr, warmup = opts["lr"], opts["warmup"]
    if step < warmup:
        return lr * (step + 1) / warmup
    if opts["lr_schedule"] == "constant":
        return lr
    span = max(1, opts["decay_steps"] - warmup)
    t = min(1.0, (step - warmup) / span)
    return opts["lr_min"] + 0.5 * (lr - opts["lr_min"]) * (1 + math.cos(math.pi * t))


def _peak_memory() -> tuple[int, str]:
    """This process's peak memory: CUDA's allocator peak, or the resident set's (bytes)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "cuda_allocated"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "rss"


def _data_position(opts: dict[str, Any], windows: Any, steps: int) -> tuple[int, str]:
    """Where to resume the data stream from a checkpoint: its saved position when it is for
    the same stream, cut the same way; else its step count (an older checkpoint) or 0."""
    if not opts["load"] or windows is None:
        return steps, ""
    from tripar.runtime.checkpoint import read_manifest

    saved = read_manifest(opts["load"]).get("extra", {}).get("data")
    if not isinstance(saved, dict):
        return steps, ""
    if saved.get("identity") != windows.identity():
        return 0, (f"the checkpoint's data position is for other data ({saved.get('identity')}"
                   f"); this data starts at its beginning")
    return int(saved["position"]), ""


def train_rank(opts: dict[str, Any]) -> dict[str, Any]:
    """What each rank runs (inside ``launch_local``, or under torchrun)."""
    import torch.distributed as dist

    from tripar.api import auto_parallel
    from tripar.graph import capture_model
    from tripar.runtime.launch import report

    loaded, example, batch_of, windows, held = _data(opts)
    args = example if isinstance(example, tuple) else ()
    kwargs = example if isinstance(example, dict) else None
    t0 = time.perf_counter()
    captured = capture_model(loaded.model, args, kwargs)
    model = auto_parallel(
        loaded.model, example_inputs=args, example_kwargs=kwargs,
        optimizer=optimizer_factory(opts.get("optimizer", "adamw"), opts["lr"]),
        global_batch_size=opts["global_batch"], dp=opts["dp"], tp=opts["tp"], pp=opts["pp"],
        vpp=opts["vpp"], num_microbatches=opts["num_microbatches"], schedule=opts["schedule"],
        recompute=opts["recompute"], zero=opts["zero"], sp=opts.get("sp"),
        tp_overlap=opts.get("tp_overlap"),
        max_grad_norm=opts["clip"] or math.inf,  # inf: the norm is measured, nothing clipped
        precision=opts.get("precision", "fp32"), seed=opts["seed"], timeout_s=opts["timeout"],
        model_spec=loaded.spec, captured=captured, init_from=opts.get("init_from"))
    build_s = time.perf_counter() - t0
    rank, world = dist.get_rank(), dist.get_world_size()
    par = model.plan.parallel
    if rank == 0:
        report({"event": "plan", "build_s": build_s,
                "text": f"dp={par.dp} tp={par.tp} pp={par.pp} vpp={par.vpp} | micro-batch "
                        f"{par.micro_batch_size} x {par.num_microbatches} | {par.schedule} | "
                        f"ZeRO-{par.zero}" + (" | sp" if par.sp else "")
                        + (f" | tp-overlap {par.tp_overlap}" if par.tp_overlap > 1 else "")})
    if opts["load"]:
        model.load(opts["load"])
    position, note = _data_position(opts, windows, model.steps)
    if rank == 0:
        report({"event": "start", "step": model.steps})
        if note:
            report({"event": "note", "text": note})
    seq = int(captured.graph.seq_len) if windows is not None else 1
    tokens = opts["global_batch"] * seq
    flops = captured.graph.flops_per_sample * opts["global_batch"]
    peak = model.plan.cluster.peak_flops * world
    start, every = model.steps, opts["log_every"]
    last = start + opts["steps"]
    schedule = {**opts, "decay_steps": opts["decay_steps"] or last}
    losses, evals = [], []
    t_start = time.perf_counter()
    for step in range(start, last):
        lr = learning_rate(step, schedule)
        for group in model.optimizer.param_groups:
            group["lr"] = lr
        t = time.perf_counter()
        loss = model.train_step(batch_of(position))
        dt = time.perf_counter() - t
        position += 1
        losses.append(loss)
        done = step + 1
        eval_every = opts["eval_every"] or every
        eval_loss = None
        if held and (done % eval_every == 0 or done == last):
            eval_loss = sum(model.eval_step(b) for b in held) / len(held)
            evals.append((done, eval_loss))
        logged = done % every == 0 or done == start + 1 or done == last or eval_loss is not None
        memory = None
        if logged and opts["metrics"]:
            memory = [None] * world
            dist.all_gather_object(memory, _peak_memory())
        if rank == 0:
            message = {"event": "step", "step": done, "loss": loss, "time_s": dt,
                       "tokens_per_s": tokens / dt, "eval_loss": eval_loss}
            if memory is not None:
                message["metrics"] = {
                    "step": done, "loss": loss, "eval_loss": eval_loss, "lr": lr,
                    "grad_norm": model.last_grad_norm, "clip": opts["clip"] or None,
                    "tokens_per_s": tokens / dt, "samples_per_s": opts["global_batch"] / dt,
                    "model_tflops_per_device": flops / dt / world / 1e12,
                    "mfu": flops / dt / peak if peak else None,
                    "peak_memory_bytes": [m for m, _ in memory], "memory": memory[0][1],
                    "step_time_s": dt, "time_s": time.perf_counter() - t_start,
                    "data_position": position}
            report(message)
    if opts["save"]:
        extra = ({"data": {"position": position, "identity": windows.identity()}}
                 if windows is not None else None)
        model.save(opts["save"], extra=extra)
    model.close()
    return {"losses": losses, "eval": evals, "plan": par.__repr__(), "build_s": build_s,
            "data_position": position}


class _Progress:
    """Draws rank 0's reports: a rich progress bar and a line every ``every`` steps."""

    def __init__(self, total: int, every: int, enabled: bool) -> None:
        self.total, self.every, self.enabled = total, every, enabled
        self.first: float | None = None
        self.start = 0
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
        if message["event"] == "note":
            self.console.print(f"note: {message['text']}")
            return
        if message["event"] == "start":  # steps count on from a loaded checkpoint's
            self.start = message["step"]
            return
        step, loss = message["step"], message["loss"]
        if self.first is None:
            self.first = loss
        self.progress.update(self.task, completed=step - self.start, loss=f"{loss:.3f}",
                             step_ms=f"{message['time_s'] * 1e3:.0f}",
                             tps=f"{message['tokens_per_s']:,.0f}")
        if step % self.every == 0 or step == self.start + 1:
            self.console.print(f"step {step:>5}  loss {loss:7.4f}  "
                               f"{message['time_s'] * 1e3:6.0f} ms  "
                               f"{message['tokens_per_s']:>9,.0f} tokens/s")
        if message.get("eval_loss") is not None:
            self.console.print(f"step {step:>5}  held-out loss {message['eval_loss']:7.4f}")


def _check_before_launch(opts: dict[str, Any], nproc: int) -> None:
    """Fail before any process starts, naming the flags, on a bad MODEL, pins no plan can
    meet, data the model cannot read, a checkpoint to load that is missing, corrupt or
    of another version, or pretrained weights (--init-from) that are not this model's."""
    from tripar.models import load_model
    from tripar.partitioner import Pins, Spelling, check_pins

    data = opts["data"]
    loaded = load_model(_spec(opts["model"], data["vocab"] if data else None),
                        seq_len=opts["seq"], device="meta")
    pins = Pins(**{k: opts[k] for k in ("dp", "tp", "pp", "vpp", "num_microbatches",
                                        "schedule", "recompute", "zero", "sp", "tp_overlap")
                     if k in opts})
    check_pins(pins, nproc, opts["global_batch"], heads=loaded.config.get("heads"),
               hidden=loaded.config.get("hidden"), spelling=Spelling.CLI)
    if data:
        if _text_batch(loaded) is None:
            raise ConfigError(f"--data feeds token windows to a causal language model (gpt, "
                              f"llama, or an hf: ...CausalLM/...LMHeadModel); "
                              f"{opts['model']} takes another batch")
        vocab = loaded.config.get("vocab", loaded.config.get("vocab_size"))
        if isinstance(vocab, int) and vocab < data["vocab"]:
            raise ConfigError(f"the model's vocabulary ({vocab}) is smaller than the data's "
                              f"({data['vocab']}: {data['description']}); drop vocab= from "
                              f"MODEL or give a larger one")
        from tripar.data import TokenBatches

        example = loaded.example_kwargs or loaded.example_inputs
        first = example[0] if isinstance(example, tuple) else example["input_ids"]
        for flag, what in (("--data", data), ("--eval-data", opts["eval_data"])):
            if what:
                try:
                    TokenBatches(_open_tokens(what), opts["global_batch"], int(first.shape[1]))
                except ConfigError as error:
                    raise ConfigError(f"{flag} {what['path']}: {error}") from None
    if opts["load"]:
        from tripar.runtime.checkpoint import read_manifest

        read_manifest(opts["load"])
    if opts["init_from"]:
        from tripar.runtime import match_pretrained

        match_pretrained(loaded.model, opts["init_from"], flag="--init-from ")


class _Metrics:
    """Writes the ``metrics`` of rank 0's step reports to a JSON-lines file."""

    def __init__(self, path: str | None, append: bool) -> None:
        self.file = None
        if path:
            try:
                self.file = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
            except OSError as error:
                raise ConfigError(f"--metrics {path}: cannot write it ({error.strerror})"
                                  ) from None

    def __call__(self, rank: int, message: dict) -> None:
        if self.file is not None and message.get("metrics"):
            self.file.write(json.dumps(message["metrics"]) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def run(args: argparse.Namespace) -> int:
    from tripar.data import load_tokenizer
    from tripar.runtime.launch import launch_local

    opts = _options(args)
    every = args.log_every or max(1, math.ceil(opts["steps"] / 10))
    workdir = tempfile.mkdtemp(prefix="tripar-data-")
    try:
        if args.data:
            tokenizer = load_tokenizer(args.tokenizer)
            opts["data"] = _prepare(args.data, opts, tokenizer, workdir)
            opts["eval_data"] = _prepare(args.eval_data, opts, tokenizer, workdir)
        opts["log_every"] = every
        _check_before_launch(opts, args.nproc)
        metrics = _Metrics(opts["metrics"], append=bool(opts["load"]))
        t0 = time.perf_counter()
        try:
            with _Progress(opts["steps"], every, args.format == "text") as progress:
                def on_message(rank: int, message: dict) -> None:
                    metrics(rank, message)
                    progress(rank, message)
                results = launch_local(train_rank, args.nproc, opts, timeout_s=opts["timeout"],
                                       on_message=on_message)
        finally:
            metrics.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wall = time.perf_counter() - t0
    losses = results[0]["losses"]
    if args.format == "json":
        json.dump({"losses": losses, "eval": results[0]["eval"], "plan": results[0]["plan"],
                   "wall_s": wall, "build_s": results[0]["build_s"],
                   "data_position": results[0]["data_position"]}, sys.stdout)
        print()
    else:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps, "
              f"{wall:.1f} s in all")
    return 0
