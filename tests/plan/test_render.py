"""The text form of a plan: what ``tripar plan`` prints."""

from __future__ import annotations

from example_plans import make_plan


def test_render_is_a_readable_summary():
    text = make_plan().render()
    assert "dp=2 tp=2 pp=2 vpp=1 | micro-batch 2 x 4 | 1f1b | recompute stage-aware | ZeRO-1" \
        in text
    assert "peak memory 60.0 GB of 80.0 GB, bubble 20.0%" in text
    assert "embed .. h.1 (3)" in text and "1/3" in text
    assert "tensor parallel (tp=2): 2 regions sharded: 1 attention, 1 mlp" in text
    assert "\n  h.0:mlp:0, h.0:attention:0\n" in text
    assert "rank 0: F0 F1 B0" in text
    assert "needs 91.2 GB > 80.0 GB on pipeline rank 0 [memory]" in text
    assert "(+25.0%)" in text and "note: tp pinned by the user" in text
    assert all(len(line) <= 100 for line in text.splitlines())
