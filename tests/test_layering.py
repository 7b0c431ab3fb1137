"""Imports go one way (DESIGN.md): plan <- graph <- partitioner <- codegen <- runtime.

Each layer imports only from the layers before it and from ``tripar.plan``; the
planner, the graph layer and the CLI's planning commands never import
``torch.distributed`` themselves.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tripar"

# What each layer may not import.
FORBIDDEN = {
    "plan": ("tripar.graph", "tripar.partitioner", "tripar.codegen", "tripar.runtime",
             "tripar.api", "torch.distributed"),
    "graph": ("tripar.partitioner", "tripar.codegen", "tripar.runtime", "tripar.api",
              "torch.distributed"),
    "partitioner": ("tripar.codegen", "tripar.runtime", "tripar.api", "torch.distributed"),
    "codegen": ("tripar.runtime", "tripar.api"),
    "models": ("tripar.graph", "tripar.partitioner", "tripar.codegen", "tripar.runtime",
               "tripar.api", "torch.distributed"),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_from_layers_before_it(layer: str) -> None:
    offences = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in sorted(_imports(path)):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[layer]):
                offences.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("command", ["inspect", "plan", "explain", "show", "simulate"])
def test_offline_commands_never_import_the_runtime(command: str) -> None:
    names = _imports(PACKAGE / "commands" / f"{command}.py")
    assert not {n for n in names if n.startswith(("tripar.runtime", "torch.distributed"))}
