"""``tripar report``: a metrics file from ``tripar train --metrics`` becomes a summary and a plot."""

from __future__ import annotations

import json

import pytest

from tripar.cli import main


def _line(step, loss, **more):
    return json.dumps({"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0,
                       "tokens_per_s": 1000.0 + step, "mfu": 0.01, "eval_loss": None,
                       "peak_memory_bytes": [1, 2], **more})


def test_report_plots_loss_and_throughput(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "run.jsonl"
    metrics.write_text("\n".join([_line(2, 3.0, eval_loss=3.1), _line(1, 3.5), _line(3, 2.5)])
                       + "\n")
    assert main(["report", str(metrics)]) == 0
    out = capsys.readouterr().out
    assert "steps 1..3 (3 logged): loss 3.5000 -> 2.5000, held-out 3.1000 at step 2" in out
    assert "1,002 tokens/s, MFU 1.00%" in out
    png = tmp_path / "run.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(metrics), "--out", str(tmp_path / "other.png")]) == 0
    assert (tmp_path / "other.png").is_file()


def test_report_refuses_what_is_not_a_metrics_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"loss": 1.0}\n')
    assert main(["report", str(bad)]) == 2
    assert "line 1 of" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad.write_text("\n")
    assert main(["report", str(bad)]) == 2
    assert "no metrics lines" in capsys.readouterr().err
