"""What the tensor-parallel region finder needs to know about graph nodes.

Both kinds of captured graph are read through the same few questions: what op a
node is (``op_name``: ``view`` for ``x.view(...)``, ``aten.view.default`` and
``torch.reshape`` alike), which parameter a linear or embedding multiplies by
(``find_linears``). Every node's value on the meta device is ``values.meta_values``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from tripar.graph.params import canonical_names

UNARY = frozenset(
    "relu gelu silu sigmoid tanh exp log log1p neg abs sqrt rsqrt erf sin cos reciprocal "
    "square softplus mish elu selu celu leaky_relu hardtanh relu6 hardswish hardsigmoid "
    "dropout alpha_dropout feature_alpha_dropout contiguous clone detach alias to type "
    "type_as float half bfloat16 double to_copy lift_fresh_copy unary clamp clamp_min "
    "clamp_max nan_to_num sign logical_not bitwise_not quick_gelu".split()
)
"""Ops applied elementwise to their first argument alone (other tensor args give dtype only)."""

NARY = frozenset(
    "add sub mul div true_divide truediv rsub pow maximum minimum where masked_fill eq ne "
    "lt le gt ge logical_and logical_or bitwise_and bitwise_or and or atan2 fmod remainder "
    "lerp addcmul addcdiv copysign xlogy hypot".split()
)
"""Elementwise ops over all their broadcast tensor arguments."""

REDUCE = frozenset(
    "sum mean amax amin var std logsumexp norm max min argmax argmin prod all any "
    "softmax log_softmax cumsum".split()
)
"""Ops that reduce (or normalise) along a ``dim`` argument."""

NORMS = frozenset("layer_norm native_layer_norm rms_norm group_norm batch_norm instance_norm".split())
VIEWS = frozenset("view reshape unsafe_view flatten unflatten view_as reshape_as".split())
SPLITS = frozenset("split split_with_sizes chunk tensor_split unsafe_split".split())
MATMULS = frozenset("matmul bmm mm".split())
SDPA = frozenset(("scaled_dot_product_attention",))
CE = frozenset(("cross_entropy", "cross_entropy_loss"))
NLL = frozenset(("nll_loss", "nll_loss_nd", "nll_loss_forward", "nll_loss2d", "nll_loss2d_forward"))
NOOPS = frozenset(("assert_tensor_metadata", "assert_scalar", "sym_constrain_range_for_size"))

_NON_ELEMENTWISE_ACTIVATIONS = ("Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention", "GLU", "PReLU")


def op_name(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    """A tracer-independent name for what ``node`` computes.

    >>> import torch.fx
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.GELU()))
    >>> [op_name(n, dict(gm.named_modules())) for n in gm.graph.nodes]
    ['placeholder', 'linear', 'unary', 'output']
    """
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    if node.op == "call_module":
        mod = modules.get(node.target)
        if isinstance(mod, nn.Linear):
            return "linear"
        if isinstance(mod, nn.Embedding):
            return "embedding"
        if isinstance(mod, nn.modules.dropout._DropoutNd) or isinstance(mod, nn.Identity):
            return "unary"
        if isinstance(mod, nn.LayerNorm):
            return "layer_norm"
        if type(mod).__name__ == "RMSNorm" and type(mod).__module__.startswith("torch.nn"):
            return "rms_norm"
        if (
            type(mod).__module__ == "torch.nn.modules.activation"
            and type(mod).__name__ not in _NON_ELEMENTWISE_ACTIVATIONS
        ):
            return "unary"
        return f"module:{type(mod).__name__}"
    target = node.target
    if node.op == "call_method":
        name = str(target)
    elif isinstance(target, torch._ops.OpOverload):
        name = target.overloadpacket.__name__
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target.__name__
    else:
        name = getattr(target, "__name__", str(target))
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    elif name.endswith("_") and not name.startswith("_"):
        name = name[:-1]  # in-place variants (add_) act like their out-of-place forms
    return name.lstrip("_")


def arg(node: torch.fx.Node, pos: int, name: str, default: Any = None) -> Any:
    """Argument ``pos`` (``self`` is 0) or keyword ``name`` of a call node."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def flat_args(node: torch.fx.Node) -> list[Any]:
    """The leaves of ``(node.args, node.kwargs)``, the indexing of rewrites and narrows."""
    return tree_flatten((node.args, node.kwargs))[0]


def set_flat_arg(node: torch.fx.Node, index: int, value: Any) -> None:
    """Replace leaf ``index`` of ``(node.args, node.kwargs)`` with ``value``."""
    leaves, spec = tree_flatten((node.args, node.kwargs))
    leaves[index] = value
    args, kwargs = tree_unflatten(leaves, spec)
    node.args = tuple(args)
    node.kwargs = dict(kwargs)


def leaf_index(node: torch.fx.Node, path: tuple) -> int:
    """Flat index of the leaf at ``path``: ``(0, i, j)`` is ``node.args[i][j]``, ``(1, key)``
    is ``node.kwargs[key]``."""
    marker = object()

    def mark(container: Any, rest: tuple) -> Any:
        if not rest:
            return marker
        head, tail = rest[0], rest[1:]
        if isinstance(container, dict):
            return {k: (mark(v, tail) if k == head else v) for k, v in container.items()}
        items = list(container)
        items[head] = mark(items[head], tail)
        return type(container)(items) if isinstance(container, tuple) else items

    marked = mark((tuple(node.args), dict(node.kwargs)), path)
    leaves = tree_flatten(marked)[0]
    return next(i for i, leaf in enumerate(leaves) if leaf is marker)


@dataclass(frozen=True, slots=True)
class Linear:
    """A node that multiplies an activation by a parameter matrix."""

    node: str
    weight: str
    """FQN of the weight."""
    out_dim: int
    """Weight dim that indexes output features (0 for ``[out, in]`` weights)."""
    in_dim: int
    bias: str | None
    input: str
    """The node feeding the activation operand."""
    embedding: bool = False


def param_ref(node: Any, params: dict[str, str]) -> tuple[str, bool] | None:
    """(FQN, transposed) when ``node`` is a parameter, or ``t``/``transpose`` of one."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "get_attr" and node.target in params:
        return params[node.target], False
    if node.op in ("call_function", "call_method") and node.args:
        name = op_name(node, {})
        inner = node.args[0]
        if name in ("t", "numpy_T") or (name == "getattr" and node.args[1:] == ("T",)):
            ref = param_ref(inner, params)
            return (ref[0], not ref[1]) if ref else None
        if name in ("transpose", "permute"):
            rest = [a % 2 if isinstance(a, int) else a for a in flat_args(node)[1:]]
            if rest in ([0, 1], [1, 0]):
                ref = param_ref(inner, params)
                return (ref[0], not ref[1]) if ref else None
        if name in ("detach", "alias", "to", "contiguous"):
            return param_ref(inner, params)
    return None


def linear_info(node: torch.fx.Node, modules: dict[str, nn.Module], params: dict[str, str]) -> Linear | None:
    """The `Linear` view of ``node`` when it multiplies by a parameter matrix, else None."""
    name = op_name(node, modules)
    if node.op == "call_module" and name in ("linear", "embedding"):
        mod = modules[node.target]
        weight = params[f"{node.target}.weight"]
        has_bias = getattr(mod, "bias", None) is not None
        bias = params.get(f"{node.target}.bias") if has_bias else None
        return Linear(node.name, weight, 0, 1, bias, node.args[0].name, embedding=name == "embedding")
    if node.op != "call_function":
        return None
    args = node.args
    if name == "linear" and len(args) >= 2:
        ref = param_ref(args[1], params)
        b = arg(node, 2, "bias")
        bref = param_ref(b, params) if b is not None else None
        if ref and isinstance(args[0], torch.fx.Node) and (b is None or bref):
            w_out = 1 if ref[1] else 0
            return Linear(node.name, ref[0], w_out, 1 - w_out, bref[0] if bref else None, args[0].name)
    elif name in ("addmm", "mm", "matmul") and len(args) >= 2:
        bias_arg, x, w = (args[0], args[1], args[2]) if name == "addmm" else (None, args[0], args[1])
        ref = param_ref(w, params)
        bref = param_ref(bias_arg, params) if bias_arg is not None else None
        if ref and isinstance(x, torch.fx.Node) and (bias_arg is None or bref):
            w_out = 0 if ref[1] else 1
            return Linear(node.name, ref[0], w_out, 1 - w_out, bref[0] if bref else None, x.name)
    elif name == "embedding" and len(args) >= 2:
        # F.embedding(input, weight) but aten.embedding(weight, indices)
        aten = isinstance(node.target, torch._ops.OpOverload)
        w, ids = (args[0], args[1]) if aten else (args[1], args[0])
        ref = param_ref(w, params)
        if ref and not ref[1] and isinstance(ids, torch.fx.Node):
            return Linear(node.name, ref[0], 0, 1, None, ids.name, embedding=True)
    return None


def find_linears(gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> dict[str, Linear]:
    """Every linear / embedding node of ``gm`` whose weight is a parameter, in graph order."""
    params = canonical_names(gm)
    found = {}
    for node in gm.graph.nodes:
        lin = linear_info(node, modules, params)
        if lin is not None:
            found[node.name] = lin
    return found


def fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def is_int_like(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


INT_OPS = {
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
    operator.neg, operator.getitem,
}
