"""``tripar bench [--quick] [--out DIR]``: run the benchmark suite and write its report.

The suite lives in the repository's ``benchmarks/`` folder (``report.py`` and the
scripts it calls), next to the ``tripar`` package of a source checkout; the report is
``DIR/REPORT.md`` with its PNGs. The measured part starts 2 local CPU processes and
times them: run it on a machine left otherwise idle. ``--quick`` runs small sizes (a
smoke test, under a minute) and writes to ``benchmarks/results/quick`` unless ``--out``
says otherwise, so the full report is left alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from tripar.errors import ConfigError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench", help="run the benchmarks and write benchmarks/results/REPORT.md",
        description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, a smoke test (under a minute)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for REPORT.md and the PNGs (default benchmarks/results, "
                             "with --quick benchmarks/results/quick)")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="reuse DIR/cpu_profile.json instead of running tripar calibrate")
    parser.add_argument("--benchmarks", default=None, metavar="DIR",
                        help="the benchmarks folder (default: the one beside the tripar "
                             "package of this checkout)")
    parser.set_defaults(func=run)


def benchmarks_dir(given: str | None = None) -> Path:
    """The folder holding ``report.py``: ``given``, or ``benchmarks/`` of this checkout."""
    folder = Path(given) if given else Path(__file__).resolve().parents[2] / "benchmarks"
    if not (folder / "report.py").is_file():
        raise ConfigError(f"no benchmark suite at {folder} (report.py is missing); tripar "
                          f"bench runs from a source checkout of tripar: pass --benchmarks "
                          f"DIR pointing at its benchmarks/ folder")
    return folder


def load_report(folder: Path) -> ModuleType:
    """Import ``folder/report.py`` (which imports its sibling scripts)."""
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("report", folder / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["report"] = module
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    folder = benchmarks_dir(args.benchmarks)
    out = Path(args.out) if args.out else folder / "results" / ("quick" if args.quick else "")
    report = load_report(folder)
    path = report.generate(out, quick=args.quick, calibrate=not args.no_calibrate)
    print(f"wrote {path}")
    return 0
