"""``tripar explain``: what binds a plan and why the runners-up lost."""

from __future__ import annotations

import json
import re

from tripar.cli import main

MODEL = "gpt:layers=4,hidden=256,heads=4,vocab=1000,seq=128"


def test_explain_text_and_json(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", MODEL, "--gpus-per-node", "4", "--global-batch", "16",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["explain", str(out)]) == 0
    text = capsys.readouterr().out
    assert "what binds it (most first):" in text and "[memory] peak memory" in text
    assert "why not the runners-up:" in text
    assert main(["explain", str(out), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {b["binding"] for b in data["binds"]} >= {"memory", "compute"}
    assert data["alternatives"] and all(a["reason"] for a in data["alternatives"])


def test_explain_refuses_a_corrupt_plan(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "stages": [')
    assert main(["explain", str(bad)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_runners_up_never_blame_recomputation_when_recompute_is_none(capsys, tmp_path):
    """A runner-up that loses on compute names what grew its compute (here its smaller
    micro-batches), not recomputation, which none of them does."""
    out = tmp_path / "plan.json"
    assert main(["plan", MODEL, "--gpus-per-node", "4", "--global-batch", "16",
                 "--recompute", "none", "--schedule", "1f1b", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["explain", str(out), "--format", "json"]) == 0
    alternatives = json.loads(capsys.readouterr().out)["alternatives"]
    assert alternatives and all("recompute none" in a["parallel"] for a in alternatives)
    assert not any("recomput" in a["reason"] for a in alternatives), alternatives
    compute = [a["reason"] for a in alternatives if a["binding"] == "compute"]
    assert compute and all(r.startswith("more compute on the busiest device, ") for r in compute)
    assert any("smaller micro-batches (2 vs 4 samples)" in r for r in compute), compute


def test_plan_and_explain_show_each_device_with_its_virtual_stages(capsys, tmp_path):
    out = tmp_path / "plan.json"
    tiny = "gpt:layers=4,hidden=64,heads=4,vocab=128,seq=16"
    assert main(["plan", tiny, "--gpus-per-node", "2", "--global-batch", "8", "--pp", "2",
                 "--vpp", "2", "--micro-batch", "1", "--out", str(out)]) == 0
    planned = capsys.readouterr().out
    assert main(["explain", str(out)]) == 0
    explained = capsys.readouterr().out
    for text in (planned, explained):
        assert "device memory at each rank's peak = its virtual stages' parts:" in text
        line = next(x for x in text.splitlines() if x.strip().startswith("rank 1 "))
        assert "stage 1 " in line and "+ stage 3 " in line


def test_explain_names_sequence_parallelism_and_selective_recomputation_and_what_each_saved(
        capsys, tmp_path):
    out = tmp_path / "plan.json"
    model = "gpt:layers=2,hidden=128,heads=8,vocab=256,seq=64,attention=eager"
    assert main(["plan", model, "--gpu", "cpu", "--gpus-per-node", "2", "--global-batch", "8",
                 "--tp", "2", "--sp", "--recompute", "selective", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["explain", str(out)]) == 0
    text = capsys.readouterr().out
    sp = next(line for line in text.splitlines() if "sequence parallelism on" in line)
    kept = re.search(r"keeps ([\d.]+) (\w+) of activations per microbatch with it, "
                     r"([\d.]+) (\w+) without \(saves ([\d.]+) (\w+)\)", sp)
    assert kept, sp
    selective = next(line for line in text.splitlines()
                     if line.startswith("note: selective recomputation"))
    assert re.search(r"stage 0 drops [\d.]+ [kMG]?B per microbatch", selective), selective
    assert "recompute selective" in text and "| sp" in text
