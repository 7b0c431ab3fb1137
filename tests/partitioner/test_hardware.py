"""Hardware profiles: built-ins, JSON round trip, errors, the matmul curve fit."""

from __future__ import annotations

import json

import pytest

from tripar.errors import ConfigError
from tripar.partitioner.hardware import (
    BUILTIN_DEVICES,
    Cluster,
    DeviceSpec,
    Efficiency,
    builtin_device,
    dtype_bytes,
    fit_matmul_times,
)


def test_builtin_datasheet_figures():
    a100 = builtin_device("a100-80g")
    assert a100.peak("bf16") == 312e12
    assert a100.memory_bytes == 80 * 10**9
    assert a100.memory_bandwidth == pytest.approx(2.0e12, rel=0.03)
    assert builtin_device("a100-40g").memory_bandwidth == pytest.approx(1.6e12, rel=0.03)
    h100 = builtin_device("h100-80g")
    assert (h100.peak("bf16"), h100.memory_bandwidth) == (989e12, 3.35e12)
    h200 = builtin_device("h200")
    assert (h200.peak("bf16"), h200.memory_bytes, h200.memory_bandwidth) == (
        989e12, 141 * 10**9, 4.8e12)
    v100 = builtin_device("v100-32g")
    assert (v100.peak("fp16"), v100.peak("bf16"), v100.memory_bytes) == (125e12, 125e12,
                                                                         32 * 10**9)
    assert builtin_device("cpu").default_dtype == "fp32"
    assert set(BUILTIN_DEVICES) == {"a100-40g", "a100-80g", "h100-80g", "h200", "v100-32g",
                                    "cpu"}


def test_builtin_links_per_direction():
    a100 = Cluster.builtin("a100-80g", nodes=2, gpus_per_node=8)
    assert a100.intra_bandwidth == 300e9  # NVLink 600 GB/s counts both directions
    assert a100.inter_bandwidth == 25e9  # 8 x 200 Gb/s shared by 8 GPUs
    h100 = Cluster.builtin("h100-80g", nodes=1)
    assert (h100.intra_bandwidth, h100.inter_bandwidth) == (450e9, 50e9)
    assert a100.devices == 16


def test_unknown_gpu_names_known_ones():
    with pytest.raises(ConfigError, match="a100-80g.*h100-80g.*cpu"):
        builtin_device("tpu-v5")


def test_profile_round_trip(tmp_path):
    cluster = Cluster.builtin("h100-80g", nodes=3, gpus_per_node=4)
    path = tmp_path / "c.json"
    cluster.to_file(path)
    back = Cluster.from_file(path)
    assert back == cluster
    assert back.device.efficiency == cluster.device.efficiency


def test_profile_may_name_a_builtin_device(tmp_path):
    data = Cluster.builtin("a100-40g").to_dict()
    data["device"] = "a100-40g"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    assert Cluster.from_file(path).device == builtin_device("a100-40g")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("nodes"), "lacks field 'nodes'"),
    (lambda d: d.update(format="other"), "not a tripar cluster profile"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.update(device="nope-gpu"), "unknown GPU 'nope-gpu'.*a100-80g"),
    (lambda d: d.update(nodes=0), "nodes must be a positive integer"),
    (lambda d: d["device"].update(memory_bytes=-1), "positive memory"),
    (lambda d: d["device"]["efficiency"].update(matmul_max=3.0), "matmul_max"),
    (lambda d: d["device"]["efficiency"].update(bogus=1), "unknown efficiency fields"),
    (lambda d: d["device"]["efficiency"].update(op_s=-1e-6), "op_s must be a finite number >= 0"),
    (lambda d: d["device"]["efficiency"].update(optimizer_bytes=float("inf")),
     "optimizer_bytes.*must be a finite"),
    (lambda d: d["device"]["peak_flops"].update(int4=1.0), "unknown dtype 'int4'"),
    (lambda d: d["device"]["efficiency"].update(block_forward=0.0),
     "block_forward must be a finite number > 0"),
    (lambda d: d["device"]["efficiency"].update(node_sharing=0),
     "node_sharing must be a finite number > 0"),
    (lambda d: d["device"]["efficiency"].update(block_backward=-1.0),
     "block_backward must be a finite number > 0"),
    (lambda d: d["device"]["efficiency"].update(block_backward=float("nan")),
     "block_backward.*must be a finite number"),
])
def test_malformed_profiles(tmp_path, mutate, message):
    data = Cluster.builtin("a100-80g").to_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        Cluster.from_file(path)


def test_not_json_and_missing_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Cluster.from_file(path)
    with pytest.raises(ConfigError, match="cannot read"):
        Cluster.from_file(tmp_path / "missing.json")


def test_efficiency_grows_with_size_and_is_bounded():
    eff = builtin_device("a100-80g").efficiency
    sizes = [eff.matmul(s, s, s) for s in (64, 256, 1024, 4096, 16384)]
    assert sizes == sorted(sizes) and sizes[0] < 0.5 * sizes[-1]
    assert all(0 < e <= eff.matmul_max for e in sizes)
    assert eff.matmul(2048, 64, 2048) < eff.matmul(2048, 2048, 2048)  # skinny is worse


def test_fit_matmul_times_recovers_parameters():
    truth = Efficiency(matmul_max=1.0, matmul_half=300.0, launch_s=5e-6)
    peak = 2e12
    samples = []
    for m, k, n in ((64, 64, 64), (512, 128, 32), (1024, 1024, 1024), (4096, 1024, 256),
                    (4096, 4096, 4096)):
        flops = 2 * m * k * n
        samples.append((m, k, n, flops / (peak * truth.matmul(m, k, n)) + truth.launch_s))
    fitted_peak, half, launch = fit_matmul_times(samples)
    assert fitted_peak == pytest.approx(peak, rel=1e-3)
    assert half == pytest.approx(300.0, rel=1e-2) and launch == pytest.approx(5e-6, rel=1e-2)
    with pytest.raises(ConfigError, match="at least 3"):
        fit_matmul_times(samples[:2])


def test_device_peak_and_dtype_errors():
    spec = DeviceSpec("x", (("fp32", 1e12),), 10, 1e9, Efficiency(0.5, 10.0))
    assert spec.peak("torch.float32") == 1e12
    with pytest.raises(ConfigError, match="no peak for 'bf16'"):
        spec.peak("bf16")
    assert dtype_bytes("torch.bfloat16") == 2
    with pytest.raises(ConfigError, match="unknown dtype"):
        dtype_bytes("int3")


def test_host_overheads_default_to_none_and_round_trip(tmp_path):
    gpu = builtin_device("h100-80g").efficiency  # GPUs: launches overlap the kernels
    assert gpu.op_s == 0.0 and gpu.optimizer_tensor_s == 0.0 and gpu.optimizer_bytes == 28.0
    data = Cluster.builtin("cpu").to_dict()
    data["device"]["efficiency"].update(op_s=7e-6, optimizer_bytes=64.0,
                                        optimizer_tensor_s=3e-5)
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    eff = Cluster.from_file(path).device.efficiency
    assert (eff.op_s, eff.optimizer_bytes, eff.optimizer_tensor_s) == (7e-6, 64.0, 3e-5)
    del data["device"]["efficiency"]["op_s"]  # profiles written before these fields load
    path.write_text(json.dumps(data))
    assert Cluster.from_file(path).device.efficiency.op_s == 0.0


def test_block_scales_default_to_one_and_round_trip(tmp_path):
    for name in BUILTIN_DEVICES:  # built-ins (and the Megatron-fitted GPUs) keep the parts
        eff = builtin_device(name).efficiency
        assert (eff.block_forward, eff.block_backward, eff.node_sharing) == (1.0, 1.0, 1.0)
    data = Cluster.builtin("cpu").to_dict()
    data["device"]["efficiency"].update(block_forward=1.15, block_backward=1.07,
                                        node_sharing=1.06)
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    loaded = Cluster.from_file(path)
    assert (loaded.device.efficiency.block_forward, loaded.device.efficiency.block_backward,
            loaded.device.efficiency.node_sharing) == (1.15, 1.07, 1.06)
    loaded.to_file(path)
    assert Cluster.from_file(path) == loaded
    for field in ("block_forward", "block_backward", "node_sharing"):  # older profiles
        del data["device"]["efficiency"][field]
    path.write_text(json.dumps(data))
    old = Cluster.from_file(path)
    assert old.device.efficiency == Cluster.builtin("cpu").device.efficiency
