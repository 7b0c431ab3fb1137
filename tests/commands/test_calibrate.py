"""``tripar calibrate --quick``: real measurements (2 gloo processes), a loadable profile
that ``--cluster`` uses, and what it predicts for products and blocks it was not fitted to
(timed on the process's CPU time, tolerances from the spread measured on a busy VM)."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

import pytest

from tripar.cli import main
from tripar.commands._cluster_args import add_cluster_args, cluster_from_args
from tripar.commands.calibrate import (
    QUICK_BLOCK_SIZES,
    QUICK_OPERATOR_SIZES,
    QUICK_SIZES,
    compute_clock,
    fit_alpha_beta,
    fit_block_scales,
    fit_node_sharing,
    fit_operator_times,
    fit_optimizer_times,
    measure_blocks,
    measure_matmul,
    time_blocks,
)
from tripar.errors import ConfigError
from tripar.partitioner.hardware import Cluster, Efficiency, fit_matmul_times

# Tolerances, from the spread measured on the 2-core development VM while other suites ran
# (load 4-13), compute on CPU time (one thread, ``compute_clock``):
# - products held out of the matmul fit (MATMUL_REPEATS = 40; 12 runs of the test and 16
#   sweeps of the same measurement alone): RMS of log(predicted / measured) over the 8
#   products 0.03-0.27 (mean 0.12), largest single error 5-39% (96x96x96 runs 3-30% slower
#   than the curve says). With 5 repeats (8 runs) the RMS reached 0.27 and single errors
#   48%. Model errors of the noise's size are not told apart: a fit without the launch
#   term gives RMS 0.15-0.35 on the same sweeps, one without the size curve 0.14-0.38; a
#   prediction that drops the curve's size term (``Efficiency.matmul`` = ``matmul_max``)
#   0.48.
# - held-out blocks (10 runs): largest error per run 7-42% (mean 23%; the 16x64 backward,
#   whose per-operator cost comes from the quick profile's 3-repeat operator timings); a
#   profile fitted without the per-operator term is 66-79% off there (4 runs).
# - in sample, 24 quick profiles (3 repeats): products up to 47% off their fitted curve,
#   operator sets 32%, optimizer steps 30%, blocks 29% off their fitted scales; without
#   the per-operator term the smallest operator set is 99% off.
HELD_OUT_RMS = 0.35
HELD_OUT_EACH = 0.6
HELD_OUT_BLOCK = 0.6
IN_SAMPLE_MATMUL = 0.7
IN_SAMPLE_HOST = 0.5
IN_SAMPLE_BLOCK = 0.45
MATMUL_REPEATS = 40
BLOCK_REPEATS = 20


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """torch on one thread, so that compute is timed on the process's CPU time
    (``compute_clock``): other processes on a busy machine do not inflate it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibrate") / "local.json"
    assert main(["calibrate", "--quick", "--device", "cpu", "--out", str(path),
                 "--format", "json", "--timeout", "60"]) == 0
    return path


def test_quick_calibration_measures_and_fits(profile, capsys):
    cluster = Cluster.from_file(profile)
    measured = cluster.measured
    assert len(measured["matmul"]) == 2 * len(QUICK_SIZES)
    assert all(s["flops_per_s"] > 0 for s in measured["matmul"])
    assert len(measured["p2p"]) == 4 and len(measured["all_reduce"]) == 4
    assert len(measured["all_gather"]) == len(measured["reduce_scatter"]) == 4
    spec = cluster.device
    eff = spec.efficiency
    assert spec.peak("fp32") >= 0.5 * max(s["flops_per_s"] for s in measured["matmul"])
    assert eff.matmul_max == 1.0 and eff.matmul_half >= 0 and eff.launch_s >= 0
    assert eff.source.startswith("tripar calibrate --quick")
    assert spec.memory_bandwidth > 1e8 and cluster.intra_bandwidth > 1e6
    assert 0 < eff.link <= 1
    assert 0 < eff.link_all_gather <= 1 and 0 < eff.link_reduce_scatter <= 1
    # The fitted times follow the measured ones (to the quick profile's spread, above).
    for s in measured["matmul"]:
        flops = 2.0 * s["m"] * s["k"] * s["n"]
        fitted = flops / (spec.peak("fp32") * eff.matmul(s["m"], s["k"], s["n"])) + eff.launch_s
        assert fitted == pytest.approx(s["seconds"], rel=IN_SAMPLE_MATMUL)


MATMUL_HELD_OUT = (48, 96, 192, 384)
"""Product sizes the fit never sees: between and above ``QUICK_SIZES`` (32-256); each is
timed square and skinny (``measure_matmul``)."""
BLOCK_HELD_OUT = ((16, 64), (128, 256))
"""(tokens, hidden) of GPT blocks no fit sees: one smaller than ``QUICK_BLOCK_SIZES``,
where per-operator overhead dominates, and one between them."""


def _errors(pairs) -> dict[str, float]:
    """{label: predicted / measured - 1}; printed, so that ``pytest -rP`` shows them."""
    errors = {label: predicted / measured - 1 for label, predicted, measured in pairs}
    print(json.dumps({k: round(v, 4) for k, v in errors.items()}))
    return errors


def test_matmul_fit_predicts_held_out_sizes():
    """Fit ``fit_matmul_times`` to products of ``QUICK_SIZES`` and predict the products of
    ``MATMUL_HELD_OUT``, all timed in one sweep on the process's CPU time."""
    samples = measure_matmul("cpu", "fp32", tuple(sorted(QUICK_SIZES + MATMUL_HELD_OUT)),
                             repeats=MATMUL_REPEATS)
    train = [(s["m"], s["k"], s["n"], s["seconds"]) for s in samples if s["k"] in QUICK_SIZES]
    peak, x_half, launch = fit_matmul_times(train)
    curve = Efficiency(matmul_max=1.0, matmul_half=x_half)
    errors = _errors(
        (f"{s['m']}x{s['k']}x{s['n']}",
         2.0 * s["m"] * s["k"] * s["n"] / (peak * curve.matmul(s["m"], s["k"], s["n"])) + launch,
         s["seconds"])
        for s in samples if s["k"] in MATMUL_HELD_OUT)
    rms = math.sqrt(sum(math.log1p(e) ** 2 for e in errors.values()) / len(errors))
    assert rms < HELD_OUT_RMS, (rms, errors)
    assert max(map(abs, errors.values())) < HELD_OUT_EACH, errors


def test_profile_predicts_held_out_blocks(profile):
    """The profile's component model (products, operators, memory; the modelled seconds it
    recorded for the ``QUICK_BLOCK_SIZES`` blocks), with the block scales refitted to those
    blocks timed again here, predicts the forward and backward of the ``BLOCK_HELD_OUT``
    blocks timed right after them."""
    cluster = Cluster.from_file(profile)
    eff = cluster.device.efficiency
    fitted = cluster.measured["blocks"]
    timed = time_blocks(QUICK_BLOCK_SIZES, BLOCK_REPEATS)
    forward, backward = fit_block_scales(
        [{**b, "forward_seconds": f, "backward_seconds": bw} for b, (f, bw) in zip(fitted, timed)])
    components = replace(cluster, device=replace(cluster.device, efficiency=replace(
        eff, block_forward=1.0, block_backward=1.0)))
    errors = _errors(
        (f"{s['tokens']}x{s['hidden']} {kind}", scale * s[f"model_{kind}_seconds"],
         s[f"{kind}_seconds"])
        for s in measure_blocks(BLOCK_HELD_OUT, BLOCK_REPEATS, components)
        for kind, scale in (("forward", forward), ("backward", backward)))
    assert max(map(abs, errors.values())) < HELD_OUT_BLOCK, errors


def test_profile_is_what_cluster_option_returns(profile):
    parser = argparse.ArgumentParser()
    add_cluster_args(parser)
    assert cluster_from_args(parser.parse_args(["--cluster", str(profile)])) == \
        Cluster.from_file(profile)
    resized = cluster_from_args(parser.parse_args(["--cluster", str(profile), "--nodes", "3"]))
    assert resized.nodes == 3 and resized.device == Cluster.from_file(profile).device
    with pytest.raises(ConfigError, match="either --gpu or --cluster"):
        cluster_from_args(parser.parse_args(["--cluster", str(profile), "--gpu", "h200"]))


def test_simulate_uses_the_profile(profile, capsys):
    spec = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32"
    common = ["simulate", spec, "--global-batch", "4", "--dp", "2", "--format", "json"]
    assert main([*common, "--cluster", str(profile)]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main([*common, "--gpu", "a100-80g", "--gpus-per-node", "2"]) == 0
    gpu = json.loads(capsys.readouterr().out)
    assert local["cluster"]["device"] == "cpu (measured)"
    # A CPU process is orders of magnitude slower than an A100.
    assert local["estimate"]["step_time_s"] > 5 * gpu["estimate"]["step_time_s"]


def test_fit_alpha_beta_is_least_squares():
    samples = [{"bytes": b, "seconds": 2e-5 + b / 4e9} for b in (0, 1e6, 1e7, 1e8)]
    alpha, beta = fit_alpha_beta(samples)
    assert alpha == pytest.approx(2e-5, rel=1e-6) and beta == pytest.approx(4e9, rel=1e-6)


def test_calibration_times_backward_products_operators_and_the_optimizer(profile):
    cluster = Cluster.from_file(profile)
    measured, eff = cluster.measured, cluster.device.efficiency
    for s in measured["matmul"]:  # seconds: the mean of the forward and the 2 backward ones
        assert s["seconds"] == pytest.approx((s["forward_seconds"] + s["backward_seconds"]) / 3)
    operators = measured["operators"]
    assert len(operators) == len(QUICK_OPERATOR_SIZES)
    assert all(o["ops"] >= 10 and o["saved_bytes"] > 0 and o["seconds"] > 0 for o in operators)
    assert operators[-1]["saved_bytes"] > 100 * operators[0]["saved_bytes"]
    assert eff.op_s > 0 or eff.memory_traffic > 0
    bandwidth = cluster.device.memory_bandwidth
    for o in operators:  # the fit follows the timings (to the quick profile's spread)
        fitted = 2 * o["ops"] * eff.op_s + 3 * eff.memory_traffic * o["saved_bytes"] / bandwidth
        assert fitted == pytest.approx(o["seconds"], rel=IN_SAMPLE_HOST)
    steps = measured["optimizer"]
    assert len(steps) == 3 and eff.optimizer_bytes >= 0 and eff.optimizer_tensor_s >= 0
    for o in steps:
        fitted = o["tensors"] * eff.optimizer_tensor_s + o["params"] * eff.optimizer_bytes \
            / bandwidth
        assert fitted == pytest.approx(o["seconds"], rel=IN_SAMPLE_HOST)


def test_host_cost_fits_are_nonnegative_least_squares():
    # Times below the bytes' line (a negative intercept): no negative per-operator cost.
    rows = [{"ops": 12, "saved_bytes": b, "seconds": 3 * 2.0 * b / 1e10 - 1e-6}
            for b in (1e5, 1e6, 1e7)]
    op_s, traffic = fit_operator_times(rows, 1e10)
    assert op_s == 0.0 and traffic == pytest.approx(2.0, rel=0.05)
    steps = [{"tensors": n, "params": n * 10, "seconds": n * 1e-5} for n in (1, 8, 64)]
    tensor_s, per_param = fit_optimizer_times(steps, 1e10)
    assert tensor_s == pytest.approx(1e-5) and per_param == 0.0
    with pytest.raises(ConfigError, match="at least 2"):
        fit_operator_times(rows[:1], 1e10)


def test_calibration_times_whole_blocks_against_the_components(profile):
    cluster = Cluster.from_file(profile)
    blocks, eff = cluster.measured["blocks"], cluster.device.efficiency
    assert [(b["tokens"], b["hidden"]) for b in blocks] == list(QUICK_BLOCK_SIZES)
    for b in blocks:
        assert min(b["forward_seconds"], b["backward_seconds"], b["model_forward_seconds"],
                   b["model_backward_seconds"]) > 0
        # a backward costs more than its forward: modelled for every block, measured for
        # the largest (the small one takes milliseconds: on 2 busy cores its two timings
        # can swap)
        assert b["model_backward_seconds"] > b["model_forward_seconds"]
    assert blocks[-1]["backward_seconds"] > blocks[-1]["forward_seconds"]
    assert blocks[-1]["forward_seconds"] > 2 * blocks[0]["forward_seconds"]
    assert (eff.block_forward, eff.block_backward) == pytest.approx(fit_block_scales(blocks))
    # the same blocks in 2 processes at once: at least as slow, once fitted
    assert all(b["shared_forward_seconds"] > 0 and b["shared_backward_seconds"] > 0
               for b in blocks)
    assert eff.node_sharing == pytest.approx(fit_node_sharing(
        [(b["forward_seconds"], b["backward_seconds"]) for b in blocks],
        [(b["shared_forward_seconds"], b["shared_backward_seconds"]) for b in blocks]))
    assert 1.0 <= eff.node_sharing < 3.0
    # the scaled component model follows each block it was fitted to (held-out blocks:
    # test_profile_predicts_held_out_blocks)
    for scale, kind in ((eff.block_forward, "forward"), (eff.block_backward, "backward")):
        for b in blocks:
            assert scale * b[f"model_{kind}_seconds"] == pytest.approx(
                b[f"{kind}_seconds"], rel=IN_SAMPLE_BLOCK), (kind, b)


def test_fit_block_scales_recovers_known_scales():
    rows = [{"model_forward_seconds": f, "forward_seconds": 1.17 * f,
             "model_backward_seconds": 2.1 * f, "backward_seconds": 0.93 * 2.1 * f}
            for f in (2e-3, 3e-2, 0.4)]
    assert fit_block_scales(rows) == pytest.approx((1.17, 0.93), rel=1e-9)
    # relative errors: a small block counts as much as a large one
    rows = [{"model_forward_seconds": 1e-3, "forward_seconds": 1.1e-3,
             "model_backward_seconds": 1e-3, "backward_seconds": 1e-3},
            {"model_forward_seconds": 1.0, "forward_seconds": 1.3,
             "model_backward_seconds": 1.0, "backward_seconds": 1.0}]
    forward, backward = fit_block_scales(rows)
    assert 1.1 < forward < 1.3 and backward == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="at least 1 timed block"):
        fit_block_scales([{**rows[0], "forward_seconds": 0.0}])


def test_compute_is_timed_on_the_process_clock_with_one_thread(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert compute_clock("cpu") is time.process_time
    assert compute_clock("cuda") is time.perf_counter
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # threads: CPU time overcounts
    assert compute_clock("cpu") is time.perf_counter


def test_fit_node_sharing_recovers_a_known_slowdown():
    solo = [(2e-3, 4e-3), (3e-2, 6.5e-2), (0.3, 0.61)]
    assert fit_node_sharing(solo, [(1.08 * f, 1.08 * b) for f, b in solo]) == \
        pytest.approx(1.08, rel=1e-9)
    assert fit_node_sharing(solo, [(0.97 * f, 0.97 * b) for f, b in solo]) == 1.0  # noise
    with pytest.raises(ConfigError, match="alone and shared"):
        fit_node_sharing([], [])
