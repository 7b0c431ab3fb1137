"""``tripar simulate``: one given configuration, text and JSON output, timeline, errors."""

from __future__ import annotations

import json

import pytest

from tripar.cli import main

GPT = "gpt:layers=4,hidden=256,heads=4,vocab=512,seq=128"


def simulate_json(capsys, *extra: str) -> dict:
    assert main(["simulate", GPT, "--gpu", "cpu", "--format", "json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_has_the_promised_fields(capsys):
    report = simulate_json(capsys, "--nodes", "1", "--gpus-per-node", "4",
                           "--global-batch", "16", "--dp", "2", "--tp", "1", "--pp", "2")
    est = report["estimate"]
    assert est["step_time_s"] > 0 and 0 < est["bubble_fraction"] < 1
    assert est["tokens_per_s"] == pytest.approx(16 * 128 / est["step_time_s"])
    assert est["peak_memory_bytes"] == max(s["memory_bytes"] for s in report["stages"])
    assert report["config"]["num_microbatches"] == 8  # 16 / (dp 2 x micro-batch 1)
    stages = report["stages"]
    assert len(stages) == 2 and all(s["time_s"] > 0 and s["memory_bytes"] > 0 for s in stages)
    assert stages[0]["layers"] == stages[1]["layers"] == 2  # uniform split by layers
    assert stages[0]["send_s"] > 0 and stages[1]["send_s"] == 0


def test_interleaved_schedule_from_vpp(capsys):
    args = ("--gpus-per-node", "2", "--global-batch", "4", "--pp", "2", "--dp", "1")
    plain = simulate_json(capsys, *args)
    inter = simulate_json(capsys, *args, "--vpp", "2")
    assert inter["config"]["schedule"] == "interleaved-1f1b"
    assert len(inter["stages"]) == 4 and [s["rank"] for s in inter["stages"]] == [0, 1, 0, 1]
    assert inter["estimate"]["bubble_fraction"] < plain["estimate"]["bubble_fraction"]
    for dev in inter["devices"]:   # a device's peak is its virtual stages' parts together
        assert dev["stages"] == [dev["rank"], dev["rank"] + 2]
        assert dev["peak_bytes"] == sum(inter["stages"][s]["memory_at_rank_peak_bytes"]
                                        for s in dev["stages"])
    assert main(["simulate", GPT, "--gpu", "cpu", *args, "--vpp", "2"]) == 0
    text = capsys.readouterr().out
    assert "device memory at each rank's peak = its virtual stages' parts" in text
    assert "rank 1:" in text and "stage 3" in text


def test_recompute_and_zero_change_time_and_memory(capsys):
    args = ("--gpus-per-node", "4", "--global-batch", "8", "--pp", "2", "--dp", "2")
    none = simulate_json(capsys, *args)
    full = simulate_json(capsys, *args, "--recompute", "full")
    zero = simulate_json(capsys, *args, "--zero", "1")
    assert full["estimate"]["step_time_s"] > none["estimate"]["step_time_s"]
    assert full["estimate"]["peak_memory_bytes"] < none["estimate"]["peak_memory_bytes"]
    assert zero["stages"][0]["static_bytes"] < none["stages"][0]["static_bytes"]


def test_text_summary_and_timeline(tmp_path, capsys):
    out = tmp_path / "t.svg"
    assert main(["simulate", GPT, "--gpu", "cpu", "--gpus-per-node", "2", "--global-batch", "4",
                 "--pp", "2",
                 "--schedule", "zb-h1", "--timeline", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "bubble" in text and "stages" in text
    assert out.stat().st_size > 1000 and out.read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("extra, message", [
    (("--gpus-per-node", "8", "--dp", "2", "--pp", "2"),
     r"dp\*tp\*pp = 2\*1\*2 = 4, but there are 8 devices.*\(e.g. --dp 4\)"),
    (("--gpus-per-node", "2", "--dp", "2", "--global-batch", "5"),
     r"--global-batch 5 is not divisible by --dp 2; use --global-batch 4 or 6"),
    (("--gpu", "b200", "--gpus-per-node", "1"), "unknown GPU 'b200'.*a100-80g"),
])
def test_user_errors_exit_2_with_numbers(capsys, extra, message):
    args = ["simulate", GPT, *extra]
    if "--global-batch" not in extra:
        args += ["--global-batch", "8"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("tripar simulate: error:")
    import re

    assert re.search(message, err), err


def test_selective_recompute_keeps_less_and_shows_per_stage(capsys):
    eager = "gpt:layers=4,hidden=32,heads=8,vocab=64,seq=32,attention=eager"
    args = ["simulate", eager, "--gpu", "cpu", "--gpus-per-node", "2", "--global-batch", "4",
            "--pp", "2", "--dp", "1", "--format", "json"]
    reports = {}
    for recompute in ("none", "selective"):
        assert main([*args, "--recompute", recompute]) == 0
        reports[recompute] = json.loads(capsys.readouterr().out)
    none, sel = reports["none"], reports["selective"]
    assert all(st["selective"] for st in sel["stages"])
    assert not any(st["selective"] for st in none["stages"])
    assert sel["estimate"]["peak_memory_bytes"] < none["estimate"]["peak_memory_bytes"]
    assert sel["estimate"]["step_time_s"] > none["estimate"]["step_time_s"]
