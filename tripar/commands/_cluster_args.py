"""``--gpu NAME --nodes N --gpus-per-node G`` or ``--cluster FILE``, and ``--optimizer``
(whose step the cost model charges), shared by commands."""

from __future__ import annotations

import argparse

from tripar.errors import ConfigError
from tripar.partitioner.hardware import BUILTIN_DEVICES, OPTIMIZER_STEP_BYTES, Cluster


def add_cluster_args(parser: argparse.ArgumentParser, *, default_gpu: str = "a100-80g") -> None:
    """Add the hardware options to ``parser``."""
    group = parser.add_argument_group("hardware")
    group.add_argument("--gpu", default=None, metavar="NAME",
                       help=f"built-in device: {', '.join(BUILTIN_DEVICES)} "
                            f"(default {default_gpu})")
    group.add_argument("--nodes", type=int, default=None, metavar="N",
                       help="number of nodes (default 1, or the profile's)")
    group.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                       help="devices per node (default 8, or the profile's)")
    group.add_argument("--cluster", default=None, metavar="FILE",
                       help="a profile JSON (from `tripar calibrate`) instead of --gpu")
    group.add_argument("--optimizer", choices=tuple(OPTIMIZER_STEP_BYTES), default="adamw",
                       help="the optimizer whose step is costed, as `tripar train "
                            "--optimizer` builds it (default adamw; sgd moves 12 of its 28 "
                            "bytes per parameter)")
    parser.set_defaults(_default_gpu=default_gpu)


def cluster_from_args(args: argparse.Namespace) -> Cluster:
    """The Cluster the options describe, costing the ``--optimizer``'s step.
    ``--nodes``/``--gpus-per-node`` resize a profile."""
    step_bytes = OPTIMIZER_STEP_BYTES[getattr(args, "optimizer", "adamw")]
    return _hardware(args).with_optimizer(step_bytes)


def _hardware(args: argparse.Namespace) -> Cluster:
    for name in ("nodes", "gpus_per_node"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if getattr(args, "cluster", None):
        if getattr(args, "gpu", None):
            raise ConfigError("give either --gpu or --cluster FILE, not both "
                              f"(--gpu {args.gpu}, --cluster {args.cluster})")
        cluster = Cluster.from_file(args.cluster)
        return cluster.resized(nodes=args.nodes, devices_per_node=args.gpus_per_node)
    gpu = args.gpu or getattr(args, "_default_gpu", "a100-80g")
    return Cluster.builtin(gpu, nodes=args.nodes or 1,
                           gpus_per_node=args.gpus_per_node or 8)
