"""Graph capture: any model into an annotated proxy graph.

capture (FX, torch.export fallback) -> annotate (shapes, FLOPs, saved bytes on
fake tensors) -> build_proxy_graph (blocks, signatures, cuts, TP regions).
``capture_model`` runs all three for an example batch and records how batches feed the
graph (``Captured``: what the planner, codegen and the runtime read); ``analyze``
returns the proxy graph alone. Two definitions the later layers share: the fake-tensor
run of a graph (``FakeInterpreter``, ``node_values``) and which names a parameter goes
by (``param_groups``, ``tied_groups``, ``canonical_names``, ``read_params``).
"""

from tripar.graph.annotate import NodeInfo, annotate
from tripar.graph.blocks import partition_blocks
from tripar.graph.build import build_proxy_graph
from tripar.graph.capture import capture, flat_graph_inputs
from tripar.graph.captured import (
    Captured,
    analyze,
    batch_size,
    capture_model,
    example_sizes,
    for_micro_batch,
)
from tripar.graph.params import canonical_names, param_groups, read_params, tied_groups
from tripar.graph.proxy import Block, Cut, ProxyGraph, TensorInfo, TPRegion, Unproven
from tripar.graph.selective import Selection, connected_groups, select_segments
from tripar.graph.tp_regions import find_tp_regions
from tripar.graph.values import FakeInterpreter, baked_devices, node_values

__all__ = [
    "Block",
    "Captured",
    "Cut",
    "FakeInterpreter",
    "NodeInfo",
    "ProxyGraph",
    "TPRegion",
    "TensorInfo",
    "Selection",
    "Unproven",
    "analyze",
    "annotate",
    "baked_devices",
    "batch_size",
    "build_proxy_graph",
    "canonical_names",
    "capture",
    "capture_model",
    "connected_groups",
    "example_sizes",
    "find_tp_regions",
    "flat_graph_inputs",
    "for_micro_batch",
    "node_values",
    "param_groups",
    "partition_blocks",
    "read_params",
    "select_segments",
    "tied_groups",
]
