"""``tripar plan``: text and JSON output, pins, --out, --dump-lp, errors."""

from __future__ import annotations

import json

from tripar.cli import main
from tripar.plan.plan import Plan

MODEL = "gpt:layers=4,hidden=256,heads=4,vocab=1000,seq=128"


def test_plan_json_has_the_promised_fields(capsys, tmp_path):
    out = tmp_path / "plan.json"
    lp = tmp_path / "partition.lp"
    code = main(["plan", MODEL, "--gpus-per-node", "4", "--global-batch", "16", "--pp", "2",
                 "--format", "json", "--out", str(out), "--dump-lp", str(lp)])
    assert code == 0
    data = json.loads(capsys.readouterr().out)  # one JSON object, nothing else on stdout
    assert {"dp", "tp", "pp", "vpp", "micro_batch_size", "num_microbatches", "schedule",
            "recompute", "zero"} <= set(data["parallel"])
    assert data["parallel"]["pp"] == 2
    assert data["parallel"]["dp"] * data["parallel"]["tp"] * 2 == 4
    assert {"step_time_s", "tokens_per_s", "peak_memory_bytes",
            "bubble_fraction"} <= set(data["estimate"])
    assert all({"blocks", "time_s", "memory_bytes", "recompute"} <= set(s)
               for s in data["stages"])
    assert data["solve_time_s"] > 0 and isinstance(data["alternatives"], list)
    plan = Plan.load(out)
    assert plan.to_dict() == data and plan.model.spec == MODEL
    assert "assign_b0_s0" in lp.read_text() and "mem_limit_s1" in lp.read_text()


def test_plan_text_summary(capsys):
    assert main(["plan", MODEL, "--gpus-per-node", "2", "--global-batch", "8",
                 "--schedule", "1f1b", "--zero", "0"]) == 0
    text = capsys.readouterr().out
    assert "parallel: dp=" in text and "| 1f1b |" in text and "ZeRO-0" in text
    assert "estimate: step" in text and "runners-up:" in text


def test_contradicting_pins_exit_with_a_message(capsys):
    code = main(["plan", MODEL, "--gpus-per-node", "4", "--global-batch", "16", "--dp", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no configuration matches 4 devices" in err and "dp=3" in err
    code = main(["plan", MODEL, "--gpus-per-node", "4", "--global-batch", "16", "--vpp", "2",
                 "--schedule", "gpipe"])
    assert code == 2 and "needs schedule interleaved-1f1b" in capsys.readouterr().err
