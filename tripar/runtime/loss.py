"""The one rule that turns what a model's last stage returns into the scalar loss.

Used by the executor (training: every forward of the last stage) and by
``ParallelModel.eval_step``. With a ``loss_fn`` the loss is ``loss_fn(output, microbatch)``;
without one it is the model's own loss, read from the output:

- a tensor of one element: the loss itself;
- a mapping with a ``loss`` entry, such as a transformers ``ModelOutput`` (a model captured
  with ``torch.export`` hands its output back as the dict its pytree flattens to): that entry;
- any other object with a tensor ``loss`` attribute: that attribute;
- a tuple or list whose first element is a one-element tensor (transformers with
  ``return_dict=False``): that element.

Anything else is a :class:`~tripar.errors.ConfigError` that names the type returned and
shows a ``loss_fn`` that would work for it.

>>> import torch
>>> model_loss(torch.tensor([2.0])), model_loss({"loss": torch.tensor(1.0), "logits": None})
(tensor(2.), tensor(1.))
>>> model_loss((torch.tensor(3.0), torch.zeros(2, 4)))
tensor(3.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from tripar.errors import ConfigError

__all__ = ["model_loss"]

_CROSS_ENTROPY = ("torch.nn.functional.cross_entropy({logits}.flatten(0, -2), "
                  "mb[\"labels\"].flatten())")


def model_loss(output: Any, microbatch: Any = None,
               loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, *,
               where: str = "the last stage") -> torch.Tensor:
    """The scalar (0-dim) loss of ``output``: ``loss_fn(output, microbatch)`` when given,
    else the model's own loss by the rule above. ``where`` names the stage in errors."""
    if loss_fn is not None:
        loss = loss_fn(output, microbatch)
        if not _is_scalar(loss):
            raise ConfigError(f"loss_fn(output, microbatch) of {where} must return a scalar "
                              f"tensor, got {_describe(loss)}")
        return loss.reshape(())
    loss = _own_loss(output)
    if loss is None:
        raise ConfigError(f"{where} returned {_describe(output)}, which holds no scalar loss "
                          f"(a one-element tensor, a 'loss' entry or attribute, or a tuple "
                          f"starting with the loss); {_suggest(output)}")
    return loss.reshape(())


def _own_loss(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.numel() == 1 else None
    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)):
        loss = output[0] if output else None
    else:
        loss = getattr(output, "loss", None)
    return loss if _is_scalar(loss) else None


def _is_scalar(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1


def _describe(value: Any) -> str:
    name = type(value).__name__
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        keys = ", ".join(repr(k) for k in value)
        return f"a {name} with keys [{keys}]"
    if isinstance(value, (tuple, list)):
        first = _describe(value[0]) if value else "nothing"
        return f"a {name} of {len(value)} whose first element is {first}"
    return f"a {name}"


def _suggest(output: Any) -> str:
    """A ``loss_fn`` that would turn this output into a loss (next-token or class logits
    against ``mb["labels"]``)."""
    if isinstance(output, Mapping) and "logits" in output:
        logits = 'out["logits"]'
    elif isinstance(output, (tuple, list)) and output:
        logits = "out[0]"
    elif isinstance(output, torch.Tensor):
        logits = "out"
    elif hasattr(output, "logits"):
        logits = "out.logits"
    else:
        return ("give loss_fn=lambda out, mb: <a scalar tensor computed from out and the "
                "microbatch mb>")
    hint = ("" if isinstance(output, torch.Tensor) else
            " (or, for a transformers model, put 'labels' in the batch: its output's loss is "
            "used)")
    return "give, e.g., loss_fn=lambda out, mb: " + _CROSS_ENTROPY.format(logits=logits) + hint
