"""``tripar train``: a real run on 2 local processes, a failing rank (Ctrl-C: test_faults)."""

from __future__ import annotations

import json
import time

import pytest

from tripar.cli import main
from tripar.errors import ConfigError
from tripar.runtime.launch import LaunchError, launch_local


@pytest.mark.parametrize("pins, shown", [
    (["--pp", "2"], "pp=2"),
    (["--tp", "2", "--precision", "bf16"], "tp=2"),  # tensor parallel, bf16 autocast
], ids=["pp2", "tp2-bf16"])
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
