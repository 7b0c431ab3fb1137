"""``MODEL [--batch N] [--seq S]``, shared by every command that reads a model."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from tripar.errors import ConfigError
from tripar.graph.proxy import ProxyGraph

if TYPE_CHECKING:
    import torch

MODEL_HELP = (
    "a zoo model such as 'gpt:layers=2,hidden=64,heads=4,vocab=128,seq=16' "
    "(gpt, llama, bert, vit, resnet, t5), 'path/to/file.py:function', or "
    "'hf:ClassName:key=value,...' ('hf:path/to/model_dir' builds what its config.json says)"
)


def add_model_args(parser: argparse.ArgumentParser, *, batch_default: int = 1) -> None:
    """Add ``MODEL``, ``--batch`` and ``--seq`` to ``parser``."""
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--batch", type=int, default=batch_default, metavar="N",
                        help=f"samples in the example batch the graph is measured on "
                             f"(default {batch_default})")
    parser.add_argument("--seq", type=int, default=None, metavar="S",
                        help="sequence length (default: the model spec's seq)")


def check_model_args(args: argparse.Namespace) -> None:
    """Reject a non-positive ``--batch`` or ``--seq`` with a message naming the value."""
    if args.batch is None or args.batch < 1:
        raise ConfigError(f"--batch must be a positive integer, got {args.batch}")
    if args.seq is not None and args.seq < 1:
        raise ConfigError(f"--seq must be a positive integer, got {args.seq}")


def load_proxy_graph(args: argparse.Namespace, *, tp_degrees: tuple[int, ...] = (2, 4, 8)
                     ) -> ProxyGraph:
    """Build the MODEL on the meta device and return its proxy graph for the batch."""
    check_model_args(args)
    return proxy_graph_for(args.model, batch_size=args.batch, seq_len=args.seq,
                           tp_degrees=tp_degrees)


def proxy_graph_for(spec: str, *, batch_size: int = 1, seq_len: int | None = None,
                    tp_degrees: tuple[int, ...] = (2, 4, 8),
                    weights_dtype: torch.dtype | None = None) -> ProxyGraph:
    """The proxy graph of a MODEL spec, built on the meta device (no weights allocated).
    ``weights_dtype``: the dtype the weights are built in (default the model's own,
    fp32 for the zoo: tripar trains it in bf16 under autocast). ``torch.bfloat16`` models a
    framework that trains the model itself in half precision, as Megatron-LM does:
    every activation is then bf16, where autocast keeps norms, softmax, the loss and the
    residual stream in fp32."""
    from tripar.graph import analyze
    from tripar.models.spec import load_model

    loaded = load_model(spec, batch_size=batch_size, seq_len=seq_len, device="meta")
    if weights_dtype is not None:
        loaded.model.to(weights_dtype)
    config = dict(loaded.config)
    first = next((t for t in loaded.example_inputs if hasattr(t, "shape") and t.dim() >= 2),
                 None)
    seq = seq_len or config.get("seq") or (int(first.shape[1]) if first is not None else 1)
    return analyze(loaded.model, loaded.example_inputs, loaded.example_kwargs,
                   model_config=config, batch_size=batch_size, seq_len=int(seq),
                   tp_degrees=tp_degrees)
