"""``tripar codegen PLAN --out DIR``: every rank's readable stage source and the map from
local parameters to the original ones; plans that do not fit the model are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tripar.cli import main

# large enough that the planner shards the tied embedding and LM head together; built
# on the meta device, so no weight is allocated
MODEL = "gpt:layers=2,hidden=512,heads=8,vocab=32000,seq=128"


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    code = main(["plan", MODEL, "--gpu", "a100-80g", "--nodes", "1", "--gpus-per-node", "4",
                 "--global-batch", "8", "--tp", "2", "--pp", "2", "--schedule", "1f1b",
                 "--out", str(path)])
    assert code == 0 and path.exists()
    return path


def test_codegen_writes_every_ranks_source_and_param_map(plan_file: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["codegen", str(plan_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    sp = json.loads(plan_file.read_text())["parallel"]["sp"]
    assert "pp=2 tp=2" in printed and "wrote 9 files for 4 ranks" in printed
    sources = []
    for pp_rank in range(2):
        for tp_rank in range(2):
            folder = out / f"rank_pp{pp_rank}_tp{tp_rank}"
            assert sorted(p.name for p in folder.iterdir()) == ["param_map.json",
                                                                f"stage_{pp_rank}.py"]
            source = (folder / f"stage_{pp_rank}.py").read_text()
            scope: dict = {}  # the file imports what its code reads
            exec(compile(source, str(folder / f"stage_{pp_rank}.py"), "exec"), scope)
            assert callable(scope["forward"])
            if pp_rank == 0:
                assert ("from tripar.codegen.collectives import vocab_parallel_embedding as "
                        "tripar_codegen_collectives_vocab_parallel_embedding\n") in source
            assert source.startswith(f"# tensor-parallel rank {tp_rank} of 2: 6 regions")
            assert f"(pipeline rank {pp_rank}, virtual stage 0)" in source
            assert "def forward(self" in source
            sources.append(source)
            rank_map = json.loads((folder / "param_map.json").read_text())
            assert (rank_map["pp_rank"], rank_map["tp_rank"]) == (pp_rank, tp_rank)
    # a region's exit all-reduces, or reduce-scatters under sequence parallelism (in the
    # stages that hold a layer: the plan may give a stage the LM head and loss alone)
    exit_call = "self.sp_reduce_scatter(" if sp else "self.tp_reduce("
    assert all(exit_call in src for src in sources if "_mlp_" in src or "_attn_" in src)
    assert any(exit_call in src for src in sources)

    index = json.loads((out / "param_map.json").read_text())
    assert (index["pp"], index["tp"], len(index["ranks"])) == (2, 2, 4)
    from tripar.models import load_model

    model = load_model(MODEL, device="meta").model
    params = dict(model.named_parameters(remove_duplicate=False))
    held: dict[int, dict[str, dict | None]] = {0: {}, 1: {}}
    for rank in index["ranks"]:
        for stage in rank["stages"]:
            for entry in stage["params"].values():
                fqn = entry["fqn"]
                assert fqn not in held[rank["tp_rank"]], f"{fqn} named twice on one tp rank"
                held[rank["tp_rank"]][fqn] = entry["slice"]
                cut = entry["slice"]
                whole = list(params[fqn].shape)
                if cut is None:
                    assert entry["shape"] == whole
                else:
                    assert whole[cut["dim"]] == 2 * entry["shape"][cut["dim"]]
    assert set(held[0]) == set(held[1]) == set(params)
    sliced = 0
    for fqn, tensor in params.items():
        cuts = [held[r][fqn] for r in range(2)]
        if cuts[0] is None:
            assert cuts[1] is None
            continue
        sliced += 1
        covered = sorted(i for c in cuts for a, b in c["ranges"] for i in range(a, b))
        assert covered == list(range(tensor.shape[cuts[0]["dim"]])), fqn
    assert sliced == 2 + 2 * 6  # the tied embedding/head and six weights per layer


def test_a_corrupt_plan_is_one_clear_error(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "model": ')
    assert main(["codegen", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "corrupt or truncated" in err
    assert not (tmp_path / "out").exists()


def test_a_plan_for_another_model_is_refused(plan_file: Path, tmp_path: Path, capsys) -> None:
    other = MODEL.replace("hidden=512", "hidden=256")
    assert main(["codegen", str(plan_file), other, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "fingerprint" in err and "re-plan" in err
    data = json.loads(plan_file.read_text())
    data["model"]["spec"] = "nosuchmodel:layers=2"
    lost = tmp_path / "lost.json"
    lost.write_text(json.dumps(data))
    assert main(["codegen", str(lost), "--out", str(tmp_path / "out")]) == 2
    assert "pass the model as MODEL" in capsys.readouterr().err


def test_the_fingerprint_is_measured_at_batch_and_the_stages_cut_per_microbatch(
        tmp_path: Path, capsys) -> None:
    """A plan measured at --batch 2 with microbatches of 1: codegen checks the model at
    --batch 2 (and refuses --batch 1, whose fingerprint differs) and writes stages whose
    shapes are one microbatch's."""
    small, plan = "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8", tmp_path / "plan.json"
    assert main(["plan", small, "--batch", "2", "--gpu", "cpu", "--gpus-per-node", "2",
                 "--global-batch", "4", "--pp", "2", "--micro-batch", "1", "--out",
                 str(plan)]) == 0
    out = tmp_path / "out"
    assert main(["codegen", str(plan), "--out", str(out), "--batch", "2"]) == 0
    first = (out / "rank_pp0_tp0" / "stage_0.py").read_text()
    assert "#   input_ids  int64[1, 8]  graph input 0" in first
    capsys.readouterr()
    assert main(["codegen", str(plan), "--out", str(tmp_path / "other")]) == 2
    assert "measured at --batch 1 has fingerprint" in capsys.readouterr().err
