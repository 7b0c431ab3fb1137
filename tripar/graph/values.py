"""The one fake-tensor run of a graph: every node's value, no memory allocated.

:class:`FakeInterpreter` runs a GraphModule under ``FakeTensorMode`` with the CPU as the
fake device (operators choose the kernels they would choose on a real CPU). The graph's
parameters, buffers and tensor constants are reparametrised as fake twins (weights may be
real or on the meta device), inputs become fakes of their shapes, strides and dtypes, and
``torch.device("meta")`` arguments that ``torch.export`` baked into a graph read as the
fake device. A module with a ``meta_forward`` method (a collective that must not
communicate, a random op on a forked stream) runs that instead of its forward.

Every node's value is recorded (``values``); a pass that measures or checks more
overrides :meth:`FakeInterpreter.record`:

- ``annotate`` measures FLOPs and saved bytes (through ``replay.ReplayingInterpreter``,
  which also skips blocks identical to one already run);
- ``tp_prove`` records the shapes of a region's sharded program;
- ``meta_values`` uses the values a capture recorded and survives nodes that cannot run;
- codegen propagates the graphs it splits and rewrites (``split.propagate_values``,
  ``tp_verify.propagate``) with :func:`node_values` and the interpreter.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree

from tripar.errors import CaptureError

__all__ = ["FakeInterpreter", "baked_devices", "meta_values", "node_values"]


def baked_devices(gm: torch.fx.GraphModule) -> set[str]:
    """Device types written into the graph's arguments (``torch.export`` records the
    capture's device in ``arange``, ``to`` and its tensor-metadata asserts).

    >>> import torch
    >>> baked_devices(torch.fx.symbolic_trace(lambda x: x.to(torch.device("meta"))))
    {'meta'}
    """
    found: set[str] = set()

    def visit(value: Any) -> None:
        if isinstance(value, torch.device):
            found.add(value.type)
        elif isinstance(value, tuple | list):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for node in gm.graph.nodes:
        visit(node.args)
        visit(node.kwargs)
    return found


class FakeInterpreter(torch.fx.Interpreter):
    """Runs ``gm`` on fake tensors on ``device`` (the CPU, or ``meta``) and records every
    node's value in ``values`` (:meth:`record`); ``current`` names the node running.

    Run it with :meth:`propagate`, or enter :meth:`fake_weights` and ``mode`` around a
    run of one's own (``weight_storages`` then holds the fake weights' storages).

    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()))
    >>> run = FakeInterpreter(gm)
    >>> tuple(run.propagate(torch.empty(3, 4, device="meta")).shape)
    (3, 2)
    >>> {name: tuple(v.shape) for name, v in run.values.items()}
    {'input_1': (3, 4), '_0': (3, 2), '_1': (3, 2), 'output': (3, 2)}
    """

    def __init__(self, gm: torch.fx.GraphModule, *, device: str | torch.device = "cpu") -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.device = torch.device(device)
        self.values: dict[str, Any] = {}
        self.current = ""
        self.weight_storages: set[int] = set()
        """Storages of the fake weights (set by :meth:`fake_weights`)."""
        self._retarget = self.device.type != "meta" and "meta" in baked_devices(gm)

    # -- hooks -------------------------------------------------------------------------
    def record(self, node: torch.fx.Node, value: Any) -> None:
        """Called with each node's value once it ran; keeps it in ``values``."""
        self.values[node.name] = value

    # -- fakes -------------------------------------------------------------------------
    def _twin(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, FakeTensor) and tensor.fake_mode is self.mode:
            return tensor
        with self.mode:
            fake = torch.empty_strided(tuple(tensor.shape), tuple(tensor.stride()),
                                       dtype=tensor.dtype, device=self.device)
        if tensor.requires_grad:
            fake.requires_grad_(True)
        return fake

    def fake(self, value: Any) -> Any:
        """``value`` with every tensor a fake twin on the fake device (same shape, strides,
        dtype and requires_grad)."""
        return pytree.tree_map_only(torch.Tensor, self._twin, value)

    @contextlib.contextmanager
    def fake_weights(self) -> Iterator[None]:
        """Swap every parameter, buffer and tensor constant of the graph module for a fake
        twin (one twin per tensor, whatever its names) for the duration of the block."""
        gm = self.module
        twins: dict[int, torch.Tensor] = {}
        state: dict[str, torch.Tensor] = {}
        named = list(gm.named_parameters(remove_duplicate=False))
        named += list(gm.named_buffers(remove_duplicate=False))
        for fqn, tensor in named:
            if id(tensor) not in twins:
                twins[id(tensor)] = self._twin(tensor)
            state[fqn] = twins[id(tensor)]
        for node in self.graph.find_nodes(op="get_attr"):  # lifted constants
            target = str(node.target)
            if target not in state:
                value = operator.attrgetter(target)(gm)
                if isinstance(value, torch.Tensor):
                    state[target] = self._twin(value)
        self.weight_storages = {t.untyped_storage()._cdata for t in state.values()}
        with _reparametrize_module(gm, state):
            yield

    def propagate(self, *inputs: Any) -> Any:
        """Run the graph on fake twins of ``inputs`` (one per placeholder) with fake
        weights; return the output's value."""
        inputs = self.fake(inputs)
        with self.fake_weights(), self.mode:
            return self.run(*inputs)

    # -- node execution ----------------------------------------------------------------
    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = n.name
        value = super().run_node(n)
        self.record(n, value)
        return value

    def _retargeted(self, args: Any, kwargs: Any) -> tuple[Any, Any]:
        def device(value: Any) -> Any:
            meta = isinstance(value, torch.device) and value.type == "meta"
            return self.device if meta else value

        return pytree.tree_map(device, (args, kwargs))

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if self._retarget:
            args, kwargs = self._retargeted(args, kwargs)
        return super().call_function(target, args, kwargs)

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        if self._retarget:
            args, kwargs = self._retargeted(args, kwargs)
        return super().call_method(target, args, kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        meta_forward = getattr(module, "meta_forward", None)
        if callable(meta_forward):
            return meta_forward(*args, **kwargs)
        return module(*args, **kwargs)


def node_values(gm: torch.fx.GraphModule, inputs: Sequence[Any], *,
                device: str | torch.device = "cpu") -> dict[str, Any]:
    """Every node's value (fake tensors for tensors, plain Python values otherwise) when
    ``gm`` runs on ``inputs`` (one per placeholder: real, meta or fake tensors, or other
    values), its weights real or on the meta device.

    >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 2))
    >>> values = node_values(gm, [torch.empty(3, 4, device="meta")])
    >>> list(values)
    ['input_1', 'weight', 'bias', 'linear', 'output']
    >>> tuple(values["linear"].shape), values["linear"].device
    ((3, 2), device(type='cpu'))
    """
    run = FakeInterpreter(gm, device=device)
    run.propagate(*inputs)
    return run.values


# ---- tolerant meta values ---------------------------------------------------------------


def _blank(value: Any, device: str | torch.device = "meta") -> Any:
    """``value`` with each tensor a blank one of its shape and dtype on ``device`` (meta;
    a fake inside a FakeTensorMode), and each symbolic size its hint."""
    def conv(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return torch.empty(v.shape, dtype=v.dtype, device=device)
        if isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool):
            return v.node.hint if hasattr(v.node, "hint") and v.node.hint is not None else int(v)
        return v

    return pytree.tree_map(conv, value)


class _Tolerant(FakeInterpreter):
    """Takes the values the capture recorded (``node.meta["val"]``) as they are, runs the
    nodes that have none (on fake twins of their arguments' meta values), and gives
    ``None`` to a node that cannot run and to every node after it."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.failed: set[str] = set()

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "output":
            return None
        if n.op != "placeholder" and "val" in n.meta:
            self.values[n.name] = n.meta["val"]
            return n.meta["val"]
        if any(i.name in self.failed for i in n.all_input_nodes):
            self.failed.add(n.name)
            self.values[n.name] = None
            return None
        try:
            return super().run_node(n)
        except Exception:  # noqa: BLE001 - any op failure means "shape unknown"
            self.failed.add(n.name)
            self.values[n.name] = None
            return None

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node) -> tuple[tuple, dict]:
        # arguments as the capture recorded them, or as meta values (contiguous) would be
        return _blank(super().fetch_args_kwargs_from_env(n), self.device)  # in the mode: fakes

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        # few nodes run here: fake the weights of those that do, not of the whole graph
        module = self.fetch_attr(target)
        state = {k: self._twin(v) for k, v in module.state_dict(keep_vars=True).items()}
        with _reparametrize_module(module, state):
            return super().call_module(target, args, kwargs)


def meta_values(gm: torch.fx.GraphModule, example_inputs: Sequence[Any] | None = None) -> dict[str, Any]:
    """Every node's value as meta tensors (ints and tuples as they are).

    Uses ``node.meta["val"]`` where the capture left it; otherwise runs the graph on
    fake tensors from ``example_inputs`` (positional, one per placeholder) or the
    placeholders' recorded ``val``/``tensor_meta``. A node that cannot run gets
    ``None``; regions that touch it are reported unproven.

    >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 2))
    >>> meta_values(gm, [torch.ones(3, 4)])["linear"]
    tensor(..., device='meta', size=(3, 2))
    """
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    if all("val" in n.meta for n in nodes):
        return {n.name: _blank(n.meta["val"]) for n in nodes}
    given = list(example_inputs) if example_inputs is not None else None
    inputs = []
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        if "val" in node.meta:
            inputs.append(_blank(node.meta["val"]))
        elif given is not None and i < len(given):
            inputs.append(_blank(given[i]))
        elif "tensor_meta" in node.meta:
            tm = node.meta["tensor_meta"]
            inputs.append(torch.empty(tm.shape, dtype=tm.dtype, device="meta"))
        elif node.args:  # a default value
            inputs.append(node.args[0])
        else:
            raise CaptureError(
                f"placeholder {node.name!r} has no recorded shape: pass example_inputs to "
                "find_tp_regions or annotate the graph first"
            )
    run = _Tolerant(gm)  # a get_attr gives the weight itself, faked where it is read
    with run.mode, torch.no_grad():
        run.run(*inputs, enable_io_processing=False)
    return {n.name: _blank(run.values[n.name]) for n in nodes}
