"""CUDA's autocast policy, emulated on any device (the fake CPU run of annotate).

Plans trained at ``precision="bf16"`` run their stages under ``torch.autocast`` on the
GPU. What autograd saves then is neither the fp32 run's bytes nor half of them: matmuls
save bf16 copies of their inputs, while CUDA autocast runs normalizations, softmaxes,
losses and reductions in fp32 (and saves fp32), and the residual stream stays fp32 (fp32 +
bf16 promotes). CPU autocast's lists differ (layer_norm and softmax stay bf16 there), so
:class:`CudaAutocast` casts arguments itself, per CUDA autocast's op lists (PyTorch's
"Autocast Op Reference"), in a ``TorchFunctionMode``: above autograd, so the casts are
recorded and the saved tensors are the ones autograd really saves.

>>> import torch
>>> with CudaAutocast(torch.bfloat16):
...     y = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
...     z = torch.softmax(y, -1)
>>> y.dtype, z.dtype
(torch.bfloat16, torch.float32)
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

__all__ = ["LOWER", "FP32", "CudaAutocast"]

LOWER = frozenset({
    "__matmul__", "__rmatmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm",
    "chain_matmul", "multi_dot", "conv1d", "conv2d", "conv3d", "conv_tbc",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution", "linear",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "matmul", "mm", "mv", "prelu", "scaled_dot_product_attention", "_convolution",
})
"""Ops CUDA autocast runs in the lower precision (its floating arguments cast down)."""

FP32 = frozenset({
    "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin",
    "binary_cross_entropy_with_logits", "cosh", "cosine_embedding_loss", "cdist",
    "cosine_similarity", "cross_entropy", "cross_entropy_loss", "cumprod", "cumsum", "dist",
    "erfinv", "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss",
    "layer_norm", "log", "log_softmax", "log10", "log1p", "log2", "margin_ranking_loss",
    "mse_loss", "multilabel_margin_loss", "multi_margin_loss", "nll_loss", "nll_loss_nd",
    "norm", "normalize", "pdist", "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt",
    "sinh", "smooth_l1_loss", "soft_margin_loss", "softmax", "softmin", "softplus", "sum",
    "renorm", "tan", "triplet_margin_loss", "rms_norm",
    # the ATen forms an exported graph calls
    "native_layer_norm", "native_group_norm", "_softmax", "_log_softmax", "nll_loss_forward",
    "nll_loss2d_forward", "_fused_rms_norm",
})
"""Ops CUDA autocast runs in fp32 (its lower-precision floating arguments cast up)."""


_EXPORT_CHECKS = frozenset({"_assert_tensor_metadata"})


def _name(func: Any) -> str:
    name = getattr(func, "_opname", None) or getattr(func, "__name__", "")
    return name.split(".")[0]


class CudaAutocast(TorchFunctionMode):
    """Cast the floating arguments of the ops CUDA autocast lists to what it would run
    them in: ``dtype`` for :data:`LOWER`, fp32 for :data:`FP32`; others run on what they
    get (type promotion widens a mix, as autocast's promote list does; an ATen operator,
    which does not promote, gets a mix cast to its widest dtype)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = _name(func)
        if name in _EXPORT_CHECKS:
            return None  # an exported graph's check of the fp32 dtypes it was traced with
        target = self.dtype if name in LOWER else torch.float32 if name in FP32 else None
        if target is None and isinstance(func, torch._ops.OpOverload):
            floating = {t.dtype for t in pytree.tree_leaves((args, kwargs))
                        if isinstance(t, torch.Tensor) and t.is_floating_point()}
            if len(floating) > 1:
                target = torch.float32 if torch.float32 in floating else max(
                    floating, key=lambda d: torch.finfo(d).bits)
        if target is not None:
            def cast(t: torch.Tensor) -> torch.Tensor:
                return t.to(target) if t.is_floating_point() and t.dtype != target else t
            args, kwargs = pytree.tree_map_only(torch.Tensor, cast, (args, kwargs))
        return func(*args, **kwargs)
