"""The GPU efficiency calibration against published Megatron-LM runs.

Every row of the weak-scaling table (arXiv 2104.04473, Table 1; shared/REFERENCE.md) is
rebuilt as a real proxy graph of the zoo gpt on the meta device, costed with its t, p, d,
batch, microbatch 1, full recomputation and 1F1B on a100-80g nodes of 8, and simulated;
its predicted TFLOP/s per GPU is the 96-factor formula FLOPs / simulated step / GPUs.

- in sample: the shipped curve predicts every row within 10% (the fit's worst row is
  6.7% off);
- out of sample: each row predicted by a fit to the other nine, within 10%
  (``test_leave_one_out``; the largest error is the README's held-out figure);
- the runs of Korthikanti et al. (arXiv 2205.05198) that no fit has seen, within 15% of
  their hardware FLOPs utilization, within 10% of their model FLOPs utilization as
  configured, and tripar's own plans no slower;
- the shipped curve is the fit, refitted here from a neutral start, tightly enough that
  ``matmul_max`` scaled by 0.9 or by 1.1 in ``calibration.json`` fails.
"""

from __future__ import annotations

import functools

import pytest

from tripar.graph import analyze
from tripar.models import load_model
from tripar.partitioner import search
from tripar.partitioner.calibrate_fit import fit_efficiency, leave_one_out
from tripar.partitioner.cost.step import step_estimate
from tripar.partitioner.hardware import Efficiency, builtin_device, load_calibration
from tripar.partitioner.megatron import (
    A100_PEAK_TFLOPS,
    KORTHIKANTI_RUNS,
    MEGATRON_TABLE,
    MEGATRON_WEIGHTS,
    gpt_spec,
    korthikanti_run,
    megatron_flops,
    table_run,
)
from tripar.partitioner.plan_search import Pins, search_parts
from tripar.plan.config import ParallelConfig

NEUTRAL_START = (0.6, 100.0)
"""Where the refits start (matmul_max, matmul_half): not the shipped values, so that
what they find does not depend on the file they check."""
ROW_IDS = [f"{r[0]}B" for r in MEGATRON_TABLE]
# the rows share the graphs built once per process: keep them on one xdist worker
pytestmark = pytest.mark.xdist_group("megatron-graphs")


@functools.cache
def gpt_graph(heads: int, hidden: int, layers: int):
    loaded = load_model(gpt_spec(heads, hidden, layers), batch_size=1, device="meta")
    loaded.model.to(MEGATRON_WEIGHTS)   # half precision, as Megatron-LM holds it
    return analyze(loaded.model, loaded.example_inputs, loaded.example_kwargs,
                   model_config=loaded.config)


@functools.cache
def table_runs():
    return tuple(table_run(row, gpt_graph(*row[1:4])) for row in MEGATRON_TABLE)


def shipped_gpu() -> Efficiency:
    return Efficiency.from_dict(load_calibration()["efficiency"]["gpu"])


@functools.cache
def held_out_predictions() -> tuple[float, ...]:
    """Each row's TFLOP/s per GPU from a fit to the other nine (about 1 s of CPU once the
    graphs and schedules exist: the fit runs on exact piecewise-affine models of the
    step time, see calibrate_fit)."""
    return leave_one_out(table_runs(), shipped_gpu(), start=NEUTRAL_START)


@pytest.mark.parametrize("index", range(len(MEGATRON_TABLE)), ids=ROW_IDS)
def test_megatron_row_within_10_percent(index):
    params_b, heads, hidden, layers, t, p, gpus, batch, published = MEGATRON_TABLE[index]
    run = table_runs()[index]
    graph = run.graph
    assert sum(b.params for b in graph.blocks) == pytest.approx(params_b * 1e9, rel=0.05)
    assert (run.config.dp * t * p, run.config.global_batch_size) == (gpus, batch)
    estimate = step_estimate(graph, run.cluster, run.config, record_timeline=False)
    predicted = megatron_flops(batch, layers, hidden) / estimate.step_time_s / gpus / 1e12
    assert predicted == pytest.approx(published, rel=0.10), (
        f"{params_b}B: predicted {predicted:.1f} TFLOP/s per GPU, published {published}")
    assert estimate.recompute == (1.0,) * p
    assert estimate.fits  # Megatron ran it on 80 GB devices
    # the fit's fast path simulates exactly what step_estimate does
    assert run.step_time() == pytest.approx(estimate.step_time_s, rel=1e-12)


@pytest.mark.parametrize("index", range(len(MEGATRON_TABLE)), ids=ROW_IDS)
def test_leave_one_out(index):
    """The row, predicted by the efficiency fitted to the other nine, within 10%.
    Measured (fit from NEUTRAL_START; other starts move each figure by <= 0.05 points):
    1.7B +4.3%, 3.6B +2.6%, 7.5B -5.0%, 18.4B -7.3%, 39.1B +0.9%, 76.1B +4.2%,
    145.6B +2.4%, 310.1B +1.7%, 529.6B -2.6%, 1008.0B +0.1%: at most 7.3%."""
    run = table_runs()[index]
    predicted = held_out_predictions()[index]
    assert predicted == pytest.approx(run.published, rel=0.10), (
        f"{run.name} held out: predicted {predicted:.1f} TFLOP/s per GPU, published "
        f"{run.published:g} ({100 * (predicted / run.published - 1):+.1f}%)")


def test_held_out_error_is_the_readme_figure():
    errors = [abs(p / r.published - 1) for p, r in zip(held_out_predictions(), table_runs())]
    assert max(errors) < 0.075  # README: "within 7.3% on the rows held out of the fit"


@functools.cache
def korthikanti(index: int):
    row = KORTHIKANTI_RUNS[index]
    return korthikanti_run(row, gpt_graph(*row[1:4]))


@pytest.mark.parametrize("index", range(len(KORTHIKANTI_RUNS)),
                         ids=[r[0] for r in KORTHIKANTI_RUNS])
def test_korthikanti_run_within_15_percent(index):
    """A run no fit has seen: Korthikanti et al., data-parallel size 1, with sequence
    parallelism and selective recomputation. tripar costs it with sequence parallelism and
    without recomputation (``korthikanti_run``), compared with the run's hardware FLOPs
    utilization (the step without its recomputed attention cores, taken at the run's mean
    rate). Measured with the shipped curve: 22B -5.9%, 175B -9.2%, 530B -10.9%, 1T -9.6%
    (against the model FLOPs utilization instead: -0.9%, -6.7%, -9.3%, -8.4%); without
    sequence parallelism (norms and dropouts charged whole) it was -8.5%, -10.9%, -12.1%,
    -10.7%."""
    run = korthikanti(index)
    name, *_, hfu = KORTHIKANTI_RUNS[index]
    params = {"22B": 22e9, "175B": 175e9, "530B": 530e9, "1T": 1e12}[name]
    assert sum(b.params for b in run.graph.blocks) == pytest.approx(params, rel=0.05)
    predicted = run.predict()  # the shipped curve, on the run's own cluster
    assert predicted == pytest.approx(run.published, rel=0.15), (
        f"{name}: predicted model FLOPs rate {predicted:.1f} TFLOP/s per GPU, published "
        f"HFU {hfu}% = {run.published:.1f} ({100 * (predicted / run.published - 1):+.1f}%)")


def test_shipped_efficiency_is_the_fitted_curve():
    """Refit on the ten rows from NEUTRAL_START: the shipped numbers are what the fit
    finds (refit: matmul_max 0.83464, matmul_half 299.58; shipped 0.8347, 299.51), and
    they predict every row as the refit does. matmul_max x0.9 or x1.1 in the file moves
    every prediction by 5-9% and fails here."""
    shipped = shipped_gpu()
    assert "fit_calibration.py" in shipped.source
    assert builtin_device("a100-80g").efficiency == shipped
    fit = fit_efficiency(table_runs(), shipped, start=NEUTRAL_START)
    assert shipped.matmul_max == pytest.approx(fit.efficiency.matmul_max, rel=0.005)
    assert shipped.matmul_half == pytest.approx(fit.efficiency.matmul_half, rel=0.03)
    for run, refit in zip(table_runs(), fit.predicted):
        assert run.predict(shipped) == pytest.approx(refit, rel=0.005), run.name
    # Not a constant: a 512-wide product is clearly less efficient than a 8192-wide one.
    assert shipped.matmul(512, 512, 512) < 0.9 * shipped.matmul(8192, 8192, 8192)


def test_shipped_fit_report_is_what_the_simulator_gives():
    """The ``megatron_fit`` rows in calibration.json, recomputed with the shipped curve."""
    reported = {r["params_b"]: r for r in load_calibration()["megatron_fit"]}
    assert sorted(reported) == sorted(r[0] for r in MEGATRON_TABLE)
    for row, run in zip(MEGATRON_TABLE, table_runs()):
        predicted = run.predict(shipped_gpu())
        entry = reported[row[0]]
        assert entry["published"] == row[-1]
        assert entry["predicted"] == pytest.approx(predicted, abs=0.051), run.name
        assert entry["error"] == pytest.approx(predicted / row[-1] - 1, abs=5.1e-5), run.name


@functools.cache
def korthikanti_plan(index: int):
    run = korthikanti(index)
    return search(run.graph, run.cluster, run.config.global_batch_size)


@pytest.mark.parametrize("index", range(len(KORTHIKANTI_RUNS)),
                         ids=[r[0] for r in KORTHIKANTI_RUNS])
def test_korthikanti_configuration_within_10_percent_of_its_mfu_and_the_plan_no_slower(index):
    """The published configuration (t, p, dp 1, microbatch 1, 1F1B, sequence parallelism;
    the zoo gpt's fused attention keeps no score matrix, so there is no selective
    recomputation left to do) simulated with the shipped curve: its model FLOPs
    utilization within 10% of the published one. Measured: 22B 41.1% (41.5), 175B 47.9%
    (51.4), 530B 50.8% (56.0), 1T 51.5% (56.3). tripar's own plan for the same model, GPUs
    and global batch is at least as fast (49.2 / 53.9 / 56.3 / 57.1%;
    ``python benchmarks/korthikanti_plans.py`` writes the table)."""
    run = korthikanti(index)
    name, *_, gpus, batch, mfu, _hfu = KORTHIKANTI_RUNS[index]
    published = step_estimate(run.graph, run.cluster, run.config, record_timeline=False)
    assert published.fits, name

    def utilization(step_s: float) -> float:
        return run.flops / step_s / gpus / (A100_PEAK_TFLOPS * 1e12) * 100

    assert utilization(published.step_time_s) == pytest.approx(mfu, rel=0.10), name
    plan = korthikanti_plan(index)
    assert plan.estimate.step_time_s <= published.step_time_s * (1 + 1e-9), (
        f"{name}: tripar's plan {utilization(plan.estimate.step_time_s):.1f}% MFU, the "
        f"published configuration {utilization(published.step_time_s):.1f}%")


def test_175b_plan_is_no_slower_than_its_zero_bubble_zero1_plan():
    """GPT-3 175B on 64 GPUs: dp 2, tp 4, pp 8, ZB-H1, ZeRO-1, sequence parallelism
    simulates at 53.9% MFU. When ZeRO-2 joined the space the search's screen (memory and
    work at the least over sp on and off, ZB-H1's bubble charged as (p - 1)(F + B))
    ordered 24 interleaved and ZeRO-2 candidates ahead of it, and the search settled for
    51.8%. The plan must be at least as fast as that configuration."""
    index = next(i for i, r in enumerate(KORTHIKANTI_RUNS) if r[0] == "175B")
    run = korthikanti(index)
    batch = run.config.global_batch_size
    zero_bubble = ParallelConfig(dp=2, tp=4, pp=8, micro_batch_size=1,
                                 num_microbatches=batch // 2, schedule="zb-h1",
                                 recompute="stage-aware", zero=1, sp=True)
    parts = search_parts(run.graph, run.cluster, batch, Pins(), None, 16)
    reference = parts.evaluator.evaluate(zero_bubble).step_time_s
    plan = korthikanti_plan(index)
    assert plan.estimate.step_time_s <= reference * (1 + 1e-9), plan.render()
