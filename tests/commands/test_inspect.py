"""`tripar inspect`: tables and JSON of a model's proxy graph, through the CLI."""

from __future__ import annotations

import json

from tripar.cli import main

SPEC = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=16"


def test_inspect_json(capsys) -> None:
    assert main(["inspect", SPEC, "--batch", "2", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tracer"] == "fx" and data["batch_size"] == 2 and data["seq_len"] == 16
    blocks = data["blocks"]
    assert [b["name"] for b in blocks] == ["wte+wpe+drop", "blocks.0", "blocks.1", "ln_f",
                                          "lm_head", "loss"]
    assert data["params"] == sum(b["params"] for b in blocks) == 109312
    assert data["flops"]["forward"] == sum(b["forward_flops"] for b in blocks) > 0
    assert data["flops"]["backward"] == sum(b["backward_flops"] for b in blocks)
    assert blocks[1]["signature"] == blocks[2]["signature"] != blocks[0]["signature"]
    assert all(b["saved_bytes"] >= 0 for b in blocks)
    cut = next(c for c in data["cuts"] if c["after"] == "blocks.0")
    assert cut["bytes"] == 2 * 16 * 64 * 4 and cut["tensors"][0]["shape"] == [2, 16, 64]
    kinds = {(r["kind"], r["block"]) for r in data["tp_regions"]}
    assert {("attention", "blocks.0"), ("mlp", "blocks.1"), ("embedding", "wte+wpe+drop")} <= kinds
    assert all(r["nodes"] for r in data["tp_regions"])
    assert data["tied_weights"] == [["wte.weight", "lm_head.weight"]]


def test_inspect_text(capsys) -> None:
    assert main(["inspect", SPEC, "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "tracer: fx" in out
    for word in ("blocks.1", "lm_head", "cut candidates", "tensor-parallel regions",
                 "attention", "tied weights: wte.weight = lm_head.weight", "[1, 8, 64]"):
        assert word in out, word


def test_inspect_rejects_bad_sizes(capsys) -> None:
    assert main(["inspect", SPEC, "--batch", "0"]) == 2
    assert "--batch must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["inspect", "nosuchmodel"]) == 2
    assert "nosuchmodel" in capsys.readouterr().err
