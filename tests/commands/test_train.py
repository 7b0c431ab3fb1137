"""``tripar train``: a real run on 2 local processes, a failing rank (Ctrl-C: test_faults)."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from tripar.cli import main
from tripar.errors import ConfigError
from tripar.runtime.launch import LaunchError, launch_local


@pytest.mark.parametrize("pins, shown", [
    # pp=2 on 2 processes: tests/test_readme.py (a transformers Llama, its own data)
    (["--tp", "2", "--precision", "bf16"], "tp=2"),  # tensor parallel, bf16 autocast
], ids=["tp2-bf16"])
def test_train_two_processes_loss_falls(capsys, pins, shown):
    code = main(["train", "gpt:layers=1,hidden=32,heads=4,seq=16", "--nproc", "2",
                 "--steps", "25", "--global-batch", "8", "--lr", "1e-2", *pins,
                 "--format", "json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    losses = out["losses"]
    assert len(losses) == 25 and shown in out["plan"]
    assert losses[-1] < losses[0] - 0.8, losses  # from ~ln(31) = 3.4 towards the corpus's ~2


def test_bad_options_fail_before_starting_processes(capsys):
    assert main(["train", "gpt:layers=0", "--nproc", "2"]) == 2
    assert "layers" in capsys.readouterr().err
    assert main(["train", "gpt", "--steps", "0"]) == 2
    with pytest.raises(ConfigError, match="nproc"):
        launch_local(print, 0)


def _fail_on_rank_one() -> None:
    """Two-stage pipeline whose second stage raises in its second step."""
    import torch.distributed as dist

    from tripar import api
    from tripar.models import load_model

    loaded = load_model("gpt:layers=2,hidden=16,heads=2,vocab=32,seq=8", batch_size=4)
    calls = []

    def loss_fn(out, batch):
        calls.append(1)
        if dist.get_rank() == 1 and len(calls) > 2:
            raise ValueError("boom in the loss")
        return out

    pm = api.auto_parallel(loaded.model, example_inputs=loaded.example_inputs, loss_fn=loss_fn,
                           pp=2, num_microbatches=2, schedule="1f1b", timeout_s=20)
    for _ in range(3):
        pm.train_step(loaded.example_inputs)


def test_a_failing_rank_stops_the_job_naming_it():
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as err:
        launch_local(_fail_on_rank_one, 2, timeout_s=20, grace_s=15)
    message = str(err.value)
    assert time.monotonic() - t0 < 40
    assert message.startswith("rank 1 of 2 failed: ValueError: boom in the loss")
    # rank 0 stopped with an error naming rank 1, its stage and action
    assert "then rank 0: RankFailedError: rank 1 (pp 1, dp 0, tp 0) failed at action" in message
    assert "(stage 1, microbatch 0) of schedule '1f1b'" in message


def _checkpoint_tensors(directory) -> dict:
    """Every piece of a checkpoint (parameters and optimizer state) by (fqn, key, box, range)."""
    import torch

    out = {}
    for shard in sorted(directory.glob("shard-*.pt")):
        for fqn, key, box, flat, tensor in torch.load(shard, weights_only=True):
            out[(fqn, key, str(box), str(flat))] = tensor
    return out


def test_resuming_from_a_checkpoint_continues_the_data_and_equals_training_straight(
        tmp_path, capsys):
    """N steps, save, load, N more: bit-exactly the parameters (and AdamW state) of 2N
    steps straight, on text data read as bytes, dp=2, warmup + cosine; the first run also
    writes metrics and the held-out loss."""
    from tripar.data import corpus

    (tmp_path / "train.txt").write_text(corpus(200, seed=1))
    (tmp_path / "held.txt").write_text(corpus(40, seed=2))
    common = ["train", "gpt:layers=1,hidden=16,heads=2,seq=16", "--nproc", "2",
              "--global-batch", "4", "--dp", "2", "--data", str(tmp_path / "train.txt"),
              "--lr-schedule", "cosine", "--warmup", "2", "--decay-steps", "6",
              "--format", "json"]
    metrics = tmp_path / "run.jsonl"
    assert main([*common, "--steps", "3", "--save", str(tmp_path / "half"),
                 "--metrics", str(metrics), "--log-every", "1",
                 "--eval-data", str(tmp_path / "held.txt"), "--eval-every", "2"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main([*common, "--steps", "3", "--load", str(tmp_path / "half"),
                 "--save", str(tmp_path / "resumed")]) == 0
    second = json.loads(capsys.readouterr().out)
    assert main([*common, "--steps", "6", "--save", str(tmp_path / "straight")]) == 0
    straight = json.loads(capsys.readouterr().out)

    assert first["data_position"] == 3 and second["data_position"] == 6
    assert first["losses"] + second["losses"] == straight["losses"]
    resumed = _checkpoint_tensors(tmp_path / "resumed")
    expected = _checkpoint_tensors(tmp_path / "straight")
    assert resumed.keys() == expected.keys()
    assert any(key == "param" for _, key, _, _ in resumed)
    for name, tensor in expected.items():
        assert resumed[name].dtype == torch.float32 or name[1] != "param"
        assert torch.equal(resumed[name], tensor), name
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert manifest["extra"]["data"]["position"] == 6

    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "model_tflops_per_device", "mfu",
                    "step_time_s", "time_s"):
            assert isinstance(m[key], float) and m[key] > 0, (key, m)
        assert len(m["peak_memory_bytes"]) == 2 and min(m["peak_memory_bytes"]) > 0
    assert [m["lr"] for m in lines][:2] == [1.5e-3, 3e-3]  # warmup over 2 steps of lr 3e-3
    assert [m["eval_loss"] is not None for m in lines] == [False, True, True]
    assert [s for s, _ in first["eval"]] == [2, 3]
    if importlib.util.find_spec("matplotlib"):
        assert main(["report", str(metrics), "--out", str(tmp_path / "run.png")]) == 0
        assert "steps 1..3 (3 logged)" in capsys.readouterr().out
        assert (tmp_path / "run.png").stat().st_size > 0


def test_data_the_model_cannot_read_fails_before_starting(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("héllo " * 100)
    assert main(["train", "bert", "--data", str(tmp_path / "a.txt")]) == 2
    assert "causal language model" in capsys.readouterr().err
    assert main(["train", "gpt:layers=1,hidden=16,heads=2,vocab=32,seq=16",
                 "--data", str(tmp_path / "a.txt")]) == 2
    assert "vocabulary (32) is smaller than the data's (256" in capsys.readouterr().err
    assert main(["train", "gpt", "--tokenizer", str(tmp_path)]) == 2
    assert "give --data" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("x" * 50)
    assert main(["train", "gpt:layers=1,hidden=16,heads=2,seq=16", "--global-batch", "8",
                 "--data", str(tmp_path / "a.txt"), "--eval-data",
                 str(tmp_path / "short.txt")]) == 2
    assert "--eval-data" in (err := capsys.readouterr().err) and "fewer than one batch" in err


def test_a_checkpoint_resumes_its_data_position_only_for_the_same_data(tmp_path):
    import numpy as np

    from tripar.commands.train import _data_position
    from tripar.data import TokenBatches

    windows = TokenBatches(np.arange(400) % 50, batch_size=2, seq_len=8)
    manifest = {"format": "tripar-checkpoint", "version": 1,
                "model": {"spec": "gpt", "fingerprint": "f"}, "steps": 7, "files": {},
                "shapes": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    opts = {"load": str(tmp_path)}
    assert _data_position(opts, windows, 7) == (7, "")  # a checkpoint from before positions
    manifest["extra"] = {"data": {"position": 5, "identity": windows.identity()}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert _data_position(opts, windows, 7) == (5, "")
    other = TokenBatches(np.arange(400) % 49, batch_size=2, seq_len=8)
    position, note = _data_position(opts, other, 7)
    assert position == 0 and "for other data" in note
    assert _data_position({"load": None}, windows, 0) == (0, "")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_init_from_a_transformers_checkpoint_starts_from_its_weights(tmp_path, capsys):
    """``--init-from DIR`` without MODEL: the model its config.json names, built on meta,
    each pipeline rank reading its stage's weights; the first loss is from_pretrained's on
    the same batch."""
    import transformers

    from tripar.data import TokenBatches, corpus, load_tokenizer, read_tokens

    checkpoint = tmp_path / "llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64,
                                      vocab_size=256, max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(checkpoint, max_shard_size="40KB")
    (tmp_path / "train.txt").write_text(corpus(50, seed=1))
    assert main(["train", "--init-from", str(tmp_path / "absent")]) == 2
    assert "--init-from " in capsys.readouterr().err
    assert main(["train", "--init-from", str(checkpoint), "--nproc", "2", "--pp", "2",
                 "--steps", "1", "--global-batch", "4", "--seq", "16",
                 "--data", str(tmp_path / "train.txt"), "--format", "json"]) == 0
    loss = json.loads(capsys.readouterr().out)["losses"][0]

    tokens = read_tokens(str(tmp_path / "train.txt"), load_tokenizer(None)).tokens
    ids, _ = TokenBatches(tokens, 4, 16, seed=0).batch(0)
    reference = transformers.LlamaForCausalLM.from_pretrained(checkpoint)
    assert abs(loss - reference(input_ids=ids, labels=ids).loss.item()) < 1e-5
