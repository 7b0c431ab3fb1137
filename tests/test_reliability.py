"""Bad input at the command line: one clear message with the numbers and the fix, exit 2,
no traceback (unless --debug), and the very message the Python API raises."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from tripar.cli import main
from tripar.errors import CaptureError, ConfigError, InfeasibleError, PlanError, TriparError
from tripar.partitioner import Pins, Spelling, check_pins
from tripar.partitioner.hardware import BUILTIN_DEVICES, Cluster
from tripar.plan.plan import Plan

M = "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8"


def fails(capsys, argv: list[str], *words: str, same_as: BaseException | None = None) -> str:
    """Run the CLI, expect exit 2 and one error message holding ``words``; return it."""
    code = main(argv)
    out, err = capsys.readouterr()
    command = argv[0]
    assert code == 2, (code, out, err)
    assert err.startswith(f"tripar {command}: error: "), err
    assert "Traceback" not in err and "File \"" not in err, err
    for word in words:
        assert word in err, (word, err)
    if same_as is not None:
        assert err == f"tripar {command}: error: {same_as}\n", (err, str(same_as))
    return err


def raised(fn, *args, **kwargs) -> TriparError:
    """The TriparError ``fn`` raises (the Python API side of a case)."""
    with pytest.raises(TriparError) as info:
        fn(*args, **kwargs)
    return info.value


# ---- hardware -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["simulate", "plan"])
def test_unknown_gpu_lists_the_known_ones(capsys, command):
    api_error = raised(Cluster.builtin, "b200", nodes=1, gpus_per_node=8)
    assert isinstance(api_error, ConfigError)
    err = fails(capsys, [command, M, "--gpu", "b200", "--global-batch", "8"],
                "unknown GPU 'b200'", "tripar calibrate", *BUILTIN_DEVICES, same_as=api_error)
    assert err.count("\n") == 1


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ConfigError, match="unknown GPU"):
        main(["--debug", "simulate", M, "--gpu", "b200", "--global-batch", "8"])


def _profile(**change) -> dict:
    data = Cluster.builtin("cpu", gpus_per_node=2).to_dict()
    for key, value in change.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return data


@pytest.mark.parametrize("text, words", [
    ('{"format": "tripar-cluster", "nodes": 1,', ["is not valid JSON", "line 1 column"]),
    (json.dumps(_profile(inter_bandwidth=None)), ["lacks field 'inter_bandwidth'"]),
    (json.dumps(_profile(nodes="two")), ["field 'nodes' must be an integer, got 'two'"]),
    (json.dumps(_profile(nodes=1.5)), ["field 'nodes' must be an integer, got 1.5"]),
    (json.dumps(_profile(intra_bandwidth=-2.4e9)),
     ["intra_bandwidth must be a finite number of bytes/s > 0, got -2400000000.0"]),
    (json.dumps(_profile(device="b200")), ["unknown GPU 'b200'", "a100-80g"]),
    (json.dumps(_profile(version=7)), ["version 7 is not supported", "reads version 1"]),
    ("\xff\xfe", ["is not valid JSON"]),
], ids=["bad-json", "missing-field", "wrong-type", "fraction", "negative-bandwidth",
        "unknown-device", "version", "binary"])
def test_malformed_cluster_file(capsys, tmp_path, text, words):
    path = tmp_path / "cluster.json"
    path.write_text(text)
    api_error = raised(Cluster.from_file, path)
    assert isinstance(api_error, ConfigError)
    fails(capsys, ["simulate", M, "--cluster", str(path), "--global-batch", "4"],
          str(path), *words, same_as=api_error)


# ---- pins -----------------------------------------------------------------------------------

def spoken(pins: Pins, devices: int, batch: int, **model) -> tuple[TriparError, TriparError]:
    """The one pin check's error for the API (keywords) and for the CLI (flags)."""
    return tuple(raised(check_pins, pins, devices, batch, spelling=spelling, **model)
                 for spelling in (Spelling.API, Spelling.CLI))


def test_devices_not_the_product_of_the_pinned_degrees(capsys):
    fails(capsys, ["simulate", M, "--gpus-per-node", "8", "--global-batch", "8", "--dp", "3"],
          "--dp 3 does not divide the 8 devices", "pin --dp to one of 1, 2, 4, 8")
    fails(capsys, ["plan", M, "--gpus-per-node", "8", "--global-batch", "8", "--dp", "3"],
          "--dp 3 does not divide the 8 devices", "pin --dp to one of 1, 2, 4, 8")
    api_error, cli_error = spoken(Pins(dp=3), 2, 16)
    assert str(api_error).startswith("dp=3 does not divide the 2 devices") and "--" not in str(
        api_error)
    fails(capsys, ["train", M, "--nproc", "2", "--dp", "3"], "--dp 3", "2 devices",
          "1, 2", same_as=cli_error)
    api_error, cli_error = spoken(Pins(dp=2, tp=1, pp=1), 4, 16)
    assert str(api_error) == str(cli_error).replace("--dp ", "dp=")
    fails(capsys, ["train", M, "--nproc", "4", "--dp", "2", "--tp", "1", "--pp", "1"],
          "dp*tp*pp = 2*1*1 = 2, but there are 4 devices", same_as=cli_error)


def test_heads_not_divisible_by_the_pinned_tp(capsys):
    """The API and every command refuse a tp that does not divide the heads, with one
    rule: before capture from the model's sizes, after it from the proven regions."""
    fails(capsys, ["simulate", M, "--gpus-per-node", "3", "--global-batch", "3", "--tp", "3"],
          "--tp 3 does not divide the model's attention heads (4)", "--tp 2", "--tp 1")
    fails(capsys, ["plan", M, "--gpus-per-node", "3", "--global-batch", "3", "--tp", "3"],
          "--tp 3 does not divide the model's attention heads (4)", "--tp 2", "--tp 1")
    api_error, cli_error = spoken(Pins(tp=3), 3, 6, heads=4, hidden=32)
    assert str(api_error).startswith("tp=3 does not divide the model's attention heads (4)")
    fails(capsys, ["train", M, "--nproc", "3", "--tp", "3", "--global-batch", "6"],
          "--tp 3 does not divide the model's attention heads (4)", same_as=cli_error)
    hidden = raised(check_pins, Pins(tp=4), 4, 8, hidden=30)
    assert "hidden size (30)" in str(hidden) and "divisor of 30" in str(hidden)


def test_global_batch_not_divisible_by_dp_times_microbatches(capsys):
    fails(capsys, ["simulate", M, "--gpus-per-node", "2", "--global-batch", "7", "--dp", "2"],
          "--global-batch 7 is not divisible by --dp 2", "use --global-batch 6 or 8")
    fails(capsys, ["plan", M, "--gpus-per-node", "2", "--global-batch", "7", "--dp", "2"],
          "--global-batch 7 is not divisible by --dp 2", "use --global-batch 6 or 8")
    fails(capsys, ["simulate", M, "--gpus-per-node", "2", "--global-batch", "6", "--dp", "2",
                   "--micro-batch", "2"],
          "--global-batch 6 is not divisible by --dp x --micro-batch = 2 x 2 = 4",
          "use --global-batch 4 or 8")
    api_error, cli_error = spoken(Pins(dp=2, num_microbatches=2), 2, 6)
    assert str(api_error).startswith("global_batch_size=6 is not divisible by dp x "
                                     "num_microbatches = 2 x 2 = 4")
    fails(capsys, ["train", M, "--nproc", "2", "--global-batch", "6", "--dp", "2",
                   "--microbatches", "2"],
          "--global-batch 6 is not divisible by --dp x --microbatches = 2 x 2 = 4",
          same_as=cli_error)


# ---- memory ---------------------------------------------------------------------------------

def _tiny_memory_cluster(tmp_path: Path, memory_bytes: int) -> Path:
    data = _profile()
    data["device"] = {**Cluster.builtin("cpu").device.to_dict(), "memory_bytes": memory_bytes,
                      "name": "tiny"}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(data))
    return path


def test_a_model_that_does_not_fit_names_the_shortfall(capsys, tmp_path):
    from tripar.commands._model_args import proxy_graph_for
    from tripar.partitioner import search

    limit = 200_000
    path = _tiny_memory_cluster(tmp_path, limit)
    api_error = raised(search, proxy_graph_for(M), Cluster.from_file(path), 4)
    assert isinstance(api_error, InfeasibleError)
    err = fails(capsys, ["plan", M, "--cluster", str(path), "--global-batch", "4"],
                "no configuration of 2 devices fits", f"the {limit} bytes", same_as=api_error)
    need, more = (int(x) for x in re.search(r"needs at least (\d+) bytes.*?, (\d+) bytes more "
                                            r"than", err).groups())
    assert need - more == limit

    code = main(["simulate", M, "--cluster", str(path), "--global-batch", "4", "--pp", "2",
                 "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 2 and json.loads(out)["estimate"]["fits"] is False  # the report, then
    need, more, have = (int(x) for x in re.search(  # the error with the shortfall
        r"needs (\d+) bytes .*?, (\d+) bytes more than the (\d+) bytes", err).groups())
    assert have == limit and need - have == more > 0
    assert "does not fit: pipeline rank" in err and "--recompute full" in err


# ---- models ---------------------------------------------------------------------------------

UNTRACEABLE = '''
    import torch
    from torch import nn


    class Gate(nn.Module):
        """Branches on the values of its input: neither tracer can follow that."""

        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:
                h = h * 2
            return h.square().mean()


    def build(batch_size=1):
        return Gate(), (torch.randn(batch_size, 8),)
'''


def test_a_model_neither_tracer_captures(capsys, tmp_path):
    from tripar.graph.capture import capture
    from tripar.models.spec import load_model

    path = tmp_path / "gate.py"
    path.write_text(textwrap.dedent(UNTRACEABLE))
    spec = f"{path}:build"
    loaded = load_model(spec, device="meta")
    api_error = raised(capture, loaded.model, loaded.example_inputs)
    assert isinstance(api_error, CaptureError)
    err = fails(capsys, ["inspect", spec], "could not capture Gate with fx and export",
                "fx: failed in the top-level module at gate.py:15 (`if h.sum() > 0:`)",
                "TraceError", "export: failed", "GuardOnDataDependentSymNode", "fix: ",
                same_as=api_error)
    assert "def forward" not in err  # torch.export's partial graph stays out of the message
    assert "def forward" in api_error.details  # and is kept for --debug


# ---- plan and checkpoint files --------------------------------------------------------------

@pytest.fixture(scope="module")
def plan_text(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["plan", M, "--gpu", "cpu", "--gpus-per-node", "2", "--global-batch", "4",
                 "--pp", "2", "--out", str(path), "--format", "json"]) == 0
    return path.read_text()


@pytest.mark.parametrize("damage, words", [
    ("truncated", ["corrupt or truncated at line", "re-create it with `tripar plan`"]),
    ("schema", ["plan schema version 99", "reads version 1"]),
    ("not-a-plan", ["a plan is a JSON object, got list"]),
    ("stage-blocks", ["invalid plan", "no stage holds blocks"]),
    ("missing", ["cannot read plan file"]),
])
def test_a_corrupt_plan_file(capsys, tmp_path, plan_text, damage, words):
    path = tmp_path / "plan.json"
    data = json.loads(plan_text)
    if damage == "truncated":
        path.write_text(plan_text[: len(plan_text) * 2 // 3])
    elif damage == "schema":
        path.write_text(json.dumps({**data, "schema_version": 99}))
    elif damage == "not-a-plan":
        path.write_text("[1, 2]")
    elif damage == "stage-blocks":
        data["stages"][1]["blocks"] = data["stages"][1]["blocks"][:-1]
        path.write_text(json.dumps(data))
    api_error = raised(lambda: Plan.load(path, validate=True))
    assert isinstance(api_error, PlanError)
    fails(capsys, ["show", str(path)], str(path), *words, same_as=api_error)


def test_a_plan_for_another_model(capsys, tmp_path, plan_text):
    path = tmp_path / "plan.json"
    path.write_text(plan_text)
    other = M.replace("layers=2", "layers=3")
    fails(capsys, ["codegen", str(path), other, "--out", str(tmp_path / "out")],
          "was made for model 'gpt:layers=2", "fingerprint", "re-plan")


@pytest.mark.parametrize("damage, words", [
    ("none", ["manifest.json is missing"]),
    ("corrupt", ["is corrupt (JSONDecodeError"]),
    ("version", ["checkpoint version 2", "reads version 1"]),
    ("fields", ["is corrupt: 'model' must hold"]),
])
def test_a_bad_checkpoint_to_load_fails_before_any_process_starts(capsys, tmp_path, damage,
                                                                   words):
    from tripar.runtime.checkpoint import read_manifest

    directory = tmp_path / "ckpt"
    directory.mkdir()
    manifest = {"format": "tripar-checkpoint", "version": 1, "model": {"spec": M}}
    if damage == "corrupt":
        (directory / "manifest.json").write_text('{"format": "tripar-checkpoint", "vers')
    elif damage == "version":
        (directory / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    elif damage == "fields":
        (directory / "manifest.json").write_text(json.dumps(manifest))
    api_error = raised(read_manifest, directory)
    fails(capsys, ["train", M, "--nproc", "2", "--load", str(directory)], str(directory),
          *words, same_as=api_error)


def test_a_checkpoint_of_another_model_fails_in_the_ranks_with_the_api_message(capsys,
                                                                              tmp_path):
    """The mismatch shows only once the ranks have built the model: the launcher raises the
    ranks' CheckpointError itself, so the CLI prints the Python API's message, no traceback."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    other = "gpt:layers=1,hidden=16,heads=2,vocab=32,seq=8"
    (directory / "manifest.json").write_text(json.dumps({
        "format": "tripar-checkpoint", "version": 1, "save_id": "0a1b2c", "steps": 1,
        "model": {"spec": other, "fingerprint": "0123456789abcdef"},
        "shapes": {"wte.weight": [32, 16]},
        "files": {"wte.weight|param": ["shard-0a1b2c-00000.pt"]}}))
    err = fails(capsys, ["train", M, "--nproc", "1", "--steps", "1", "--global-batch", "2",
                         "--load", str(directory), "--format", "json"],
                f"the checkpoint at {directory} is for model {other!r} (fingerprint "
                "0123456789abcdef), this model's fingerprint is",
                "load it into the model it was saved from")
    assert err.count("\n") == 1
