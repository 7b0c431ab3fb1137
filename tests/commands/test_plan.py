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


def test_sequence_parallelism_with_a_sequence_as_long_as_the_hidden_size(capsys):
    assert main(["plan", "gpt:layers=2,hidden=64,heads=4,seq=64", "--gpus-per-node", "2",
                 "--tp", "2", "--sp", "--global-batch", "2"]) == 0
    text = capsys.readouterr().out
    assert "| sp" in text and "sequence parallelism on" in text


def test_the_optimizer_step_is_costed_as_train_builds_it(capsys):
    from tripar.commands.train import optimizer_factory
    from tripar.partitioner.hardware import OPTIMIZER_STEP_BYTES
    from tripar.runtime import optimizer_step_bytes

    steps = {}
    for name, step_bytes in OPTIMIZER_STEP_BYTES.items():
        # tripar train builds what tripar plan --optimizer costs
        assert optimizer_step_bytes(optimizer_factory(name, 0.1)) == step_bytes
        assert main(["plan", MODEL, "--gpus-per-node", "2", "--global-batch", "8", "--pp", "1",
                     "--zero", "0", "--optimizer", name, "--format", "json"]) == 0
        steps[name] = json.loads(capsys.readouterr().out)["estimate"]["step_time_s"]
    assert steps["sgd"] < steps["adamw"]


def test_contradicting_pins_exit_with_one_clear_message(capsys):
    cases = [
        (["--gpus-per-node", "8", "--dp", "3"], "--dp 3 does not divide the 8 devices"),
        (["--gpus-per-node", "8", "--tp", "3"], "--tp 3 does not divide the 8 devices"),
        (["--gpus-per-node", "4", "--dp", "4", "--micro-batch", "3"],
         "--global-batch 16 is not divisible by --dp x --micro-batch = 4 x 3 = 12"),
        (["--gpus-per-node", "4", "--vpp", "2", "--schedule", "gpipe"],
         "needs schedule interleaved-1f1b"),
    ]
    for extra, want in cases:
        code = main(["plan", MODEL, "--global-batch", "16", *extra])
        err = capsys.readouterr().err
        assert code == 2 and want in err, (extra, err)
        assert err.count("error:") == 1 and "Traceback" not in err
    main(["plan", MODEL, "--global-batch", "16", "--gpus-per-node", "8", "--tp", "8"])
    err = capsys.readouterr().err
    assert "--tp 8 does not divide the model's attention heads (4)" in err, err
    assert "use --tp 2 or --tp 4 or --tp 1" in err, err


def test_gpt3_on_one_node_fails_naming_the_stage_bytes_and_fix(capsys):
    code = main(["plan", "gpt:layers=96,hidden=12288,heads=96,vocab=51200,seq=2048",
                 "--gpu", "a100-80g", "--nodes", "1", "--gpus-per-node", "8",
                 "--global-batch", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "pipeline stage" in err and "bytes more than the 80000000000 bytes" in err
    assert "fix: one model replica needs at least" in err and "nodes of 8" in err
