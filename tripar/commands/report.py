"""``tripar report METRICS.jsonl --out run.png``: plot a run's loss and throughput.

Reads the JSON lines ``tripar train --metrics`` writes (one per logged step), prints a
summary, and draws two panels: the training loss (and the held-out loss, where measured)
and the throughput (tokens/s, with its MFU scale on the right axis). matplotlib is imported only
to draw (the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tripar.errors import ConfigError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report", help="plot the loss and throughput of a `tripar train --metrics` file",
        description=__doc__.splitlines()[0])
    parser.add_argument("metrics", metavar="METRICS", help="a JSON-lines file from --metrics")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="the image to write (default: METRICS with .png)")
    parser.set_defaults(func=run)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics file, checked to carry a step and a loss, in step order."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ConfigError(f"line {n} of {path} is not JSON; give the file "
                              f"`tripar train --metrics` writes") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) \
                or not isinstance(record.get("loss"), (int, float)):
            raise ConfigError(f"line {n} of {path} has no integer 'step' and numeric 'loss'; "
                              f"give the file `tripar train --metrics` writes")
        records.append(record)
    if not records:
        raise ConfigError(f"{path} holds no metrics lines")
    return sorted(records, key=lambda r: r["step"])


def summary(records: list[dict[str, Any]]) -> str:
    """One line: steps, loss first to last, mean throughput and MFU."""
    def mean(key: str) -> float | None:
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        return sum(values) / len(values) if values else None

    text = (f"steps {records[0]['step']}..{records[-1]['step']} ({len(records)} logged): "
            f"loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}")
    evals = [r for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if evals:
        text += f", held-out {evals[-1]['eval_loss']:.4f} at step {evals[-1]['step']}"
    tps, mfu = mean("tokens_per_s"), mean("mfu")
    if tps is not None:
        text += f"; {tps:,.0f} tokens/s"
    if mfu is not None:
        text += f", MFU {mfu:.2%}"
    return text


def plot(records: list[dict[str, Any]], out: str) -> None:
    """Draw the loss and throughput panels of ``records`` into ``out``."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("tripar report needs matplotlib: pip install 'tripar[plot]'"
                          ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    top.plot(steps, [r["loss"] for r in records], ".-", label="train")
    evals = [r for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if evals:
        top.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                 label="held-out")
    top.set_ylabel("loss")
    top.legend()
    top.grid(alpha=0.3)
    timed = [r for r in records if isinstance(r.get("tokens_per_s"), (int, float))]
    bottom.plot([r["step"] for r in timed], [r["tokens_per_s"] for r in timed], ".-",
                color="C2")
    bottom.set_ylabel("tokens/s")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    ratios = [r["mfu"] / r["tokens_per_s"] for r in timed
              if isinstance(r.get("mfu"), (int, float)) and r["tokens_per_s"] > 0]
    if ratios:  # MFU is tokens/s times a constant (FLOPs per token over the peak): an axis
        ratio = 100 * sum(ratios) / len(ratios)
        bottom.secondary_yaxis("right", functions=(lambda t: t * ratio, lambda m: m / ratio)
                               ).set_ylabel("MFU %")
    fig.suptitle(summary(records), fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100)
    except OSError as error:
        raise ConfigError(f"--out {out}: cannot write it ({error.strerror})") from None
    finally:
        plt.close(fig)


def run(args: argparse.Namespace) -> int:
    records = read_metrics(args.metrics)
    out = args.out or str(Path(args.metrics).with_suffix(".png"))
    plot(records, out)
    print(summary(records))
    print(f"plot written to {out}")
    return 0
