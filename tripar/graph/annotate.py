"""Measure every node of a captured graph: shapes, FLOPs, parameters, saved bytes.

:func:`annotate` runs the graph once, forward then backward, on fake tensors
(the fake-tensor run of :mod:`tripar.graph.values`, with the CPU as the fake device:
no memory is allocated, and operators choose the kernels they would choose on a real
CPU, e.g. the flash form of scaled-dot-product attention that saves only its output
and log-sum-exp). Nothing is estimated from shapes:

- FLOPs come from ``torch.utils.flop_counter`` (a ``FlopCounterMode`` whose
  per-operator count is credited to the node running at that moment). In the
  backward, each autograd node is credited to the forward FX node that created
  it: after a node runs, the autograd nodes reachable from its outputs that no
  earlier node created are tagged with it, and a pre-hook on each of them
  sets the "current node" when the engine reaches it.
- Saved bytes come from ``torch.autograd.graph.saved_tensors_hooks``: each
  storage saved for backward is counted once, in the node whose operator saved
  it first; storages of parameters and buffers are not activations and are
  not counted.
- Saved bytes are measured a second time with the forward under bf16 autocast
  (``autocast_saved_bytes``), the way tripar trains in bf16: autocast keeps norms,
  softmax, the loss and the residual stream in fp32 and saves bf16 copies of the
  products' inputs and weights, so the bf16 step keeps about as many bytes as the fp32
  one, not half.
- A parameter (or a tied/shared one) is counted once, in the first node that
  reads it, under its first registered name.

The result is one frozen :class:`NodeInfo` per node in ``node.meta["tripar"]``;
nodes of FX-traced graphs also get their value as meta tensors in
``node.meta["val"]`` (exported graphs already carry one).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from tripar.errors import CaptureError
from tripar.graph.blocks import node_module
from tripar.graph.capture import flat_graph_inputs
from tripar.graph.params import canonical_names, read_params
from tripar.graph.replay import ReplayingInterpreter, ReusePlan

log = logging.getLogger(__name__)

aten = torch.ops.aten

# CPU flash attention is not in torch's flop registry; it does the same matmuls
# as the CUDA flash kernel, whose formulas it shares.
def _raw(formula: Any) -> Any:
    """Mark an already shape-wrapped registry formula so FlopCounterMode uses it as is."""

    def counted(*args: Any, **kwargs: Any) -> int:
        return formula(*args, **kwargs)

    counted._get_raw = True  # type: ignore[attr-defined]
    return counted


_EXTRA_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        _raw(flop_registry[aten._scaled_dot_product_flash_attention]),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        _raw(flop_registry[aten._scaled_dot_product_flash_attention_backward]),
}
_SDPA_FORWARD = {
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
}


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What one FX node costs, measured on fake tensors for the example batch."""

    shapes: tuple[tuple[int, ...], ...]
    """Shape of each tensor the node outputs (flattened over tuples), in order."""
    dtypes: tuple[str, ...]
    """dtype of each output tensor, e.g. ``float32``."""
    output_bytes: int
    """Bytes of the node's distinct output storages' views (numel x element size)."""
    forward_flops: int
    backward_flops: int
    """FLOPs of the backward operators created by this node's forward."""
    params: int
    """Parameters this node reads first (a tied parameter counts once, at its first reader)."""
    param_bytes: int
    param_names: tuple[str, ...]
    saved_bytes: int
    """Bytes newly saved for backward while this node ran (parameters excluded)."""
    module: str
    """FQN of the innermost module the node came from (``""`` for the root)."""
    matmuls: tuple[tuple[int, int, int], ...] = ()
    """(m, k, n) of each forward matrix product; a batch dimension is folded into m."""
    reads_params: bool = False
    """Whether the node reads a parameter (first reader or not)."""
    autocast_saved_bytes: int = -1
    """``saved_bytes`` when the forward runs under bf16 autocast with fp32 weights (the
    way tripar trains in bf16): products save bf16 copies of their inputs and weights,
    norms, softmax, the loss and the residual stream stay fp32. -1: not measured."""


def _as_meta(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tuple(tensor.shape), tuple(tensor.stride()), dtype=tensor.dtype,
                               device="meta")


class _NodeFlopCounter(FlopCounterMode):
    """FlopCounterMode that also credits each count to the node running now."""

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
        self.current: str | None = None
        self.backward = False
        self.forward_by_node: dict[str, int] = defaultdict(int)
        self.backward_by_node: dict[str, int] = defaultdict(int)
        self.matmuls: dict[str, list[tuple[int, int, int]]] = defaultdict(list)

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        if func_packet in self.flop_registry:
            count = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            self.flop_counts["Global"][func_packet] += count
            if self.current is not None:
                target = self.backward_by_node if self.backward else self.forward_by_node
                target[self.current] += count
                if not self.backward and self.current is not None:
                    self._record_matmul(func_packet, args)
        return out

    def _record_matmul(self, func: Any, args: Any) -> None:
        dims = None
        if func is aten.mm:
            (m, k), n = args[0].shape, args[1].shape[1]
            dims = [(m, k, n)]
        elif func is aten.addmm:
            (m, k), n = args[1].shape, args[2].shape[1]
            dims = [(m, k, n)]
        elif func is aten.bmm:
            (b, m, k), n = args[0].shape, args[1].shape[2]
            dims = [(b * m, k, n)]
        elif func is aten.baddbmm:
            (b, m, k), n = args[1].shape, args[2].shape[2]
            dims = [(b * m, k, n)]
        elif func in _SDPA_FORWARD:
            q, k = args[0].shape, args[1].shape
            batch = q[0] * q[1]
            dims = [(batch * q[2], q[3], k[2]), (batch * q[2], k[2], args[2].shape[3])]
        if dims:
            self.matmuls[self.current].extend(dims)


class _Annotator(ReplayingInterpreter):
    """Runs the graph node by node, tracking which node creates each autograd node."""

    def __init__(self, gm: torch.fx.GraphModule, counter: _NodeFlopCounter) -> None:
        super().__init__(gm)
        self.counter = counter
        self.saved_by_node: dict[str, int] = defaultdict(int)
        self.grad_fn_owner: dict[Any, str] = {}
        self.layouts: dict[str, tuple[tuple[tuple[int, ...], ...], tuple[str, ...], int]] = {}
        """Each node's output shapes, dtypes and bytes (its fake value is not kept)."""
        self.meta_values: dict[str, Any] = {}
        """Each node's value as meta tensors (what ``node.meta["val"]`` gets)."""

    # -- saved tensors -------------------------------------------------------
    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.counter.backward and self.counter.current is not None:
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key not in self.weight_storages and key not in self.saved_storages:
                self.saved_storages.add(key)
                self.saved_by_node[self.counter.current] += storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    # -- node execution --------------------------------------------------------
    def run_node(self, n: torch.fx.Node) -> Any:
        self.counter.current = n.name
        return super().run_node(n)

    def record(self, n: torch.fx.Node, result: Any) -> None:
        """The node's output layouts and bytes, its value as meta tensors, and which
        autograd nodes it created (the backward FLOPs they run are credited to it)."""
        shapes, dtypes, nbytes = [], [], 0
        for leaf in pytree.tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                shapes.append(tuple(int(d) for d in leaf.shape))
                dtypes.append(str(leaf.dtype).removeprefix("torch."))
                nbytes += leaf.numel() * leaf.element_size()
                if leaf.grad_fn is not None:
                    self._tag_autograd(leaf.grad_fn, n.name)
        self.layouts[n.name] = (tuple(shapes), tuple(dtypes), nbytes)
        self.meta_values[n.name] = pytree.tree_map_only(torch.Tensor, _as_meta, result)

    def _tag_autograd(self, root: Any, name: str) -> None:
        stack = [root]
        while stack:
            fn = stack.pop()
            if fn is None or fn in self.grad_fn_owner:
                continue
            self.grad_fn_owner[fn] = name
            fn.register_prehook(self._make_prehook(name))
            stack.extend(next_fn for next_fn, _ in fn.next_functions)

    def _make_prehook(self, name: str) -> Any:
        counter = self.counter

        def prehook(_grad_outputs: Any) -> None:
            counter.current = name

        return prehook

    @contextmanager
    def _uncredited(self) -> Iterator[None]:
        """A replayed block's stand-in outputs are no node's FLOPs or saved bytes."""
        current, self.counter.current = self.counter.current, None
        yield
        self.counter.current = current


def _first_readers(gm: torch.fx.GraphModule) -> tuple[dict[str, list[tuple[str, Any]]], set]:
    """For each node, the (canonical FQN, parameter) pairs it reads first; and every reader."""
    canon = canonical_names(gm)
    seen: set[str] = set()
    first: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    readers: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not node.users:
            continue
        for fqn, param in read_params(gm, node, canon):
            readers.add(node.name)
            if fqn in seen:
                continue
            seen.add(fqn)
            first[node.name].append((fqn, param))
    return first, readers


def _backward_roots(output: Any) -> list[torch.Tensor]:
    """Scalar losses if the graph returns any; otherwise every differentiable output."""
    tensors = [t for t in pytree.tree_leaves(output)
               if isinstance(t, torch.Tensor) and t.requires_grad]
    scalars = [t for t in tensors if t.dim() == 0 and t.is_floating_point()]
    return scalars or tensors


def annotate(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    reuse: bool = True,
) -> None:
    """Fill ``node.meta["tripar"]`` with a :class:`NodeInfo` for every node of ``gm``.

    Runs one forward and one backward on fake CPU tensors (no memory is
    allocated; ``gm`` may hold meta or real weights). The backward starts from
    the graph's scalar outputs (the loss) when it has any, else from every
    differentiable output with a gradient of ones. With ``reuse`` (the default) a
    block identical to one already measured (same structure, input layouts and
    saved-for-backward state of its inputs) is not run again: its nodes take the
    measured block's numbers, which is what running it would give.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    >>> gm = torch.fx.symbolic_trace(model)
    >>> annotate(gm, (torch.empty(2, 4),))
    >>> info = gm.graph.find_nodes(op="call_module", target="0")[0].meta["tripar"]
    >>> info.shapes, info.forward_flops, info.backward_flops, info.params, info.matmuls
    (((2, 8),), 128, 128, 40, ((2, 4, 8),))
    """
    flat = flat_graph_inputs(gm, tuple(example_inputs), example_kwargs, error=CaptureError)
    first_reads, readers = _first_readers(gm)
    # export graphs carry their own fake "val"s; FX graphs get meta tensors from this run
    keep_val = gm.meta.get("tripar_tracer") != "export"
    plan = ReusePlan.of(gm) if reuse else None
    counter = _NodeFlopCounter()
    runner = _Annotator(gm, counter)
    fake_flat = runner.fake(flat)
    with runner.fake_weights():
        with runner.mode, counter, torch.enable_grad():
            with torch.autograd.graph.saved_tensors_hooks(runner.pack, runner.unpack):
                output = runner.execute(fake_flat, plan)
            roots = _backward_roots(output)
            counter.current = None
            counter.backward = True
            if roots:
                grads = [None if t.dim() == 0 else torch.ones_like(t) for t in roots]
                torch.autograd.backward(roots, grads)
            del output, roots
    autocast = _autocast_saved(gm, flat, plan and dataclasses.replace(plan, samples={}))
    for node in gm.graph.nodes:
        source = runner.copied.get(node.name, node.name)
        shapes, dtypes, nbytes = runner.layouts.get(source, ((), (), 0))
        reads = first_reads.get(node.name, [])
        node.meta["tripar"] = NodeInfo(
            shapes=shapes,
            dtypes=dtypes,
            output_bytes=nbytes,
            forward_flops=int(counter.forward_by_node.get(source, 0)),
            backward_flops=int(counter.backward_by_node.get(source, 0)),
            params=sum(p.numel() for _, p in reads),
            param_bytes=sum(p.numel() * p.element_size() for _, p in reads),
            param_names=tuple(fqn for fqn, _ in reads),
            saved_bytes=int(runner.saved_by_node.get(source, 0)),
            module=_attr_module(node) if node.op == "get_attr" else node_module(node),
            matmuls=tuple(counter.matmuls.get(source, ())),
            reads_params=node.name in readers,
            autocast_saved_bytes=-1 if autocast is None else autocast(node.name),
        )
        if keep_val and source in runner.meta_values:
            node.meta["val"] = runner.meta_values[source]
    infos = [n.meta["tripar"] for n in gm.graph.nodes]
    gm.meta["tripar_flops"] = (sum(i.forward_flops for i in infos),
                               sum(i.backward_flops for i in infos))


class _AutocastAnnotator(_Annotator):
    """`_Annotator` for the forward under autocast, counting saved bytes only (no FLOPs,
    layouts or backward); ``torch.export``'s checks that a value keeps its traced dtype
    are skipped (autocast changes the dtypes on purpose)."""

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default:
            return None
        return super().run_node(n)

    def record(self, n: torch.fx.Node, result: Any) -> None:
        pass


def _autocast_saved(gm: torch.fx.GraphModule, flat: Sequence[Any],
                    plan: ReusePlan | None) -> Any:
    """Each node's saved bytes with the forward under bf16 autocast on fake weights of the
    graph's own dtype, as a function of the node's name; None when the graph does not run
    so (the cost model then scales the fp32 bytes by the dtype's size). ``flat``: the
    graph's flat inputs; ``plan``: a reuse plan with no samples yet (or None)."""
    if not any(p.dtype == torch.float32 for p in gm.parameters()):
        return None   # autocast leaves a bf16 or fp16 model's dtypes as they are
    runner = _AutocastAnnotator(gm, _NodeFlopCounter())   # the counter names the node
    flat = runner.fake(flat)
    try:
        with runner.fake_weights(), runner.mode, torch.enable_grad(), \
                torch.autocast("cpu", dtype=torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(runner.pack, runner.unpack):
            runner.execute(flat, plan)
    except Exception as error:  # noqa: BLE001 - an estimate falls back, the plan goes on
        log.warning("the graph does not run under autocast on fake tensors (%s: %s); "
                    "bf16 activations are estimated from fp32 ones", type(error).__name__,
                    error)
        return None
    saved = runner.saved_by_node
    return lambda name: int(saved.get(runner.copied.get(name, name), 0))


def _attr_module(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        return node_module(node)
    return str(node.target).rpartition(".")[0]
