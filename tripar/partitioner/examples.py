"""A hand-built GPT-like proxy graph: the partitioner's examples, tests and benchmarks.

It costs nothing to build (no model, no capture), so the doctests plan it (the pytest
plugin ``tests/doctest_namespace.py`` puts ``example_graph`` in their namespace), the
tests use it as a fixture, and the planner's benchmarks time the search on it.
"""

from __future__ import annotations

from tripar.graph.proxy import Block, ProxyGraph, TPRegion


def example_graph(layers: int = 2, hidden: int = 256, seq: int = 128, vocab: int = 1000,
                  heads: int = 4) -> ProxyGraph:
    """A hand-built GPT-like proxy graph (fp32, batch 1) for examples and tests.

    FLOPs and bytes follow Megatron's and Korthikanti's formulas; the real
    graphs come from ``tripar.graph.build.analyze``.

    >>> [b.kind for b in example_graph(layers=2).blocks]
    ['embedding', 'layer', 'layer', 'head']
    """
    import networkx as nx

    s, h, v = seq, hidden, vocab
    act = 4 * s * h
    layer_mm = ((s, h, 3 * h), (s, h, h), (s, h, 4 * h), (s, 4 * h, h))
    attn_flops = 4 * s * s * h
    layer_fwd = sum(2 * m * k * n for m, k, n in layer_mm) + attn_flops
    blocks = [Block("embedding", 0, "embedding", ("wte",), v * h + s * h, 4 * (v * h + s * h),
                    0, 0, 8 * s, 8 * s, act, "emb", (), ("wte.weight", "wpe.weight"))]
    for i in range(layers):
        blocks.append(Block(
            f"blocks.{i}", i + 1, "layer", (f"blocks_{i}",), 12 * h * h + 13 * h,
            4 * (12 * h * h + 13 * h), layer_fwd, 2 * layer_fwd,
            2 * (34 * s * h + 5 * heads * s * s), act, act, "layer", layer_mm))
    head_fwd = 2 * s * h * v
    blocks.append(Block("head", layers + 1, "head", ("lm_head",), 2 * h, 8 * h, head_fwd,
                        2 * head_fwd, act + 4 * s * v, act, 4, "head", ((s, h, v),)))
    graph = nx.DiGraph()
    for a, b in zip(blocks, blocks[1:]):
        graph.add_edge(a.name, b.name, bytes=a.output_bytes, tensors=())
    regions = []
    for i in range(layers):
        for kind in ("attention", "mlp"):
            names = ("qkv", "proj") if kind == "attention" else ("fc", "fc2")
            regions.append(TPRegion(kind, f"blocks.{i}", (), (), "all_reduce", "all_reduce",
                                    act, (2, 4, 8) if heads % 8 == 0 else (2, 4), heads=heads,
                                    column=(f"blocks_{i}_{names[0]}",),
                                    row=(f"blocks_{i}_{names[1]}",)))
    return ProxyGraph(blocks=blocks, cuts=[], graph=graph, tracer="fx", tracer_reason="example",
                      batch_size=1, seq_len=s, dtype="torch.float32", tp_regions=regions,
                      model_config={"layers": layers, "hidden": h, "heads": heads,
                                    "vocab": v, "seq": s})
