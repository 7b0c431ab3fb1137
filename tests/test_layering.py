"""Imports go one way (docs/architecture.md).

The layering itself is a contract in pyproject.toml that ``lint-imports`` checks (CI runs
it; so does the first test here). The rest checks what the contracts cannot say: no
module imports itself back, function-level imports included; no private name is
imported from another module; the API imports only the package faces; and the planning
layers never import ``torch.distributed`` (import-linter sees external packages only as
their top-level name).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tripar"
FACES = ("tripar.errors", "tripar.plan", "tripar.graph", "tripar.models", "tripar.partitioner",
         "tripar.codegen", "tripar.runtime")


def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    return [node for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Import | ast.ImportFrom)]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_import_contracts_are_kept() -> None:
    result = subprocess.run([sys.executable, "-c", "import importlinter.cli as c; "
                             "c.lint_imports_command()"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert ", 0 broken." in result.stdout, result.stdout[-3000:]


def test_no_module_imports_itself_back() -> None:
    graph = grimp.build_graph("tripar", include_external_packages=False, cache_dir=None)
    edges = nx.DiGraph((m, d) for m in graph.modules
                       for d in graph.find_modules_directly_imported_by(m))
    cycles = sorted(sorted(c) for c in nx.simple_cycles(edges, length_bound=8))
    assert not cycles, "import cycles (function-level imports count):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_no_private_name_is_imported_from_another_module() -> None:
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _module_name(path)
        for node in _imports(path):
            if not isinstance(node, ast.ImportFrom) or not node.module or node.level:
                continue
            if not node.module.startswith("tripar") or node.module == here:
                continue
            private = [a.name for a in node.names if a.name.startswith("_")]
            module_private = [p for p in node.module.split(".")[1:] if p.startswith("_")]
            package = node.module.rsplit(".", 1)[0]
            if private or (module_private and not here.startswith(package)):
                offences.append(f"{here} imports {private or node.module} from {node.module}")
    assert not offences, "\n".join(offences)


def test_the_api_imports_only_package_faces() -> None:
    names = {node.module for node in _imports(PACKAGE / "api.py")
             if isinstance(node, ast.ImportFrom) and node.module}
    names |= {a.name for node in _imports(PACKAGE / "api.py") if isinstance(node, ast.Import)
              for a in node.names}
    inner = sorted(n for n in names if n.startswith("tripar") and n not in FACES)
    assert not inner, f"tripar/api.py reaches past the package faces: {inner}"


OFFLINE = ("plan", "graph", "partitioner", "models", "commands/inspect.py", "commands/plan.py",
           "commands/explain.py", "commands/show.py", "commands/simulate.py")


@pytest.mark.parametrize("where", OFFLINE)
def test_planning_never_imports_torch_distributed(where: str) -> None:
    target = PACKAGE / where
    paths = [target] if target.suffix else sorted(target.rglob("*.py"))
    offences = []
    for path in paths:
        for node in _imports(path):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""])
            offences += [f"{path.relative_to(ROOT)} imports {n}" for n in names
                         if n == "torch.distributed" or n.startswith("torch.distributed.")]
    assert not offences, "\n".join(offences)


def test_benchmarks_never_import_the_test_tree() -> None:
    offences = []
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        for node in _imports(path):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""])
            offences += [f"{path.relative_to(ROOT)} imports {n}" for n in names
                         if n == "tests" or n.startswith("tests.")]
    assert not offences, "benchmarks must not depend on the tests (move the helper into " \
        "the package, as tripar.partitioner.examples holds the example graph):\n" + \
        "\n".join(offences)
