"""tripar: automatic data, pipeline and tensor parallelism for PyTorch training.

The public surface is small:

- ``auto_parallel(model, devices, ...)``: plan, build and run a model in parallel;
  returns a ``ParallelModel`` (``train_step``, ``eval_step``, ``save``, ``load``);
- ``Plan``: the plan as data (``tripar plan`` writes it, ``tripar explain`` reads it);
- ``Cluster``: the machines a plan is made for;
- ``Pins``: what the user fixes of the plan (the rest is searched);
- ``export_checkpoint(ckpt, to, out)``: a checkpoint as a transformers directory, a torch
  state dict file or a torch.distributed.checkpoint directory (``tripar export``);
- ``TriparError``: the base of every error tripar raises on purpose.

Names load on first use, so that ``tripar plan`` never imports the runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

from tripar.errors import TriparError

__version__ = "0.1.0"

_LAZY = {
    "auto_parallel": "tripar.api",
    "ParallelModel": "tripar.runtime",
    "export_checkpoint": "tripar.runtime",
    "Plan": "tripar.plan",
    "Cluster": "tripar.partitioner",
    "Pins": "tripar.partitioner",
}

__all__ = ["Cluster", "ParallelModel", "Pins", "Plan", "TriparError", "__version__",
           "auto_parallel", "export_checkpoint"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tripar' has no attribute {name!r}")
