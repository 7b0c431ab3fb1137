"""Where the GPU memory goes: plain torch against tripar on one GPU (bf16 autocast,
AdamW), with the cost model's prediction beside it: memory after the build, after the
first step (weights + optimizer state), and the peak of the next steps. Writes
``$OUT/gpu_mem.json``; benchmarks/results/gpu_h200.md reports its run.

    python benchmarks/gpu_memory.py
"""

import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_check as g  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/gpu_mem_out")
R = {}
GiB = 2**30


def mem():
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / GiB


def plain(spec, batch):
    loaded = g.build(spec, batch, device="cuda")
    data = g.batches(loaded, 3)
    model = loaded.model
    out = {"after_build": mem()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for i, (ids, tgt) in enumerate(data):
        if i == 1:
            out["after_step1"] = mem()
            torch.cuda.reset_peak_memory_stats()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids.cuda(), tgt.cuda())
        if i == 1:
            out["after_forward"] = mem()
        loss.backward()
        opt.step()
    out["peak_steps_2_3"] = torch.cuda.max_memory_allocated() / GiB
    del model, opt, loaded
    torch.cuda.empty_cache()
    return out


def tripar_run(spec, batch, nmb):
    import tripar
    loaded = g.build(spec, batch, device="meta")
    data = g.batches(loaded, 3)
    pm = tripar.auto_parallel(loaded.model, None, example_inputs=loaded.example_inputs,
                              precision="bf16", recompute="none", global_batch_size=batch,
                              num_microbatches=nmb)
    out = {"after_build": mem()}
    for i, b in enumerate(data):
        if i == 1:
            out["after_step1"] = mem()
            torch.cuda.reset_peak_memory_stats()
        pm.train_step(b)
    out["peak_steps_2_3"] = torch.cuda.max_memory_allocated() / GiB
    params = sum(p.numel() for p in pm.parameters())
    out["params"] = params
    out["predicted_peak"] = pm.plan.estimate.peak_memory_bytes / GiB
    out["predicted_static_16B_per_param"] = params * 16 / GiB
    out["predicted_activation"] = out["predicted_peak"] - out["predicted_static_16B_per_param"]
    out["measured_activation"] = out["peak_steps_2_3"] - out["after_step1"]
    out["stage_memory_records"] = [s.memory_bytes / GiB for s in pm.plan.stages]
    pm.close()
    del pm
    torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    g.init_world1()
    for spec, batch, nmb in [("gpt:layers=8,hidden=2048,heads=16,vocab=50304,seq=2048", 8, 1),
                             ("gpt:layers=8,hidden=2048,heads=16,vocab=50304,seq=2048", 8, 4),
                             ("gpt:layers=16,hidden=1024,heads=16,vocab=50304,seq=1024", 16, 1),
                             ("gpt:layers=8,hidden=2048,heads=16,vocab=512,seq=2048", 8, 1),
                             ("llama:layers=8,hidden=2048,heads=16,kv_heads=4,vocab=32000,seq=2048", 8, 1)]:
        key = f"{spec} b={batch} nmb={nmb}"
        row = {}
        for name, fn, args in (("plain_torch", plain, (spec, batch)),
                               ("tripar", tripar_run, (spec, batch, nmb))):
            if name == "plain_torch" and nmb != 1:
                continue
            try:
                row[name] = fn(*args)
            except Exception as exc:  # noqa: BLE001
                row[name] = {"error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()[-800:]}
            torch.cuda.empty_cache()
        R[key] = row
        print(key, json.dumps(row), flush=True)
        os.makedirs(OUT, exist_ok=True)
        json.dump(R, open(os.path.join(OUT, "gpu_mem.json"), "w"), indent=1)
