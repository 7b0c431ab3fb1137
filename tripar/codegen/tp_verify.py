"""Shape propagation of a rewritten graph on fake tensors, and the checks on its result.

`propagate` runs a (rewritten) GraphModule on fake tensors (``tripar.graph``'s
`FakeInterpreter`: no data, no communication): parameters and buffers enter with their
current (sharded) shapes, collectives only compute shapes (`TPCollective.meta_forward`).
`check_shapes` compares the result with the original graph's values: every node outside
the sharded regions must keep its shape (and an int its value), and every region node
must have its original shape with at most one dim divided by t.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_flatten

from tripar.errors import PlanError
from tripar.graph import FakeInterpreter

__all__ = ["RewriteError", "check_shapes", "propagate"]


class RewriteError(PlanError):
    """A tensor-parallel region that the rewrite cannot apply (or that failed verification);
    the message names the node and the reason."""


def _placeholders(gm: torch.fx.GraphModule, example_inputs: Sequence[Any] | None) -> list[Any]:
    """One value per placeholder: the given inputs, else the shapes the capture recorded."""
    out = []
    for i, n in enumerate(gm.graph.find_nodes(op="placeholder")):
        if example_inputs is not None and i < len(example_inputs):
            out.append(example_inputs[i])
        elif "val" in n.meta:
            out.append(n.meta["val"])
        elif "tensor_meta" in n.meta:
            tm = n.meta["tensor_meta"]
            out.append(torch.empty(tm.shape, dtype=tm.dtype, device="meta"))
        elif n.args:
            out.append(n.args[0])
        else:
            raise RewriteError(f"placeholder {n.name} has no recorded shape: pass example_inputs")
    return out


def propagate(gm: torch.fx.GraphModule, example_inputs: Sequence[Any] | None = None, *,
              what: str = "the tensor-parallel program") -> dict[str, Any]:
    """Every node's value (fake tensors) when ``gm`` runs on ``example_inputs`` (real, meta
    or, when None, the placeholder shapes the capture recorded); raises RewriteError naming
    the node where propagation fails."""
    run = FakeInterpreter(gm)
    inputs = _placeholders(gm, example_inputs)
    try:
        with torch.no_grad():
            run.propagate(*inputs)
    except Exception as e:  # noqa: BLE001 - any failure means the program is wrong
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RewriteError(f"shape propagation of {what} failed at node {run.current}: {first}") from e
    return run.values


def _shape(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, int | float | bool):
        return v
    if isinstance(v, tuple | list):
        leaves, _ = tree_flatten(v)
        return tuple(_shape(x) for x in leaves)
    return None


def check_shapes(original: Mapping[str, Any], rewritten: Mapping[str, Any], region_nodes: Mapping[str, str],
                 t: int) -> None:
    """Raise RewriteError unless nodes outside regions keep their values' shapes and region
    nodes (``region_nodes``: node -> region description) are at most divided by t on one dim."""
    for name, before in original.items():
        if name not in rewritten:
            continue
        want, got = _shape(before), _shape(rewritten[name])
        if name not in region_nodes:
            if want is not None and got != want:
                raise RewriteError(f"node {name} (outside the sharded regions) has {got} after the "
                                   f"rewrite, {want} before: a sharded size leaked out of a region")
            continue
        a, b = before, rewritten[name]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            diff = [d for d in range(a.dim()) if b.dim() == a.dim() and a.shape[d] != b.shape[d]]
            ok = b.dim() == a.dim() and len(diff) <= 1 and all(b.shape[d] * t == a.shape[d] for d in diff)
            if not ok:
                raise RewriteError(f"node {name} of the {region_nodes[name]} has shape {tuple(b.shape)} "
                                   f"after the rewrite; expected {tuple(a.shape)} with at most one dim "
                                   f"divided by t={t}")
