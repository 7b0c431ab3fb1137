"""tripar.graph.blocks: nodes grouped into blocks by module, contiguous in graph order."""

from __future__ import annotations

import torch
from torch import nn

from tripar.graph.blocks import partition_blocks


def test_partition_handles_root_level_ops_and_shared_modules() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 4)
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x) * 2  # root-level op joins the embedding block
            for layer in self.layers:
                h = layer(h)
            return self.embed(h).sum()  # the shared module runs again

    gm = torch.fx.symbolic_trace(Shared())
    part = partition_blocks(gm)
    assert part.names == ("embed", "layers.0", "layers.1", "embed@1", "loss")
    assert part.nodes[0] == ("embed", "mul")
    assert part.layer == (False, True, True, False, False)
