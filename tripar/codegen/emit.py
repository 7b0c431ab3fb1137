"""Readable Python source of each stage program, and writing a rank's output folder.

The source is the stage GraphModule's own generated ``forward`` (what the runtime
executes), tidied for reading: the ``x = y = None`` memory-release tails are
dropped, every tensor line ends with a shape comment (``# float32[2, 8, 32]``,
at the microbatch size the stages were split for), and a header names the
stage, its blocks, what it receives, reads and sends, the parameters it holds
and which of them are replicas whose gradients are summed with other stages.

The file is complete: it imports every global the generated code reads (the
objects FX's ``python_code`` names, e.g. a tensor-parallel collective's function),
and a stage whose plan recomputes blocks also carries each checkpointed segment's
body (``def recompute_<k>``, which the stage's ``self._recompute_<k>`` runs under
``torch.utils.checkpoint``). Executing it defines ``forward`` and the segment
functions; bound to the stage module (and each segment body) they are the very
code the ranks run.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import math
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.fx

from tripar.codegen.recompute import Recomputed
from tripar.codegen.stage import StageProgram, StageSplit, TensorSpec
from tripar.codegen.weights import param_map_json

__all__ = ["import_lines", "recomputed_segments", "stage_source", "write_stages"]

_CHECKPOINTED = """\
# activation checkpointing (torch.utils.checkpoint, non-reentrant): these blocks keep only
# their inputs for the backward, which runs them again:"""
_SEGMENT_NOTE = """\
# {blocks}: self.{child} runs this under activation checkpointing
# (torch.utils.checkpoint, use_reentrant=False): its activations are dropped after the
# forward and recomputed in the backward. self: the stage module (its children)."""
_ASSIGN = re.compile(r"^(?P<indent>\s+)(?P<names>[\w, ]+?) = ")
_RELEASE = re.compile(r";\s+(\w+ = )+None\s*$")


def _shape(spec: TensorSpec) -> str:
    return f"{spec.dtype_name}[{', '.join(str(d) for d in spec.shape)}]"


def recomputed_segments(module: torch.nn.Module) -> list[tuple[str, Recomputed]]:
    """The stage's checkpointed segments, ``(child name, Recomputed)``, in the stage's
    order (``_recompute_0``, ``_recompute_1``...); empty for a stage that recomputes
    nothing."""
    return [(name, child) for name, child in module.named_children()
            if isinstance(child, Recomputed)]


def _function_source(module: torch.fx.GraphModule, name: str = "forward"
                     ) -> tuple[list[str], dict[str, Any]]:
    """``module``'s generated function, tidied and renamed ``name``, and the globals it
    was generated against (name -> object)."""
    code = module.graph.python_code(root_module="self")
    segments = {child for child, _ in recomputed_segments(module)}
    specs = {n.name: n.meta["tripar_spec"] for n in module.graph.nodes
             if "tripar_spec" in n.meta}
    lines = []
    for raw in code.src.strip("\n").splitlines():
        line = _RELEASE.sub("", raw.rstrip())
        if line.lstrip().startswith("# File:") or not line.strip():
            continue
        if line.startswith("def forward(") and name != "forward":
            line = f"def {name}(" + line.removeprefix("def forward(")
        match = _ASSIGN.match(line)
        if match:
            names = match.group("names").strip()
            if names in specs:
                line = f"{line}  # {_shape(specs[names])}"
            elif names in segments:
                line = f"{line}  # {_function_name(names)} below, checkpointed"
        lines.append(line)
    return lines, dict(code.globals)


def _used_names(source: str) -> set[str]:
    """Every name the source reads."""
    return {node.id for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


def _resolves(module: str, qualname: str, obj: Any) -> bool:
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return False
    return found is obj


def _binding(name: str, obj: Any) -> tuple[str, ...]:
    """The statements that bind ``name`` to ``obj`` in the emitted file (none for a
    builtin): an ``import``, a ``from ... import``, an ``import`` and an assignment (a
    nested class), or a comment saying that ``obj`` cannot be imported by name."""
    if getattr(builtins, name, None) is obj:
        return ()
    if isinstance(obj, types.ModuleType):
        full = obj.__name__
        return (f"import {full}" if full == name else f"import {full} as {name}",)
    if isinstance(obj, float) and name in ("inf", "nan") and \
            (math.isinf(obj) if name == "inf" else math.isnan(obj)):
        return (f"from math import {name}",)
    if obj is type(None):
        return ("from types import NoneType" + (f" as {name}" if name != "NoneType" else ""),)
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and \
            _resolves(module, qualname, obj):
        if "." in qualname:  # nested in a class: reached from its module
            return f"import {module}", f"{name} = {module}.{qualname}"
        return (f"from {module} import {qualname}" + (f" as {name}" if name != qualname else ""),)
    return (f"# {name}: a {type(obj).__name__} that cannot be imported by name; bind it "
            "before calling forward",)


def import_lines(used: Sequence[str], objects: Mapping[str, Any]) -> list[str]:
    """The statements binding the globals ``used`` by generated code whose FX globals
    are ``objects`` (``python_code(...).globals``): ``import torch`` first, then the
    other ``import`` lines, the ``from`` lines, any assignments and notes, each sorted.

    >>> import torch.fx._pytree
    >>> from tripar.codegen.collectives import vocab_parallel_embedding
    >>> objects = {"torch": torch, "fx_pytree": torch.fx._pytree, "getattr": getattr,
    ...            "tripar_codegen_collectives_vocab_parallel_embedding": vocab_parallel_embedding}
    >>> print("\\n".join(import_lines(list(objects), objects)))
    import torch
    import torch.fx._pytree as fx_pytree
    from tripar.codegen.collectives import vocab_parallel_embedding as tripar_codegen_collectives_vocab_parallel_embedding
    """
    lines = {line for name in used if name in objects for line in _binding(name, objects[name])}
    lines.discard("import torch")
    plain = sorted(line for line in lines if line.startswith("import "))
    froms = sorted(line for line in lines if line.startswith("from "))
    rest = sorted(lines.difference(plain, froms), key=lambda line: (line[0] == "#", line))
    return ["import torch", *plain, *froms, *rest]


def _header(stage: StageProgram, pp: int | None,
            segments: Sequence[tuple[str, Recomputed]]) -> list[str]:
    where = f"stage {stage.index} of {stage.num_stages}"
    if pp:
        where += f" (pipeline rank {stage.index % pp}, virtual stage {stage.index // pp})"
    out = [f"# tripar {where}", "# generated by tripar.codegen; do not edit"]
    if stage.blocks:
        out.append(f"# blocks: {', '.join(stage.blocks)}")
    out.append("# inputs:")
    width = max((len(s.name) for s in stage.received + stage.graph_inputs + stage.sent),
                default=0)
    for spec in stage.received:
        out.append(f"#   {spec.name:<{width}}  {_shape(spec)}  received from stage "
                   f"{stage.index - 1}")
    for spec, position in zip(stage.graph_inputs, stage.graph_input_positions):
        out.append(f"#   {spec.name:<{width}}  {_shape(spec)}  graph input {position}")
    if stage.is_last:
        out.append("# returns: the model's output (the loss)")
    else:
        out.append(f"# outputs (sent to stage {stage.index + 1}):")
        out.extend(f"#   {s.name:<{width}}  {_shape(s)}" for s in stage.sent)
    tensors = dict(stage.module.named_parameters())
    count = sum(t.numel() for t in tensors.values())
    out.append(f"# parameters: {len(tensors)} tensors, {count:,} values")
    fqn = dict(stage.params)
    renamed = [(local, f) for local, f in stage.params if local != f]
    out.extend(f"#   {local} is {f}" for local, f in renamed)
    if stage.replicas:
        out.append("# replicas (gradients summed with the other stages holding them):")
        out.extend(f"#   {local} ({fqn[local]})" for local in stage.replicas)
    if stage.recomputed:
        shown = ", ".join(stage.recomputed[:12])
        more = f" and {len(stage.recomputed) - 12} more" if len(stage.recomputed) > 12 else ""
        out.append(f"# recomputed from graph inputs here: {shown}{more}")
    if segments:
        out.extend(_CHECKPOINTED.splitlines())
        out.extend(f"#   self.{name} runs {_function_name(name)} below: "
                   f"{', '.join(wrapper.blocks)}" for name, wrapper in segments)
    return out


def _function_name(child: str) -> str:
    return child.lstrip("_")  # _recompute_0 -> recompute_0


def stage_source(stage: StageProgram, *, pp: int | None = None) -> str:
    """The stage's readable source: header comments, the imports its code needs,
    ``forward``, and for a stage that recomputes blocks each checkpointed segment's
    body (``recompute_<k>``).

    >>> import torch
    >>> from tripar.codegen.split import split_stages
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()))
    >>> split = split_stages(gm, [["_0"], ["_1"]], [torch.randn(3, 4)])
    >>> print(stage_source(split.stages[1]))
    # tripar stage 1 of 2
    # generated by tripar.codegen; do not edit
    # inputs:
    #   _0  float32[3, 2]  received from stage 0
    # returns: the model's output (the loss)
    # parameters: 0 tensors, 0 values
    import torch
    <BLANKLINE>
    <BLANKLINE>
    def forward(self, _0):
        _1 = getattr(self, "1")(_0)  # float32[3, 2]
        return _1
    <BLANKLINE>
    """
    segments = recomputed_segments(stage.module)
    body, objects = _function_source(stage.module)
    functions = [body]
    for name, wrapper in segments:
        lines, more = _function_source(wrapper.body, _function_name(name))
        for key, value in more.items():
            assert objects.setdefault(key, value) is value, key
        note = _SEGMENT_NOTE.format(blocks=", ".join(wrapper.blocks), child=name)
        functions.append(note.splitlines() + lines)
    code = "\n\n\n".join("\n".join(f) for f in functions)
    imports = import_lines(sorted(_used_names(code)), objects)
    return "\n".join(_header(stage, pp, segments) + imports + ["", "", code]) + "\n"


def write_stages(split: StageSplit, out_dir: str | Path, *, pp: int | None = None,
                 stages: Sequence[int] | None = None) -> list[Path]:
    """Write ``stage_<i>.py`` for each stage (or those in ``stages``) and
    ``param_map.json`` into ``out_dir``; returns the paths written."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stage in split.stages:
        if stages is not None and stage.index not in stages:
            continue
        path = folder / f"stage_{stage.index}.py"
        path.write_text(stage_source(stage, pp=pp))
        written.append(path)
    path = folder / "param_map.json"
    path.write_text(param_map_json(split) + "\n")
    written.append(path)
    return written
