"""The ``tripar`` command line.

Each subcommand lives in ``tripar/commands/<name>.py`` and exposes
``add_parser(subparsers)`` (which registers its arguments and sets
``func``). This module only wires them together, so ``tripar plan`` never
imports ``torch.distributed``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from tripar.errors import TriparError

# Order is the order ``tripar --help`` lists them.
COMMANDS = ("inspect", "plan", "explain", "show", "simulate", "calibrate", "codegen", "train",
            "export", "report", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tripar",
        description="Automatic data, pipeline and tensor parallelism for PyTorch.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        if importlib.util.find_spec(f"tripar.commands.{name}") is None:
            continue  # not built yet
        module = importlib.import_module(f"tripar.commands.{name}")
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TriparError as error:
        if args.debug:
            for name in ("traceback", "details"):  # a failed rank's traceback, a tracer's output
                detail = getattr(error, name, "")
                if isinstance(detail, str) and detail.strip():
                    print(detail, file=sys.stderr)
            raise
        print(f"tripar {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tripar {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tripar show plan.json | head`: the reader left; say nothing
        try:  # keep the interpreter's final flush from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141


if __name__ == "__main__":
    sys.exit(main())
