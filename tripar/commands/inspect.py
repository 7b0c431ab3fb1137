"""``tripar inspect MODEL``: the proxy graph of a model, as tables or JSON.

Shows the tracer used (and why), every block with its parameters, FLOPs,
saved-for-backward bytes and signature, the candidate pipeline cuts with the
tensors that cross them, and the tensor-parallel regions found in the graph.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tripar.commands._model_args import add_model_args, load_proxy_graph
from tripar.graph.proxy import ProxyGraph


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect", help="trace a model and show its blocks, cuts and TP regions",
        description=__doc__.splitlines()[0],
    )
    add_model_args(parser)
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="text tables (default) or one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    proxy = load_proxy_graph(args)
    if args.format == "json":
        print(json.dumps(to_json(proxy, args.model)))
    else:
        render(proxy, args.model)
    return 0


def to_json(proxy: ProxyGraph, model: str = "") -> dict:
    """The JSON form ``tripar inspect --format json`` prints."""
    blocks = proxy.blocks
    return {
        "model": model,
        "tracer": proxy.tracer,
        "tracer_reason": proxy.tracer_reason,
        "batch_size": proxy.batch_size,
        "seq_len": proxy.seq_len,
        "dtype": proxy.dtype,
        "params": sum(b.params for b in blocks),
        "param_bytes": sum(b.param_bytes for b in blocks),
        "flops": {"forward": sum(b.forward_flops for b in blocks),
                  "backward": sum(b.backward_flops for b in blocks)},
        "saved_bytes": sum(b.saved_bytes for b in blocks),
        "blocks": [
            {"name": b.name, "index": b.index, "kind": b.kind, "nodes": len(b.nodes),
             "params": b.params, "param_bytes": b.param_bytes,
             "forward_flops": b.forward_flops, "backward_flops": b.backward_flops,
             "saved_bytes": b.saved_bytes, "input_bytes": b.input_bytes,
             "output_bytes": b.output_bytes, "signature": b.signature}
            for b in blocks
        ],
        "cuts": [
            {"after": c.after, "bytes": c.bytes,
             "tensors": [{"node": t.node, "shape": list(t.shape), "dtype": t.dtype,
                          "bytes": t.bytes} for t in c.tensors]}
            for c in proxy.cuts
        ],
        "tp_regions": [
            {"kind": r.kind, "block": r.block, "nodes": list(r.nodes),
             "shards": [list(s) for s in r.shards], "degrees": list(r.degrees),
             "forward_collective": r.forward_collective,
             "backward_collective": r.backward_collective, "comm_bytes": r.comm_bytes}
            for r in proxy.tp_regions
        ],
        "unproven": [{"block": u.block, "nodes": list(u.nodes), "reason": u.reason}
                     for u in proxy.unproven],
        "skips": [list(s) for s in proxy.skips],
        "late_inputs": [list(s) for s in proxy.late_inputs],
        "derived_inputs": [list(s) for s in proxy.derived_inputs],
        "tied_weights": [list(t) for t in proxy.tied_weights],
        "model_config": proxy.model_config,
    }


def _si(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:g} {unit}".rstrip()


def _bytes(value: int) -> str:
    for scale, prefix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= scale:
            return f"{value / scale:.2f} {prefix}"
    return f"{value} B"


def render(proxy: ProxyGraph, model: str = "") -> None:
    """Print the proxy graph as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, width=max(120, Console().width))
    blocks = proxy.blocks
    console.print(f"[bold]{model}[/]  batch {proxy.batch_size} x seq {proxy.seq_len}, "
                  f"{proxy.dtype}")
    console.print(f"tracer: [bold]{proxy.tracer}[/] ({proxy.tracer_reason})")
    console.print(f"params {_si(sum(b.params for b in blocks))}, "
                  f"forward {_si(sum(b.forward_flops for b in blocks), 'FLOP')}, "
                  f"backward {_si(sum(b.backward_flops for b in blocks), 'FLOP')}, "
                  f"saved for backward {_bytes(sum(b.saved_bytes for b in blocks))}")
    table = Table(title="blocks")
    for column in ("#", "block", "kind", "params", "fwd FLOPs", "bwd FLOPs", "saved",
                   "signature"):
        table.add_column(column, justify="right" if column not in ("block", "kind") else "left")
    for b in blocks:
        table.add_row(str(b.index), b.name, b.kind, _si(b.params), _si(b.forward_flops),
                      _si(b.backward_flops), _bytes(b.saved_bytes), b.signature)
    console.print(table)
    cuts = Table(title="cut candidates (after block: tensors sent p2p)")
    for column in ("after", "tensors", "bytes"):
        cuts.add_column(column)
    for c in proxy.cuts:
        tensors = ", ".join(f"{t.node}{list(t.shape)}" for t in c.tensors) or "-"
        cuts.add_row(c.after, tensors, _bytes(c.bytes))
    console.print(cuts)
    extras = []
    if proxy.late_inputs:
        extras.append("late inputs: " + ", ".join(f"{i} -> {b}" for i, b in proxy.late_inputs))
    if proxy.derived_inputs:
        extras.append("derived from inputs: "
                      + ", ".join(f"{i} -> {b}" for i, b in proxy.derived_inputs))
    if proxy.tied_weights:
        extras.append("tied weights: " + "; ".join(" = ".join(t) for t in proxy.tied_weights))
    if proxy.skips:
        extras.append("skips: " + ", ".join(f"{a} -> {b}" for a, b in proxy.skips))
    for line in extras:
        console.print(line)
    regions = Table(title="tensor-parallel regions")
    for column in ("kind", "block", "nodes", "degrees", "fwd / bwd collective", "comm"):
        regions.add_column(column)
    for r in proxy.tp_regions:
        regions.add_row(r.kind, r.block, str(len(r.nodes)),
                        ",".join(str(d) for d in r.degrees),
                        f"{r.forward_collective} / {r.backward_collective}",
                        _bytes(r.comm_bytes))
    console.print(regions)
    if proxy.unproven:
        console.print(f"{len(proxy.unproven)} candidate regions stay replicated:")
        for u in proxy.unproven[:20]:
            console.print(f"  {u.block}: {u.reason}")
        if len(proxy.unproven) > 20:
            console.print(f"  ... and {len(proxy.unproven) - 20} more")
