"""The device check on one CUDA GPU: NCCL, fp32 and bf16 against plain torch, measured
peak memory and step time against the cost model (shipped profile, then the profile
``tripar calibrate`` measures there). Writes ``$OUT/gpu_check.json`` (default
/tmp/gpu_check_out) and prints as it goes; benchmarks/results/gpu_h200.md reports its runs.

    python benchmarks/gpu_check.py [--only=nccl,bf16,builtin,calibrate,calibrated] [--quick]
    python benchmarks/gpu_check.py --smoke     # tiny sizes, runs on a CPU too

Two ranks on one GPU are refused by NCCL ("Duplicate GPU detected"), so pp/tp/dp under
NCCL need a machine of two GPUs or more; the check records the refusal.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SMOKE = "--smoke" in sys.argv
OUT = os.environ.get("OUT", "/tmp/gpu_check_out")
os.makedirs(OUT, exist_ok=True)
RESULTS: dict = {}
T0 = time.time()
CUDA = torch.cuda.is_available()
if CUDA:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

TINY = "gpt:layers=4,hidden=64,heads=4,vocab=128,seq=16"


def save() -> None:
    with open(os.path.join(OUT, "gpu_check.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def section(name, budget_s=None):
    def wrap(fn):
        def run(*a, **k):
            start = time.time()
            print(f"\n=== {name} (t={start - T0:.0f}s)", flush=True)
            try:
                RESULTS[name] = fn(*a, **k)
            except Exception as exc:  # noqa: BLE001 - a check's failure is a result
                RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()[-3000:]}
            RESULTS[name + ".seconds"] = round(time.time() - start, 1)
            print(json.dumps(RESULTS[name], default=str)[:3000], flush=True)
            save()
        return run
    return wrap


def build(spec, batch, device="cpu", seed=0):
    from tripar.models import load_model
    return load_model(spec, batch_size=batch, device=device, seed=seed)


def batches(loaded, steps, seed=1):
    ids, tgt = loaded.example_inputs
    g = torch.Generator().manual_seed(seed)
    vocab = int(loaded.config["vocab"])
    out = []
    for _ in range(steps):
        x = torch.randint(0, vocab, (ids.shape[0], ids.shape[1] + 1), generator=g)
        out.append((x[:, :-1].contiguous(), x[:, 1:].contiguous()))
    return out


def sgd(params):
    return torch.optim.SGD(list(params), lr=0.05)


def reference(model, data, device, precision):
    model = copy.deepcopy(model).to(device)
    opt = sgd(model.parameters())
    for ids, tgt in data:
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(ids.to(device), tgt.to(device))
        loss.backward()
        opt.step()
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def max_diff(got, want):
    return max((got[k].float() - want[k].float()).abs().max().item() for k in want if k in got)


# ---- multi-rank NCCL on the one GPU -----------------------------------------------------

def _rank(rank, world, port, task, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=60))
        if task == "allreduce":
            t = torch.full((4,), float(rank + 1), device="cuda")
            dist.all_reduce(t)
            torch.cuda.synchronize()
            queue.put((rank, "ok", t.tolist()))
        else:
            import tripar
            pins, precision, spec, steps = task
            loaded = build(spec, 4)
            data = batches(loaded, steps)
            pm = tripar.auto_parallel(loaded.model, None, example_inputs=loaded.example_inputs,
                                      optimizer=sgd, precision=precision, **pins)
            for b in data:
                pm.train_step(b)
            full = pm.full_state_dict()
            queue.put((rank, "ok", {k: v.detach().float().cpu() for k, v in full.items()}
                       if rank == 0 else None))
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"))


def spawn(world, task, port, timeout_s=120):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, task, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    deadline = time.time() + timeout_s
    while len(got) < world and time.time() < deadline:
        try:
            r, status, value = queue.get(timeout=max(1.0, deadline - time.time()))
            got[r] = (status, value)
        except Exception:  # noqa: BLE001 - queue.Empty: timed out
            break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if len(got) < world:
        got["timeout"] = ("error", f"only {len(got)} of {world} ranks answered in {timeout_s}s")
    return got


@section("nccl_two_ranks_one_gpu")
def nccl_two_ranks():
    if not CUDA:
        return {"skipped": "no CUDA"}
    got = spawn(2, "allreduce", 29601, timeout_s=90)
    result = {"allreduce": {str(k): v for k, v in got.items()}}
    if all(s == "ok" for s, _ in got.values()):
        loaded = build(TINY, 4)
        data = batches(loaded, 3)
        ref = reference(loaded.model, data, torch.device("cuda"), "fp32")
        for i, pins in enumerate(({"pp": 2}, {"tp": 2}, {"dp": 2})):
            res = spawn(2, (pins, "fp32", TINY, 3), 29611 + i, timeout_s=150)
            name = ",".join(f"{k}={v}" for k, v in pins.items())
            if res.get(0, ("error",))[0] == "ok":
                full = res[0][1]
                diff = max_diff(full, ref)
                try:
                    torch.testing.assert_close(full, {k: ref[k] for k in full}, rtol=1e-4,
                                               atol=1e-5)
                    ok = True
                except AssertionError as e:
                    ok = str(e)[:500]
                result[name] = {"max_abs_diff_vs_single_gpu": diff, "assert_close": ok}
            else:
                result[name] = {str(k): (s, v if s != "ok" else None) for k, (s, v) in res.items()}
    return result


# ---- world 1 under NCCL: bf16, memory, time ------------------------------------------

def init_world1():
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29650")
    from tripar.runtime.launch import ensure_process_group
    ensure_process_group(None, timeout_s=120)
    return dist.get_backend()


@section("bf16_and_fp32_parity_world1")
def bf16_parity():
    import tripar
    backend = init_world1()
    device = torch.device("cuda" if CUDA else "cpu")
    loaded = build(TINY, 4)
    data = batches(loaded, 3)
    out = {"backend": backend}
    refs = {p: reference(loaded.model, data, device, p) for p in ("fp32", "bf16")}
    for precision in ("fp32", "bf16"):
        pm = tripar.auto_parallel(copy.deepcopy(loaded.model), None,
                                  example_inputs=loaded.example_inputs, optimizer=sgd,
                                  precision=precision)
        losses = [pm.train_step(b) for b in data]
        full = {k: v.detach().float().cpu() for k, v in pm.full_state_dict().items()}
        out[precision] = {
            "stage_device": str(pm.programs[0].module.parameters().__next__().device),
            "losses": losses,
            "max_abs_diff_vs_same_precision_torch": max_diff(full, refs[precision]),
            "max_abs_diff_vs_fp32_torch": max_diff(full, refs["fp32"]),
        }
        tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
        try:
            torch.testing.assert_close(full, {k: refs[precision][k] for k in full}, **tol)
            out[precision]["assert_close"] = True
        except AssertionError as e:
            out[precision]["assert_close"] = str(e)[:400]
        pm.close()
    return out


def measure(spec, batch, recompute, cluster=None, steps=4):
    import tripar
    loaded = build(spec, batch, device="meta")
    data = batches(loaded, steps + 1)
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    kw = {"cluster": cluster} if cluster is not None else {}
    pm = tripar.auto_parallel(loaded.model, None, example_inputs=loaded.example_inputs,
                              precision="bf16" if CUDA else "fp32", recompute=recompute,
                              global_batch_size=batch, **kw)
    est = pm.plan.estimate
    pm.train_step(data[0])
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for b in data[1:]:
        t = time.perf_counter()
        pm.train_step(b)
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if CUDA else 0
    n_params = sum(p.numel() for p in pm.parameters())
    row = {
        "spec": spec, "batch": batch, "recompute_pin": recompute,
        "plan": {"micro_batch_size": pm.plan.parallel.micro_batch_size
                 if hasattr(pm.plan.parallel, "micro_batch_size") else None,
                 "schedule": str(pm.plan.schedule)[:60],
                 "recompute": [getattr(s, "recompute", None) for s in pm.plan.stages]},
        "params": n_params,
        "predicted_peak_GiB": est.peak_memory_bytes / 2**30,
        "measured_peak_GiB": peak / 2**30,
        "measured_over_predicted_memory": peak / est.peak_memory_bytes if peak else None,
        "predicted_step_s": est.step_time_s,
        "measured_step_s": sorted(times)[len(times) // 2],
    }
    row["measured_over_predicted_time"] = row["measured_step_s"] / est.step_time_s
    pm.close()
    del pm
    if CUDA:
        torch.cuda.empty_cache()
    return row


def sizes():
    if SMOKE and not CUDA:
        return [("gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32", 4)]
    return [("gpt:layers=8,hidden=2048,heads=16,vocab=50304,seq=2048", 8),
            ("gpt:layers=16,hidden=1024,heads=16,vocab=50304,seq=1024", 16),
            ("llama:layers=8,hidden=2048,heads=16,kv_heads=4,vocab=32000,seq=2048", 8),
            ("gpt:layers=4,hidden=4096,heads=32,vocab=50304,seq=2048", 4),
            ("llama:layers=16,hidden=1024,heads=8,kv_heads=8,vocab=32000,seq=4096", 4)]


@section("memory_and_time_vs_cost_model_builtin_h200")
def memory_builtin():
    init_world1()
    rows = []
    for spec, batch in sizes():
        for recompute in ("none",):
            try:
                rows.append(measure(spec, batch, recompute))
            except Exception as exc:  # noqa: BLE001
                rows.append({"spec": spec, "recompute": recompute,
                             "error": f"{type(exc).__name__}: {exc}",
                             "tb": traceback.format_exc()[-1200:]})
            print(rows[-1], flush=True)
            save()
    return rows


@section("calibrate")
def calibrate():
    path = os.path.join(OUT, "h200-calibrated.json")
    quick = ["--quick"] if "--quick" in sys.argv else []
    cmd = [sys.executable, "-c", "import sys; from tripar.cli import main; sys.exit(main(sys.argv[1:]))",
           "calibrate", *quick, "--out", path,
           "--device", "cuda" if CUDA else "cpu", "--format", "json", "--timeout", "60"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200 if not SMOKE else 300)
    return {"rc": proc.returncode, "stdout": proc.stdout[-2500:], "stderr": proc.stderr[-1500:],
            "path": path if os.path.exists(path) else None}


@section("memory_and_time_vs_cost_model_calibrated")
def memory_calibrated():
    from tripar.partitioner import Cluster
    path = os.path.join(OUT, "h200-calibrated.json")
    if not os.path.exists(path):
        return {"skipped": "no calibration file"}
    init_world1()
    cluster = Cluster.from_file(path)
    rows = []
    for spec, batch in sizes():
        rows.append(measure(spec, batch, "none", cluster=cluster))
        print(rows[-1], flush=True)
        save()
    return rows


if __name__ == "__main__":
    mp.set_start_method("spawn", force=True)
    env = {"torch": torch.__version__, "cuda": CUDA}
    if CUDA:
        env.update(device=torch.cuda.get_device_name(), nccl=str(torch.cuda.nccl.version()),
                   memory_GiB=torch.cuda.get_device_properties(0).total_memory / 2**30)
    RESULTS["env"] = env
    print(env, flush=True)
    only = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--only=")),
                None)
    for name, fn in (("nccl", nccl_two_ranks), ("bf16", bf16_parity), ("builtin", memory_builtin),
                     ("calibrate", calibrate), ("calibrated", memory_calibrated)):
        if only is None or name in only:
            fn()
    RESULTS["total_s"] = round(time.time() - T0, 1)
    save()
    print(f"\nDONE in {RESULTS['total_s']}s", flush=True)
