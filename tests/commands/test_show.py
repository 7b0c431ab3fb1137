"""``tripar show``: the plan with its schedule grid and a drawn timeline."""

from __future__ import annotations

from tripar.cli import main

MODEL = "gpt:layers=4,hidden=256,heads=4,vocab=1000,seq=128"


def test_show_prints_the_plan_and_the_grid(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", MODEL, "--gpus-per-node", "4", "--global-batch", "16", "--pp", "2",
                 "--schedule", "1f1b", "--out", str(out)]) == 0
    capsys.readouterr()
    svg = tmp_path / "timeline.svg"
    assert main(["show", str(out), "--steps", "4", "--timeline", str(svg)]) == 0
    text = capsys.readouterr().out
    assert "parallel: dp=2 tp=1 pp=2" in text
    assert "Rank 0" in text and "Rank 1" in text
    assert "Step 0: F0" in text and "timeline drawn to" in text
    assert svg.stat().st_size > 1000


def test_show_missing_file(capsys, tmp_path):
    assert main(["show", str(tmp_path / "none.json")]) == 2
    assert "cannot read plan file" in capsys.readouterr().err
