"""Mesh layout on gloo ranks: coordinates, groups, pipeline peers, timeouts, bad degrees."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests._ranks import run_ranks
from tripar.errors import ConfigError
from tripar.runtime.mesh import build_mesh


def _layouts() -> list:
    rank = dist.get_rank()
    seen = []
    for pp, dp, tp in [(2, 1, 2), (1, 2, 2), (2, 2, 1), (4, 1, 1)]:
        mesh = build_mesh(pp, dp, tp, timeout_s=7)
        c = mesh.coords
        assert rank == (c.pp * dp + c.dp) * tp + c.tp, (pp, dp, tp, c)  # tp innermost
        groups = {axis: dist.get_process_group_ranks(mesh.group(axis)) for axis in ("pp", "dp", "tp")}
        assert len(groups["pp"]) == pp and len(groups["dp"]) == dp and len(groups["tp"]) == tp
        stride = dp * tp
        assert groups["pp"] == [rank % stride + k * stride for k in range(pp)]
        assert mesh.next_rank == (rank + stride) % (pp * stride)
        assert mesh.prev_rank == (rank - stride) % (pp * stride)
        assert mesh.stage_rank(c.pp + pp) == rank  # virtual stage s runs on pp rank s % pp
        for axis in ("pp", "dp", "tp"):
            backend = mesh.group(axis)._get_backend(mesh.device)
            assert backend.options._timeout.total_seconds() == 7, axis
        seen.append((pp, dp, tp, c.pp, c.dp, c.tp))
        # the same shape again (another auto_parallel in this job): the same groups, no new
        again = build_mesh(pp, dp, tp, timeout_s=7, vpp=2)
        assert again.vpp == 2 and all(again.group(a) is mesh.group(a) for a in groups)
    other = build_mesh(2, 1, 2, timeout_s=8)  # another timeout: groups of their own
    assert other.group("tp") is not build_mesh(2, 1, 2, timeout_s=7).group("tp")
    with pytest.raises(ConfigError, match="world has 4"):
        build_mesh(2, 1, 1)
    with pytest.raises(ConfigError, match="positive integer"):
        build_mesh(0, 4, 1)
    return seen


def test_mesh_layouts_on_four_ranks():
    results = run_ranks(_layouts, 4, timeout_s=60)
    assert [r[0][3:] for r in results] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]


def test_build_mesh_needs_a_process_group(monkeypatch):
    # as in a fresh process, whatever group another test in this worker made
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(ConfigError, match="init_process_group"):
        build_mesh(1, 1, 1)
