"""Timeline drawing: files are written, in the format the extension asks for."""

from __future__ import annotations

import pytest

from tripar.errors import ConfigError
from tripar.partitioner.schedules import build_schedule
from tripar.partitioner.simulator import TimelineEvent, simulate
from tripar.partitioner.stage_cost import StageCost
from tripar.partitioner.timeline import KIND_COLOURS, draw_timeline


def _result(name="scp", pp=4, m=6, vpp=1, recompute=None):
    cost = StageCost(forward_s=1.0, backward_input_s=2.0, backward_weight_s=0.5,
                     recompute_s=1.0, send_s=0.05)
    s = build_schedule(name, pp, m, vpp=vpp, recompute=recompute)
    return simulate(s, [cost] * s.num_stages)


def test_png(tmp_path):
    out = draw_timeline(_result(), tmp_path / "scp.png", title="scp, 4 stages, 6 microbatches")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_svg_has_a_bar_colour_per_kind(tmp_path):
    out = draw_timeline(_result("zb-h1", recompute="full"), tmp_path / "sub" / "zb.svg")
    text = out.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    for kind in "fRBW":  # recompute="full": no F
        assert KIND_COLOURS[kind] in text
    assert KIND_COLOURS["F"] not in text


def test_events_and_many_ranks(tmp_path):
    events = _result("interleaved-1f1b", pp=16, m=32, vpp=2).events
    assert len(events) > 600  # too many to label: bars only
    out = draw_timeline(list(events), tmp_path / "big.png")
    assert out.stat().st_size > 10_000
    one = [TimelineEvent(0, 0, "F", 0, 0.0, 1.0)]
    assert draw_timeline(one, tmp_path / "one.svg").stat().st_size > 1_000


def test_bad_requests(tmp_path):
    with pytest.raises(ConfigError, match=r"must end in \.png or \.svg"):
        draw_timeline(_result(), tmp_path / "t.pdf")
    empty = simulate(build_schedule("1f1b", 2, 2), [StageCost(1.0, 1.0, 1.0)] * 2,
                     record_timeline=False)
    with pytest.raises(ConfigError, match="record_timeline=True"):
        draw_timeline(empty, tmp_path / "t.png")


def test_chimera_s_up_pipeline_is_hatched_and_marked(tmp_path):
    s = build_schedule("chimera", 2, 2)
    result = simulate(s, [StageCost(1.0, 2.0, 0.0)] * 2)
    marked = draw_timeline(result, tmp_path / "marked.svg", pipeline_of=s.pipeline_of)
    text = marked.read_text()
    assert "<!-- 0:0v -->" in text and "<!-- 1:1^ -->" in text  # rank 0: stage 0 down, 1 up
    assert "<pattern" in text and "up pipeline (hatched)" in text
    plain = draw_timeline(result, tmp_path / "plain.svg").read_text()
    assert "<!-- 0:0 -->" in plain and "<pattern" not in plain and "pipeline" not in plain
