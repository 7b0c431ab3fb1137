"""Graph capture: any model into an annotated proxy graph.

capture (FX, torch.export fallback) -> annotate (shapes, FLOPs, saved bytes on
fake tensors) -> build_proxy_graph (blocks, signatures, cuts, TP regions).
``analyze`` runs all three.
"""

from tripar.graph.annotate import NodeInfo, annotate
from tripar.graph.blocks import partition_blocks
from tripar.graph.build import analyze, build_proxy_graph
from tripar.graph.capture import capture
from tripar.graph.proxy import Block, Cut, ProxyGraph, TensorInfo, TPRegion, Unproven
from tripar.graph.tp_regions import find_tp_regions

__all__ = [
    "Block",
    "Cut",
    "NodeInfo",
    "ProxyGraph",
    "TPRegion",
    "TensorInfo",
    "Unproven",
    "analyze",
    "annotate",
    "build_proxy_graph",
    "capture",
    "find_tp_regions",
    "partition_blocks",
]
