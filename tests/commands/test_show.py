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


def _shown(capsys, tmp_path, schedule: str) -> tuple[str, str]:
    """``tripar show`` of a pp=4 plan under ``schedule``: its text, and its drawn SVG."""
    out = tmp_path / f"{schedule}.json"
    assert main(["plan", MODEL, "--gpus-per-node", "4", "--global-batch", "8", "--pp", "4",
                 "--schedule", schedule, "--micro-batch", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    svg = tmp_path / f"{schedule}.svg"
    assert main(["show", str(out), "--timeline", str(svg)]) == 0
    return capsys.readouterr().out, svg.read_text()


def _grid(text: str) -> list[list[str]]:
    """The cells of the printed steps x ranks grid, row by row."""
    return [line.split(":", 1)[1].split() for line in text.splitlines()
            if line.startswith("Step ")]


def test_show_names_each_action_s_pipeline_under_chimera(capsys, tmp_path):
    text, svg = _shown(capsys, tmp_path, "chimera")
    # 4 microbatches: 0-1 take the down pipeline (v), 2-3 the up one (^)
    rows = _grid(text)
    assert rows[0] == ["F0v", "F0v", "F2^", "F2^"]
    cells = [c for row in rows for c in row]
    assert len(cells) == 4 * 4 * 2  # F and B of 4 microbatches on 4 ranks
    assert all(c[-1] == ("v" if int(c[1:-1]) < 2 else "^") for c in cells), cells
    assert "v: the down pipeline, microbatches 0-1 (rank r runs stage r)" in text
    assert "^: the up pipeline, microbatches 2-3 (rank r runs stage 3-r)" in text
    assert "<!-- 0:0v -->" in svg and "<!-- 3:2^ -->" in svg  # rank 0's labels
    assert "down pipeline" in svg and "up pipeline (hatched)" in svg


def test_show_marks_no_pipeline_under_1f1b(capsys, tmp_path):
    text, svg = _shown(capsys, tmp_path, "1f1b")
    rows = _grid(text)
    assert rows[0] == ["F0", "F0", "F0", "F0"]  # steps are positions in a rank's list
    assert all(c[-1].isdigit() for row in rows for c in row), rows
    assert "down pipeline" not in text and "up pipeline" not in text
    assert "down pipeline" not in svg and "up pipeline" not in svg


def test_show_missing_file(capsys, tmp_path):
    assert main(["show", str(tmp_path / "none.json")]) == 2
    assert "cannot read plan file" in capsys.readouterr().err
