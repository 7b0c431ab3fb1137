"""Replay repeated blocks: run a graph forward without running a block again that is
identical to one already run.

Two blocks are identical when they have the same structure
(:func:`tripar.graph.blocks.structural_key`) and their inputs the same shapes,
strides, dtypes, aliasing and saved-for-backward state. The first of them is run and
recorded; each later one is replaced by an autograd bridge that makes fresh outputs of
the recorded layouts (and saves what the recorded block saved of its inputs), and its
nodes take the recorded block's numbers (:attr:`ReplayingInterpreter.copied`). So
annotating a deep model costs about what annotating its distinct blocks costs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from tripar.graph.blocks import partition_blocks, structural_key
from tripar.graph.values import FakeInterpreter


class ReplayingInterpreter(FakeInterpreter):
    """A fake-tensor run (:class:`~tripar.graph.values.FakeInterpreter`) whose
    :meth:`execute` replays blocks identical to one already run.

    ``weight_storages`` are the storages of the module's weights and buffers (its fake
    weights must be in place: :meth:`fake_weights`); ``saved_storages`` are the storages
    saved for backward so far (a subclass's pack hook adds to it).
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.saved_storages: set[int] = set()
        self.copied: dict[str, str] = {}
        """Replayed node -> the measured node whose numbers it takes."""
        self.graph_nodes = {n.name: n for n in gm.graph.nodes}

    def _uncredited(self) -> contextlib.AbstractContextManager:
        """Where a replayed block makes its stand-in outputs (a subclass that credits the
        operators it sees to the running node credits none of these)."""
        return contextlib.nullcontext()

    def execute(self, inputs: list, plan: ReusePlan | None) -> Any:
        """Run every node (placeholders take ``inputs``); return the output's value.

        With a plan, a block whose structure and inputs match an already measured block
        (same shapes, strides, dtypes, aliasing and saved-for-backward state) is not run:
        an autograd bridge makes fresh outputs of the measured block's layout, and its
        nodes take the measured block's numbers (``self.copied``).
        """
        self.env = {}
        self.args_iter = iter(inputs)
        skipped: set[str] = set()
        recording: _Recording | None = None
        output = None
        for node in self.graph.nodes:
            if node.name in skipped:
                continue
            block = plan.block_of.get(node.name) if plan else None
            if plan is not None and recording is not None and block != recording.block \
                    and node.op != "get_attr":
                recording = None  # interleaved with another block: not a clean sample
            if plan is not None and block is not None and node.name == plan.first[block]:
                key = self._dynamic_key(plan, block)
                if key is not None:
                    sample = plan.samples.get(key)
                    if sample is not None:
                        skipped |= self._replay(plan, block, sample)
                        continue
                    recording = _Recording(block, key, self._status(plan.external[block]))
            if node.op == "output":
                output = self.env[node] = self.run_node(node)
                continue
            self.env[node] = self.run_node(node)
            if recording is not None and node.name == plan.last[recording.block]:
                self._finish(plan, recording)
                recording = None
        return output

    def _value(self, name: str) -> Any:
        return self.env[self.graph_nodes[name]]

    def _status(self, names: tuple[str, ...]) -> tuple[bool, ...]:
        status = []
        for name in names:
            for leaf in pytree.tree_leaves(self._value(name)):
                if isinstance(leaf, torch.Tensor):
                    status.append(leaf.untyped_storage()._cdata in self.saved_storages)
        return tuple(status)

    def _dynamic_key(self, plan: ReusePlan, block: int) -> tuple | None:
        parts: list[Any] = [plan.static[block]]
        storages: dict[int, int] = {}
        for name in plan.external[block]:
            if self.graph_nodes[name] not in self.env:
                return None
            for leaf in pytree.tree_leaves(self._value(name)):
                if isinstance(leaf, torch.Tensor):
                    key = leaf.untyped_storage()._cdata
                    storages.setdefault(key, len(storages))
                    parts.append((tuple(leaf.shape), tuple(leaf.stride()), leaf.storage_offset(),
                                  leaf.dtype, leaf.requires_grad, storages[key],
                                  key in self.saved_storages, key in self.weight_storages))
                elif isinstance(leaf, (int, float, bool, str, type(None), torch.dtype)):
                    parts.append(("const", repr(leaf)))
                else:
                    return None
        return tuple(parts)

    def _finish(self, plan: ReusePlan, recording: _Recording) -> None:
        """Keep a cleanly measured block as the sample for later identical blocks."""
        block = recording.block
        outputs = []
        input_storages = set()
        for name in plan.external[block]:
            for leaf in pytree.tree_leaves(self._value(name)):
                if isinstance(leaf, torch.Tensor):
                    input_storages.add(leaf.untyped_storage()._cdata)
        seen = set()
        for name in plan.outputs[block]:
            value = self._value(name)
            if isinstance(value, torch.Tensor):
                key = value.untyped_storage()._cdata
                if key in seen or key in input_storages or key in self.weight_storages:
                    return  # aliasing between a block's inputs and outputs: not replayable
                seen.add(key)
                outputs.append((name, (tuple(value.shape), tuple(value.stride()),
                                       value.storage_offset(), value.dtype, value.requires_grad,
                                       key in self.saved_storages)))
            elif isinstance(value, (int, float, bool, str, type(None))):
                outputs.append((name, ("const", value)))
            else:
                return
        now = self._status(plan.external[block])
        saved_inputs = tuple(i for i, was in enumerate(recording.saved_before)
                             if not was and now[i])
        plan.samples[recording.key] = _Sample(block, tuple(outputs), saved_inputs)

    def _replay(self, plan: ReusePlan, block: int, sample: _Sample) -> set[str]:
        nodes = plan.nodes[block]
        reference = plan.nodes[sample.block]
        leaves = [leaf for name in plan.external[block]
                  for leaf in pytree.tree_leaves(self._value(name))
                  if isinstance(leaf, torch.Tensor)]
        # what the measured block saved of its inputs, this block saves of its own
        for i in sample.saved_inputs:
            self.saved_storages.add(leaves[i].untyped_storage()._cdata)
        grad_inputs = [t for t in leaves if t.requires_grad]
        if not grad_inputs:
            grad_inputs = [torch.empty((), device="cpu").requires_grad_(True)]
        specs = [spec for _, spec in sample.outputs if spec[0] != "const"]
        with self._uncredited():
            made = list(_Bridge.apply(specs, *grad_inputs)) if specs else []
        local = {name: i for i, name in enumerate(reference)}
        made_iter = iter(made)
        for (ref_name, spec) in sample.outputs:
            node = self.graph_nodes[nodes[local[ref_name]]]
            if spec[0] == "const":
                self.env[node] = spec[1]
                continue
            tensor = next(made_iter)
            if spec[5]:
                self.saved_storages.add(tensor.untyped_storage()._cdata)
            self.env[node] = tensor
        skipped = set()
        for name, ref in zip(nodes, reference):
            if self.graph_nodes[name] not in self.env or name in plan.output_set[block]:
                self.copied[name] = ref
                skipped.add(name)
        return skipped


class _Bridge(torch.autograd.Function):
    """Stands in for a replayed block: fresh outputs, no saved tensors, no FLOPs."""

    @staticmethod
    def forward(ctx: Any, specs: list, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.input_layouts = [(tuple(t.shape), tuple(t.stride()), t.dtype) for t in inputs]
        outputs = tuple(torch.empty_strided(shape, stride, dtype=dtype, device="cpu")
                        for shape, stride, _, dtype, _, _ in specs)
        ctx.mark_non_differentiable(*[t for t, spec in zip(outputs, specs)
                                      if not spec[4] or not t.is_floating_point()])
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple:
        return (None, *(torch.empty_strided(shape, stride, dtype=dtype, device="cpu")
                        for shape, stride, dtype in ctx.input_layouts))


@dataclass(slots=True)
class _Recording:
    block: int
    key: tuple
    saved_before: tuple[bool, ...]


@dataclass(frozen=True, slots=True)
class _Sample:
    block: int
    outputs: tuple
    saved_inputs: tuple[int, ...]


@dataclass(slots=True)
class ReusePlan:
    """Static facts about blocks that allow replaying a measured block."""

    block_of: dict[str, int]
    nodes: list[tuple[str, ...]]
    static: list[tuple]
    external: list[tuple[str, ...]]
    outputs: list[tuple[str, ...]]
    output_set: list[frozenset[str]]
    first: list[str | None]
    last: list[str | None]
    samples: dict[tuple, _Sample]

    @classmethod
    def of(cls, gm: torch.fx.GraphModule) -> ReusePlan:
        part = partition_blocks(gm)
        by_name = {n.name: n for n in gm.graph.nodes}
        block_of = {n: b for b, nodes in enumerate(part.nodes) for n in nodes}
        static, external, outputs, first, last = [], [], [], [], []
        for b, nodes in enumerate(part.nodes):
            key, ext = structural_key(gm, nodes, part.prefixes[b])
            static.append(key)
            external.append(ext)
            outputs.append(tuple(n for n in nodes if any(
                block_of.get(u.name) != b for u in by_name[n].users)))
            compute = [n for n in nodes if by_name[n].op != "get_attr"]
            first.append(compute[0] if compute else None)
            last.append(compute[-1] if compute else None)
        return cls(block_of, [tuple(n) for n in part.nodes], static, external, outputs,
                   [frozenset(o) for o in outputs], first, last, {})
