"""``tripar export CKPT --to hf|torch|dcp OUT``: a tripar checkpoint as a standard one.

``hf``: a transformers model directory (``config.json`` and safetensors) that
``from_pretrained`` loads, for transformers models (``hf:`` specs, model directories);
``torch``: one ``torch.save`` file of the state dict, for ``model.load_state_dict``;
``dcp``: a ``torch.distributed.checkpoint`` directory, for ``dcp.load``. Whatever plan
wrote the checkpoint, the tensors come out whole under the original parameter names
(:func:`tripar.runtime.export_checkpoint`, the same function from Python).
"""

from __future__ import annotations

import argparse
from typing import Any

FORMATS = ("hf", "torch", "dcp")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export", help="write a checkpoint as a transformers directory, a torch state_dict "
                       "file or a torch.distributed.checkpoint directory",
        description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a checkpoint directory (tripar train --save, ParallelModel.save)")
    parser.add_argument("--to", required=True, choices=FORMATS,
                        help="hf: transformers (config.json + safetensors); torch: one "
                             "state_dict file; dcp: a torch.distributed.checkpoint directory")
    parser.add_argument("out", metavar="OUT", help="the directory (hf, dcp) or file (torch) "
                                                   "to write")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="hf: the largest safetensors file before the model is split "
                             "(default 5GB)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tripar.runtime.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.to, args.out,
                            max_shard_size=args.max_shard_size)
    print(f"wrote {out} ({args.to})")
    return 0
