"""``tripar bench``: the pieces of ``--quick``, checked for structure (not for speed)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from tripar.commands import bench
from tripar.errors import ConfigError
from tripar.partitioner.hardware import Cluster

FOLDER = bench.benchmarks_dir()
report = bench.load_report(FOLDER)
measured = report.measured_bench
scale = report.scale_bench
ddp = report.ddp_bench


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    return parser


def test_parser_reads_quick_and_out() -> None:
    args = _parser().parse_args(["bench", "--quick", "--out", "somewhere"])
    assert args.quick and args.out == "somewhere" and args.func is bench.run
    assert _parser().parse_args(["bench"]).quick is False


def test_missing_suite_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="report.py is missing"):
        bench.benchmarks_dir(str(tmp_path))


@pytest.fixture(scope="module")
def tiny_measurement(tmp_path_factory: pytest.TempPathFactory):
    """Every measured system on a 2-layer GPT, one round: real processes, tiny sizes."""
    profile = tmp_path_factory.mktemp("bench") / "cpu.json"
    Cluster.builtin("cpu", nodes=1, gpus_per_node=2).to_file(str(profile))
    cfg = measured.MeasureConfig(layers=2, hidden=32, heads=2, seq=16, micro_batch_size=1,
                                 num_microbatches=2, rounds=2, warmup=0, profile=str(profile))
    return measured.measure(cfg, timeout_s=120)


def test_measure_runs_every_system_on_the_same_model(tiny_measurement) -> None:
    result = tiny_measurement
    assert [s.name for s in result.systems] == list(result.config.systems)
    for s in result.systems:
        assert len(s.step_s) == 2 and all(t > 0 for t in s.step_s)
        assert len(s.cpu_s) == 2 and s.tokens == 2 * 16
    first = {s.name: s.losses[0] for s in result.systems}
    # same initial weights, same batch, same microbatches: the same first loss everywhere
    assert max(first.values()) - min(first.values()) < 1e-4, first
    # tripar and torch run the same stage modules, so they stay equal step after step
    for a, b in (("tripar 1f1b", "torch 1f1b"), ("tripar gpipe", "torch gpipe")):
        assert result.get(a).losses == pytest.approx(result.get(b).losses, abs=1e-4)
        assert result.get(a).plan == result.get(b).plan
    assert all(result.get(n).predicted_s > 0 for n in measured.TRIPAR_SYSTEMS)
    # the tensor-parallel pair: the same microbatches of two samples, whole or in two parts
    assert "tp=2 tp_overlap=1 " in result.get("tripar tp=2").plan
    assert "tp=2 tp_overlap=2 " in result.get("tripar tp=2 tp-overlap=2").plan
    assert result.get("tripar tp=2").losses == pytest.approx(
        result.get("tripar tp=2 tp-overlap=2").losses, abs=1e-4)
    assert result.ideal_tokens_per_s == pytest.approx(
        2 * result.get("single").tokens_per_s * 2 / 3)
    again = measured.Measurement.from_dict(result.to_dict())
    assert again.get("torch 1f1b").step_s == result.get("torch 1f1b").step_s


def test_report_puts_a_command_above_every_figure(tiny_measurement, tmp_path: Path) -> None:
    check = measured.BlockCheck(2.0, 4.0, 3.5, 0.5, 2.0, 1.0, 2.0, 2.5, 0.1)
    row = scale.RowResult(1, 1.7, 32, 512, (
        scale.Costed("tripar", "d32 t1 p1", 2.0, 30.0),
        scale.Costed("megatron", "d32 t1 p1", 3.0, 31.0),
        scale.Costed("dp+zero1", "d32", None, 90.0, "over memory"),
        scale.Costed("uniform split", "d32 t1 p1", 2.0, 30.0),
        scale.Costed("merak defaults", "d32 t1 p1", 2.5, 29.0)), 1.0, 0.1)
    schedules = [scale.ScheduleResult("1f1b", "d32 t1 p2", 2.0, 0.05, 30.0),
                 scale.ScheduleResult("gpipe", "", None, None, None, "does not fit")]
    path = report.write_report(
        tmp_path, quick=True, measurement=tiny_measurement, check=check,
        rows_md=scale.markdown_rows([row]), sched_md=scale.markdown_schedules(
            1, scale.megatron_table()[0], schedules),
        scaling_md="| layers | search s |\n|---:|---:|\n| 12 | 0.1 |\n",
        scaling_cmd="python benchmarks/plan_scaling.py --quick", wall_s=1.0,
        ddp=(ddp.QUICK, _ddp_run()))
    text = path.read_text()
    lines = text.splitlines()
    figures = [i for i, line in enumerate(lines) if line.startswith("![")]
    assert [re.search(r"\((.+?)\)", lines[i]).group(1) for i in figures] == [
        "measured.png", "at_scale.png", "schedules.png", "plan_scaling.png"]
    for i in figures:
        command = next(line for line in reversed(lines[:i]) if line.strip())
        assert re.fullmatch(r"Regenerate: `(python|tripar) [^`]+`", command), command
    assert "| tripar / torch.distributed.pipelining, 1F1B" in text
    assert "| tripar tp=2 in 2 parts / whole microbatches" in text
    assert "load average" in text.lower()
    assert "| 1 | 1.7 | 32 | 512 | 2.00 | 3.00 | over memory |" in text
    assert "| gpipe | - | - | - |  | does not fit |" in text
    # the data-parallel headline: measured 990 / 1000, simulated 0.60 / 0.50 s; target 0.98
    row = next(line for line in lines if line.startswith("| tripar default plan / torch Dis"))
    assert "| this machine | 0.990; 0.833 | >= 0.98 | **yes** |" in row, row
    section = lines.index("## 2. Measured: data parallelism against torch DistributedDataParallel")
    assert lines.index("## 3. Simulated at scale: plans against Megatron-LM and naive "
                       "baselines") > section
    table = [line for line in lines[section:] if line.startswith("| tripar zero=1 |")]
    assert table == ["| tripar zero=1 | ZeRO-1 | 950 | 0.950 | 0.950..0.950 | 0.800 | 1.000 |"]
    assert "| torch DDP | 1 microbatches | 1,000 | 1.000 | 1.000..1.000 | 1.000 | - |" in text


def _ddp_run():
    """A data-parallel measurement made up for the report's structure (no processes)."""
    tps = {"tripar default": 990.0, "tripar zero=0": 990.0, "tripar zero=1": 950.0,
           "tripar zero=2": 940.0, ddp.DDP: 1000.0}
    plans = {name: f"ZeRO-{zero}" for name, zero in ddp.TRIPAR_SYSTEMS.items()}
    plans["tripar default"], plans[ddp.DDP] = "ZeRO-1", "1 microbatches"
    simulated = {"tripar default": 0.6, "tripar zero=0": 0.5, "tripar zero=1": 0.5,
                 "tripar zero=2": 0.5}
    cpu = {"tripar default": 0.4, "tripar zero=0": 0.4, "tripar zero=1": 0.5,
           "tripar zero=2": 0.5, ddp.DDP: 0.4}
    return ddp.Run(tps, plans, (1.0, 1.0), "2.x", simulated, cpu)


def test_plots_are_written(tiny_measurement, tmp_path: Path) -> None:
    measured.plot(tiny_measurement, tmp_path / "m.png")
    schedules = [scale.ScheduleResult("1f1b", "x", 2.0, 0.05, 30.0),
                 scale.ScheduleResult("zb-h1", "x", 1.8, 0.02, 30.0)]
    scale.plot_schedules(schedules, "t", tmp_path / "s.png")
    for name in ("m.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
