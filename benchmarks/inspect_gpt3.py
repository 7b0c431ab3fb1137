"""Wall time and peak memory of inspecting GPT-3 175B on the meta device.

Runs what ``tripar inspect gpt:layers=96,hidden=12288,heads=96,vocab=51200,seq=2048``
does (build on meta, capture, annotate, build the proxy graph, TP regions) and
prints the wall time of each step and the process's peak resident memory
(``resource.getrusage``). The issue's bound: under 60 s and 4 GB on 2 cores.

    python benchmarks/inspect_gpt3.py [--batch N] [--spec SPEC]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

GPT3 = "gpt:layers=96,hidden=12288,heads=96,vocab=51200,seq=2048"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=GPT3)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    from tripar.graph.annotate import annotate
    from tripar.graph.build import build_proxy_graph
    from tripar.graph.capture import capture
    from tripar.models.spec import load_model

    steps: list[tuple[str, float]] = []
    t = time.perf_counter()
    steps.append(("import", t - start))
    loaded = load_model(args.spec, batch_size=args.batch, device="meta")
    steps.append(("build model on meta", time.perf_counter() - t))
    t = time.perf_counter()
    gm = capture(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    steps.append((f"capture ({gm.meta['tripar_tracer']})", time.perf_counter() - t))
    t = time.perf_counter()
    annotate(gm, loaded.example_inputs, loaded.example_kwargs)
    steps.append(("annotate", time.perf_counter() - t))
    t = time.perf_counter()
    proxy = build_proxy_graph(gm, batch_size=args.batch, seq_len=loaded.config.get("seq", 1),
                              model_config=loaded.config)
    steps.append(("build proxy graph + TP regions", time.perf_counter() - t))
    total = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    params = sum(b.params for b in proxy.blocks)
    fwd = sum(b.forward_flops for b in proxy.blocks)
    bwd = sum(b.backward_flops for b in proxy.blocks)
    print(f"model: {args.spec}, batch {args.batch}")
    print(f"params {params / 1e9:.2f} B, forward {fwd / 1e12:.1f} TFLOP, "
          f"backward {bwd / 1e12:.1f} TFLOP, {len(proxy.blocks)} blocks, "
          f"{len({b.signature for b in proxy.blocks})} signatures, "
          f"{len(proxy.tp_regions)} TP regions")
    for name, seconds in steps:
        print(f"  {name:32s} {seconds:7.2f} s")
    print(f"wall time: {total:.2f} s")
    print(f"peak RSS: {peak_kib / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
