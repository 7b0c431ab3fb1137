"""``tripar calibrate``: measure this machine and write a cluster profile.

Measures matrix-product FLOP/s across sizes (and fits the efficiency curve
``e_max x / (x + x_half)`` to them), memory bandwidth (a large copy), and
the gloo p2p, all-reduce, all-gather and reduce-scatter latency and bandwidth
between two local processes started with ``torch.multiprocessing`` (gloo's
all-gather and reduce-scatter are slower than half its all-reduce, so each
gets its own link fraction). The profile it writes is
read by every command through ``--cluster FILE``.

Each product is timed as a training step runs it: the forward ``x @ w.T`` and the
backward's two products on transposed operands (``dy @ w``, and ``dy.T @ x``, a
reduction over the tokens), so the fitted curve is that of forward + backward. On a
CPU it also times what is not a product, which there runs on the critical path:

- a set of normalisation, softmax, GELU, view and elementwise operators, forward and
  backward at several sizes, captured and annotated like a model (so its operator
  count and saved bytes are what ``Block.ops`` and ``Block.saved_bytes`` count), fitted
  to ``2 x ops x op_s + 3 x memory_traffic x saved bytes / bandwidth``;
- ``torch.optim.AdamW.step`` on few large and many small tensors, fitted to
  ``tensors x optimizer_tensor_s + parameters x optimizer_bytes / bandwidth``.
- the same blocks in 2 processes at once (as a node's pipeline stages run), over their
  time alone: ``node_sharing``, what sharing the caches and memory bandwidth costs;

On a GPU the operator and optimizer overheads stay at the GPU defaults (launches overlap
the kernels there). On either device it times

- whole GPT blocks (``tripar.models.gpt.Block``: layer norms, causal attention, GELU
  MLP), forward and backward at several sizes (on a GPU under autocast in the profile's
  dtype), against what the components fitted above predict for them (``block_costs`` of
  the block's own proxy graph); the ratio, fitted over the sizes, is ``block_forward`` /
  ``block_backward``: what a real layer costs beyond its parts (attention's kernel, the
  norms, the linear layers' bias gradients, ...), the way Alpa and Merak profile whole
  layers rather than trusting their parts. Without it, a GPU profile from matrix products
  alone predicted GPT steps on an H200 30-38% too fast.

One machine cannot measure the network between nodes: the inter-node link
is taken from ``--inter-bandwidth`` / ``--inter-latency`` and recorded as
assumed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from tripar.errors import ConfigError
from tripar.partitioner.hardware import (
    Cluster,
    DeviceSpec,
    Efficiency,
    canonical_dtype,
    fit_matmul_times,
    load_calibration,
)

FULL_SIZES = (64, 128, 256, 512, 1024, 2048)
QUICK_SIZES = (32, 64, 128, 256)
GPU_SIZES = (256, 512, 1024, 2048, 4096, 8192)
GPU_QUICK_SIZES = (256, 1024, 4096)
FULL_PAYLOADS = (2**10, 2**16, 2**20, 2**24)
QUICK_PAYLOADS = (2**8, 2**14, 2**18, 2**20)
FULL_OPERATOR_SIZES = ((8, 16), (32, 64), (128, 256), (512, 256), (1024, 512), (2048, 1024))
QUICK_OPERATOR_SIZES = ((8, 16), (64, 64), (256, 128))
"""(tokens, hidden) of the operator set."""
FULL_OPTIMIZER_SIZES = ((64, 64), (64, 2**14), (16, 2**16), (4, 2**20))
QUICK_OPTIMIZER_SIZES = ((32, 64), (32, 2**12), (2, 2**18))
"""(tensors, elements per tensor) of the optimizer steps."""
FULL_BLOCK_SIZES = ((64, 128), (192, 384), (512, 768))
QUICK_BLOCK_SIZES = ((64, 128), (192, 384))
"""(tokens, hidden) of the whole transformer blocks timed (heads of 64, MLP of 4 x hidden)."""
GPU_BLOCK_SIZES = ((4096, 1024), (4096, 2048), (8192, 2048), (2048, 4096))
GPU_QUICK_BLOCK_SIZES = ((4096, 2048), (2048, 4096))
"""The same on a GPU, at training sizes: at 1024 tokens x 1024 an H200 block is bound by
the host's kernel launches (8x its parts), which a step of many tokens is not."""
TIME_BUDGET_S = 1.0
"""Seconds one measurement may take beyond its first 3 samples (big products)."""
COLD_BYTES = 64 * 2**20
"""Operand bytes a product's timing cycles through (copies of its operands), so that, as
in a training step, its operands do not sit in the cache from the previous call."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("calibrate", help="measure this machine, write a profile")
    parser.add_argument("--out", default="tripar-cluster.json", metavar="FILE",
                        help="profile to write (default tripar-cluster.json)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats: seconds, rough numbers")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="what to measure (auto: cuda when available)")
    parser.add_argument("--dtype", default=None,
                        help="matmul dtype (default bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--devices-per-node", type=int, default=None, metavar="G",
                        help="devices (ranks) per node the profile describes "
                             "(default: GPUs present, else 2)")
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="memory per device in GB (default: device memory, or RAM / G)")
    parser.add_argument("--inter-bandwidth", type=float, default=1.25, metavar="GB/S",
                        help="assumed inter-node bandwidth per device (default 1.25 GB/s)")
    parser.add_argument("--inter-latency", type=float, default=50.0, metavar="US",
                        help="assumed inter-node latency in microseconds (default 50)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="process-group timeout in seconds (default 120)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.set_defaults(func=run)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def compute_clock(device: str):
    """The clock compute is timed with: on a CPU whose torch runs one thread, the process's
    CPU time (what the work costs on a core of its own: other processes on a shared machine
    do not inflate it); otherwise, and for anything that waits (links), the wall clock."""
    import torch

    if device == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def _timed(fn, device: str, repeats: int, *, clock=time.perf_counter) -> float:
    """Seconds per call on ``clock``: the least disturbed of ``repeats`` samples (fewer, but
    at least 3, once the samples took ``TIME_BUDGET_S``). On a GPU each sample launches 20
    calls back to back and synchronises once, so it times the kernels, not the
    launch-and-wait round trip."""
    inner = 20 if device == "cuda" else 1
    fn()  # warm-up
    _sync(device)
    times: list[float] = []
    for _ in range(repeats):
        if len(times) >= 3 and sum(times) * inner > TIME_BUDGET_S:
            break
        start = clock()
        for _ in range(inner):
            fn()
        _sync(device)
        times.append((clock() - start) / inner)
    return min(times)


def measure_matmul(device: str, dtype: str, sizes: tuple[int, ...], repeats: int) -> list[dict]:
    """Square and skinny products (m, k, n) at each size, as training runs them: the
    forward ``x (m, k) @ w.T`` and the backward's ``dy (m, n) @ w (n, k)`` and
    ``dy.T (n, m) @ x (m, k)``. ``seconds`` is their mean (a product's time averaged over
    forward and backward), which the efficiency curve is fitted to. Each call takes the
    next of enough copies of the operands to fill ``COLD_BYTES``: a layer's operands come
    from memory, not from the cache of an identical call just before."""
    import itertools

    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    width = torch.empty((), dtype=torch_dtype).element_size()
    samples = []
    for size in sizes:
        for m, k, n in ((size, size, size), (4 * size, size, size // 4 or 1)):
            copies = max(1, COLD_BYTES // ((m * k + n * k + m * n) * width))
            first = (torch.randn(m, k, device=device, dtype=torch_dtype),
                     torch.randn(n, k, device=device, dtype=torch_dtype),
                     torch.randn(m, n, device=device, dtype=torch_dtype))
            # copies of one random draw: as cold as fresh draws, at a copy's cost
            sets = [first] + [tuple(t.clone() for t in first) for _ in range(copies - 1)]

            def timed(product, sets=sets) -> float:
                cycle = itertools.cycle(sets)
                return _timed(lambda: product(*next(cycle)), device, repeats,
                              clock=compute_clock(device))

            forward = timed(lambda x, w, dy: torch.mm(x, w.t()))
            grad_input = timed(lambda x, w, dy: torch.mm(dy, w))
            grad_weight = timed(lambda x, w, dy: torch.mm(dy.t(), x))
            del sets
            seconds = (forward + grad_input + grad_weight) / 3
            samples.append({"m": m, "k": k, "n": n, "seconds": seconds,
                            "forward_seconds": forward,
                            "backward_seconds": grad_input + grad_weight,
                            "flops_per_s": 2.0 * m * k * n / seconds})
    return samples


def _operator_set():
    """A module of the operators a transformer layer runs besides its products (layer
    norms, head split and merge views, a scaled softmax, GELU, residual adds)."""
    import torch
    from torch import nn

    class OperatorSet(nn.Module):
        def __init__(self, hidden: int) -> None:
            super().__init__()
            self.heads = max(1, hidden // 64) if hidden >= 64 else 1
            self.ln_1, self.ln_2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, h = x.shape
            y = self.ln_1(x).view(b, t, self.heads, h // self.heads).transpose(1, 2)
            y = torch.softmax(y * 0.125, dim=-1).transpose(1, 2).contiguous().view(b, t, h)
            x = x + y
            return x + nn.functional.gelu(self.ln_2(x))

    return OperatorSet


def measure_operators(sizes: tuple[tuple[int, int], ...], repeats: int) -> list[dict]:
    """Forward + backward seconds of the operator set at each (tokens, hidden) on the
    CPU, with its operator count and saved bytes as tripar's graph analysis counts them."""
    import torch

    from tripar.graph import analyze

    operator_set = _operator_set()
    samples = []
    for tokens, hidden in sizes:
        module = operator_set(hidden)
        x = torch.randn(1, tokens, hidden)
        graph = analyze(module, (x,))
        x.requires_grad_(True)
        grad = torch.ones(1, tokens, hidden)
        seconds = _timed(lambda m=module, x=x, g=grad: m(x).backward(g), "cpu", repeats,
                         clock=compute_clock("cpu"))
        samples.append({"tokens": tokens, "hidden": hidden,
                        "ops": sum(b.ops for b in graph.blocks),
                        "saved_bytes": sum(b.saved_bytes for b in graph.blocks),
                        "seconds": seconds})
    return samples


def measure_optimizer(sizes: tuple[tuple[int, int], ...], repeats: int) -> list[dict]:
    """Seconds of one ``torch.optim.AdamW`` step (its defaults) over ``tensors`` parameter
    tensors of ``numel`` elements each, on the CPU."""
    import torch

    samples = []
    for tensors, numel in sizes:
        params = [torch.nn.Parameter(torch.randn(numel)) for _ in range(tensors)]
        for p in params:
            p.grad = torch.randn(numel)
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        seconds = _timed(optimizer.step, "cpu", repeats, clock=compute_clock("cpu"))
        samples.append({"tensors": tensors, "params": tensors * numel, "seconds": seconds})
    return samples


def _block_module(tokens: int, hidden: int):
    """A GPT block (heads of 64) for sequences of ``tokens``."""
    from tripar.models.gpt import Block, GPTConfig

    return Block(GPTConfig(layers=1, hidden=hidden, heads=max(1, hidden // 64), seq=tokens))


def _block(tokens: int, hidden: int):
    """A GPT block (heads of 64) and its proxy graph, captured and annotated like a model."""
    import torch

    from tripar.graph import analyze

    module = _block_module(tokens, hidden)
    return module, analyze(module, (torch.randn(1, tokens, hidden),))


def time_blocks(sizes: tuple[tuple[int, int], ...], repeats: int, device: str = "cpu",
                dtype: str = "fp32") -> list[tuple[float, float]]:
    """(forward, backward) seconds of a GPT block at each (tokens, hidden), batch 1, on
    ``device``: the least disturbed of the samples of each pass. On a GPU the block runs
    under autocast in ``dtype`` (as ``precision="bf16"`` runs it) and each pass is timed
    between synchronisations.

    As in a training step, each call takes the next of enough copies of the block (and
    its input) to fill ``COLD_BYTES``, so its weights come from memory, and its gradients
    accumulate into ``.grad``."""
    import contextlib
    import copy
    import itertools

    import torch

    low = canonical_dtype(dtype) in ("bf16", "fp16") and device == "cuda"
    autocast = (functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16
                                  if canonical_dtype(dtype) == "bf16" else torch.float16)
                if low else contextlib.nullcontext)
    times = []
    for tokens, hidden in sizes:
        module = _block_module(tokens, hidden).to(device)  # timed only: no graph analysis
        weights = sum(p.numel() * p.element_size() for p in module.parameters())
        copies = max(1, min(32, COLD_BYTES // max(1, weights)))
        pairs = [(copy.deepcopy(module),
                  torch.randn(1, tokens, hidden, device=device, requires_grad=True))
                 for _ in range(copies)]
        grad = torch.ones(1, tokens, hidden, device=device)
        for block, x in pairs:  # warm-up: every copy once, its .grad allocated
            with autocast():
                y = block(x)
            y.backward(grad)
        _sync(device)
        cycle = itertools.cycle(pairs)
        forward: list[float] = []
        backward: list[float] = []
        clock = compute_clock(device)
        for _ in range(max(3, repeats)):
            if len(forward) >= 3 and sum(forward) + sum(backward) > TIME_BUDGET_S:
                break
            block, x = next(cycle)
            start = clock()
            with autocast():
                y = block(x)
            _sync(device)
            middle = clock()
            y.backward(grad)
            _sync(device)
            end = clock()
            forward.append(middle - start)
            backward.append(end - middle)
        del pairs
        times.append((min(forward), min(backward)))
    return times


def measure_blocks(sizes: tuple[tuple[int, int], ...], repeats: int,
                   cluster: Cluster, device: str = "cpu", dtype: str = "fp32") -> list[dict]:
    """``time_blocks`` beside what ``cluster``'s component model predicts for each block
    (``model_forward_seconds``, ``model_backward_seconds``: ``block_costs`` of the block's
    own proxy graph)."""
    from tripar.partitioner import block_costs
    from tripar.plan.config import ParallelConfig

    one = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=1, num_microbatches=1)
    samples = []
    timed = time_blocks(sizes, repeats, device, dtype)
    for (tokens, hidden), (forward, backward) in zip(sizes, timed):
        costs = block_costs(_block(tokens, hidden)[1], cluster, one, dtype=dtype)
        samples.append({"tokens": tokens, "hidden": hidden,
                        "forward_seconds": forward, "backward_seconds": backward,
                        "model_forward_seconds": sum(c.forward_s for c in costs),
                        "model_backward_seconds": sum(c.backward_input_s + c.backward_weight_s
                                                      for c in costs)})
    return samples


def fit_block_scales(samples: list[dict]) -> tuple[float, float]:
    """Fit ``measured = scale x modelled`` for the forward and the backward of whole blocks,
    least squares on relative errors; returns (block_forward, block_backward).

    >>> rows = [{"forward_seconds": 1.2 * f, "model_forward_seconds": f,
    ...          "backward_seconds": 1.3 * 2 * f, "model_backward_seconds": 2 * f}
    ...         for f in (1e-4, 1e-3, 1e-2)]
    >>> [round(x, 6) for x in fit_block_scales(rows)]
    [1.2, 1.3]
    """
    rows = [s for s in samples if min(s["forward_seconds"], s["backward_seconds"],
                                      s["model_forward_seconds"],
                                      s["model_backward_seconds"]) > 0]
    if not rows:
        raise ConfigError(f"need at least 1 timed block with positive times to fit, got "
                          f"{len(samples)} samples and none usable")

    def scale(measured: str, modelled: str) -> float:
        # minimise sum (a m_i / t_i - 1)^2 over a
        ratios = [r[modelled] / r[measured] for r in rows]
        return sum(ratios) / sum(q * q for q in ratios)

    return (scale("forward_seconds", "model_forward_seconds"),
            scale("backward_seconds", "model_backward_seconds"))


def fit_node_sharing(solo: list[tuple[float, float]],
                     shared: list[tuple[float, float]]) -> float:
    """Fit ``shared = factor x solo`` over the (forward, backward) seconds of blocks timed
    alone and while another process ran the same blocks (least squares on relative
    errors); at least 1, since sharing a node never makes a block faster (less is noise).

    >>> fit_node_sharing([(1e-3, 2e-3), (0.1, 0.2)], [(1.1e-3, 2.2e-3), (0.11, 0.22)])
    1.1
    >>> fit_node_sharing([(1e-3, 2e-3)], [(0.9e-3, 1.9e-3)])
    1.0
    """
    ratios = [a / b for pair_a, pair_b in zip(solo, shared) for a, b in zip(pair_a, pair_b)
              if a > 0 and b > 0]
    if not ratios:
        raise ConfigError(f"need at least 1 block timed alone and shared to fit, got "
                          f"{len(solo)} and {len(shared)}")
    return max(1.0, round(sum(ratios) / sum(r * r for r in ratios), 12))


def _fit_two(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares of ``a u + c v = t`` on relative errors, ``a, c >= 0``: (a, c)."""
    def alone(i: int) -> tuple[float, float]:
        num = sum(r[i] / r[2] for r in rows)
        den = sum((r[i] / r[2]) ** 2 for r in rows)
        return (num / den if den else 0.0), sum(
            (r[i] * (num / den if den else 0.0) / r[2] - 1) ** 2 for r in rows)

    suu = sum((u / t) ** 2 for u, _, t in rows)
    svv = sum((v / t) ** 2 for _, v, t in rows)
    suv = sum(u * v / t**2 for u, v, t in rows)
    su, sv = sum(u / t for u, _, t in rows), sum(v / t for _, v, t in rows)
    det = suu * svv - suv * suv
    if det > 0:
        a, c = (su * svv - sv * suv) / det, (sv * suu - su * suv) / det
        if a >= 0 and c >= 0:
            return a, c
    (a, error_a), (c, error_c) = alone(0), alone(1)
    return (a, 0.0) if error_a <= error_c else (0.0, c)


def fit_operator_times(samples: list[dict], bandwidth: float) -> tuple[float, float]:
    """Fit ``seconds = 2 ops op_s + 3 traffic saved_bytes / bandwidth`` (a forward and a
    backward pass, the backward moving twice the forward's bytes); returns
    (op_s, traffic).

    >>> rows = [{"ops": 12, "saved_bytes": b, "seconds": 24 * 5e-6 + 3 * 4 * b / 1e10}
    ...         for b in (1e3, 1e5, 1e7)]
    >>> op_s, traffic = fit_operator_times(rows, 1e10)
    >>> round(op_s * 1e6, 3), round(traffic, 3)
    (5.0, 4.0)
    """
    if len(samples) < 2:
        raise ConfigError(f"need at least 2 timed operator sets to fit, got {len(samples)}")
    return _fit_two([(2.0 * s["ops"], 3.0 * s["saved_bytes"] / bandwidth, s["seconds"])
                     for s in samples if s["seconds"] > 0])


def fit_optimizer_times(samples: list[dict], bandwidth: float) -> tuple[float, float]:
    """Fit ``seconds = tensors x tensor_s + params x bytes / bandwidth``; returns
    (tensor_s, bytes per parameter).

    >>> rows = [{"tensors": n, "params": n * e, "seconds": n * 2e-5 + n * e * 60 / 1e10}
    ...         for n, e in ((64, 64), (4, 2**20), (16, 2**16))]
    >>> tensor_s, per_param = fit_optimizer_times(rows, 1e10)
    >>> round(tensor_s * 1e6, 3), round(per_param, 3)
    (20.0, 60.0)
    """
    if len(samples) < 2:
        raise ConfigError(f"need at least 2 timed optimizer steps to fit, got {len(samples)}")
    tensor_s, per_param_s = _fit_two([(float(s["tensors"]), float(s["params"]), s["seconds"])
                                      for s in samples if s["seconds"] > 0])
    return tensor_s, per_param_s * bandwidth


def measure_memory_bandwidth(device: str, quick: bool, repeats: int) -> float:
    """Bytes/s of a large copy (read + write)."""
    import torch

    elements = (2**22 if quick else 2**25) * (8 if device == "cuda" else 1)
    src = torch.ones(elements, device=device)
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), device, repeats, clock=compute_clock(device))
    return 2.0 * src.numel() * src.element_size() / seconds


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _comm_worker(rank: int, world: int, port: int, timeout_s: float, payloads: list[int],
                 repeats: int, out_path: str, block_sizes: list, threads: int) -> None:
    import torch
    import torch.distributed as dist

    # flat-tensor collectives under their current names (torch 2.13 deprecates the older)
    all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter_flat = (getattr(dist, "reduce_scatter_single", None)
                           or dist.reduce_scatter_tensor)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        results = {"p2p": [], "all_reduce": [], "all_gather": [], "reduce_scatter": []}
        for payload in payloads:
            buf = torch.zeros(max(world, payload // 4 // world * world), dtype=torch.float32)
            part = torch.zeros(buf.numel() // world, dtype=torch.float32)

            def ping_pong(buf=buf) -> None:
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)

            def all_reduce(buf=buf) -> None:
                dist.all_reduce(buf)

            def all_gather(buf=buf, part=part) -> None:
                all_gather_flat(buf, part)

            def reduce_scatter(buf=buf, part=part) -> None:
                reduce_scatter_flat(part, buf)

            dist.barrier()
            one_way = _timed(ping_pong, "cpu", repeats) / 2
            results["p2p"].append({"bytes": buf.numel() * 4, "seconds": one_way})
            for name, collective in (("all_reduce", all_reduce), ("all_gather", all_gather),
                                     ("reduce_scatter", reduce_scatter)):
                dist.barrier()  # bytes: the whole buffer (gathered, or to scatter)
                results[name].append({"bytes": buf.numel() * 4,
                                      "seconds": _timed(collective, "cpu", repeats)})
        if block_sizes:  # every process computes at once, as a node's pipeline stages do
            torch.set_num_threads(threads)
            dist.barrier()
            results["shared_blocks"] = time_blocks(tuple(map(tuple, block_sizes)), repeats)
            dist.barrier()
        if rank == 0:
            Path(out_path).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def measure_links(payloads: tuple[int, ...], repeats: int, timeout_s: float,
                  block_sizes: tuple[tuple[int, int], ...] = ()) -> dict:
    """gloo p2p (one way), all-reduce, all-gather and reduce-scatter times between 2 local
    processes; with ``block_sizes``, also ``shared_blocks``: ``time_blocks`` in one process
    while the other runs the same blocks (they share the caches and the memory bandwidth)."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "links.json")
        mp.start_processes(_comm_worker, args=(2, _free_port(), timeout_s, list(payloads),
                                               repeats, out, list(block_sizes),
                                               torch.get_num_threads()),
                           nprocs=2, join=True, start_method="spawn")
        return json.loads(Path(out).read_text())


def fit_alpha_beta(samples: list[dict]) -> tuple[float, float]:
    """Least-squares ``seconds = alpha + bytes / beta``; returns (alpha s, beta B/s).

    >>> fit_alpha_beta([{"bytes": 0, "seconds": 1e-5}, {"bytes": 1e9, "seconds": 1.00001}])
    (1e-05, 1000000000.0)
    """
    xs = [s["bytes"] for s in samples]
    ys = [s["seconds"] for s in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else 0.0
    if slope <= 0:  # noise: fall back to the largest transfer
        big = max(samples, key=lambda s: s["bytes"])
        slope = big["seconds"] / max(big["bytes"], 1)
    alpha = max(0.0, mean_y - slope * mean_x)
    return round(alpha, 12), round(1.0 / slope, 3)


def calibrate(*, quick: bool, device: str, dtype: str | None, devices_per_node: int | None,
              memory_gb: float | None, inter_bandwidth: float, inter_latency: float,
              timeout_s: float) -> Cluster:
    """Measure this machine and return its profile (one node)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device; use --device cpu")
    dtype = canonical_dtype(dtype or ("bf16" if device == "cuda" else "fp32"))
    repeats = 3 if quick else 10
    if device == "cuda":
        sizes = GPU_QUICK_SIZES if quick else GPU_SIZES
    else:
        sizes = QUICK_SIZES if quick else FULL_SIZES
    matmuls = measure_matmul(device, dtype, sizes, repeats)
    # seconds = flops / (peak x / (x + x_half)) + launch: the peak is the curve's asymptote.
    peak, x_half, launch = fit_matmul_times(
        [(s["m"], s["k"], s["n"], s["seconds"]) for s in matmuls])
    bandwidth = measure_memory_bandwidth(device, quick, repeats)
    shipped = load_calibration()["efficiency"]["cpu" if device == "cpu" else "gpu"]
    host: dict = {}
    if device == "cpu":
        operators = measure_operators(QUICK_OPERATOR_SIZES if quick else FULL_OPERATOR_SIZES,
                                      repeats)
        steps = measure_optimizer(QUICK_OPTIMIZER_SIZES if quick else FULL_OPTIMIZER_SIZES,
                                  repeats)
        op_s, traffic = fit_operator_times(operators, bandwidth)
        tensor_s, optimizer_bytes = fit_optimizer_times(steps, bandwidth)
        overheads = {"op_s": op_s, "memory_traffic": traffic, "optimizer_tensor_s": tensor_s,
                     "optimizer_bytes": optimizer_bytes}
        host = {"operators": operators, "optimizer": steps}
        block_sizes = QUICK_BLOCK_SIZES if quick else FULL_BLOCK_SIZES
    else:  # launches overlap the kernels: the GPU defaults for the parts
        overheads = {"memory_traffic": shipped["memory_traffic"]}
        block_sizes = GPU_QUICK_BLOCK_SIZES if quick else GPU_BLOCK_SIZES
    # Whole blocks against the components just fitted (1-device cluster, scales 1): what a
    # real layer costs beyond its parts (attention's kernel, norms, bias gradients, ...).
    parts = Cluster(
        device=DeviceSpec(name=device, peak_flops=((dtype, peak),), memory_bytes=2**40,
                          memory_bandwidth=bandwidth, default_dtype=dtype,
                          efficiency=Efficiency(matmul_max=1.0, matmul_half=x_half,
                                                memory=1.0, launch_s=launch, **overheads)),
        nodes=1, devices_per_node=1, intra_bandwidth=1e9, intra_latency=0.0,
        inter_bandwidth=1e9, inter_latency=0.0)
    host["blocks"] = measure_blocks(block_sizes, repeats, parts, device, dtype)
    block_forward, block_backward = fit_block_scales(host["blocks"])
    overheads.update(block_forward=block_forward, block_backward=block_backward)
    links = measure_links(QUICK_PAYLOADS if quick else FULL_PAYLOADS, repeats, timeout_s,
                          block_sizes if device == "cpu" else ())
    if device == "cpu":
        shared = [tuple(pair) for pair in links["shared_blocks"]]
        overheads["node_sharing"] = fit_node_sharing(
            [(b["forward_seconds"], b["backward_seconds"]) for b in host["blocks"]], shared)
        for sample, (forward, backward) in zip(host["blocks"], shared):
            sample.update(shared_forward_seconds=forward, shared_backward_seconds=backward)
    p2p_alpha, p2p_beta = fit_alpha_beta(links["p2p"])
    # 2 ranks: all-reduce = 2 alpha + M / beta_bus; its bandwidth over the p2p one is the
    # fraction of the link collectives reach.
    ar_alpha, ar_beta = fit_alpha_beta(links["all_reduce"])
    link_eff = min(1.0, max(0.05, ar_beta / p2p_beta))
    # all-gather and reduce-scatter: alpha + (M / 2) / (beta x fraction) on 2 ranks
    halves = {name: fit_alpha_beta(links[name]) for name in ("all_gather", "reduce_scatter")}
    overheads.update({f"link_{name}": min(1.0, max(0.01, beta / (2 * p2p_beta)))
                      for name, (_, beta) in halves.items()})

    if device == "cuda":
        per_node = devices_per_node or torch.cuda.device_count()
        memory = int(memory_gb * 1e9) if memory_gb else torch.cuda.get_device_properties(
            0).total_memory
        name = torch.cuda.get_device_name(0)
    else:
        per_node = devices_per_node or 2
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory = int(memory_gb * 1e9) if memory_gb else total // per_node
        name = "cpu (measured)"
    efficiency = Efficiency(matmul_max=1.0, matmul_half=x_half, memory=1.0, link=link_eff,
                            launch_s=launch, **overheads,
                            source=f"tripar calibrate{' --quick' if quick else ''} on "
                                   f"{socket.gethostname()}")
    spec = DeviceSpec(name=name, peak_flops=((dtype, peak),), memory_bytes=memory,
                      memory_bandwidth=bandwidth, efficiency=efficiency, default_dtype=dtype)
    measured = {"dtype": dtype, "matmul": matmuls, "memory_bandwidth": bandwidth,
                **host, "p2p": links["p2p"], "all_reduce": links["all_reduce"],
                "all_gather": links["all_gather"], "reduce_scatter": links["reduce_scatter"],
                "p2p_alpha_beta": [p2p_alpha, p2p_beta],
                "all_reduce_alpha_beta": [ar_alpha, ar_beta],
                **{f"{name}_alpha_beta": list(fit) for name, fit in halves.items()},
                "inter_node": "assumed (--inter-bandwidth/--inter-latency), not measured"}
    return Cluster(device=spec, nodes=1, devices_per_node=per_node,
                   intra_bandwidth=p2p_beta, intra_latency=p2p_alpha,
                   inter_bandwidth=inter_bandwidth * 1e9, inter_latency=inter_latency * 1e-6,
                   name=f"{name} x{per_node} (calibrated)", measured=measured)


def run(args: argparse.Namespace) -> int:
    if args.devices_per_node is not None and args.devices_per_node < 1:
        raise ConfigError(f"--devices-per-node must be >= 1, got {args.devices_per_node}")
    cluster = calibrate(quick=args.quick, device=args.device, dtype=args.dtype,
                        devices_per_node=args.devices_per_node, memory_gb=args.memory_gb,
                        inter_bandwidth=args.inter_bandwidth, inter_latency=args.inter_latency,
                        timeout_s=args.timeout)
    cluster.to_file(args.out)
    if args.format == "json":
        print(json.dumps(cluster.to_dict()))
        return 0
    _print_summary(cluster, args.out)
    return 0


def _print_summary(cluster: Cluster, path: str) -> None:
    from rich.console import Console
    from rich.table import Table

    spec, eff = cluster.device, cluster.device.efficiency
    table = Table(title=f"calibrated: {cluster.name}")
    table.add_column("matmul (m, k, n)")
    table.add_column("GFLOP/s", justify="right")
    table.add_column("fitted", justify="right")
    peak = spec.peak(spec.default_dtype)
    for sample in cluster.measured["matmul"]:
        m, k, n = sample["m"], sample["k"], sample["n"]
        flops = 2.0 * m * k * n
        fitted = flops / (flops / (peak * eff.matmul(m, k, n)) + eff.launch_s)
        table.add_row(f"{m} x {k} x {n}", f"{sample['flops_per_s'] / 1e9:.1f}",
                      f"{fitted / 1e9:.1f}")
    console = Console()
    console.print(table)
    console.print(
        f"fitted peak {peak / 1e9:.1f} GFLOP/s ({spec.default_dtype}), x_half="
        f"{eff.matmul_half:.1f}, {eff.launch_s * 1e6:.1f} us per product\n"
        f"memory bandwidth {spec.memory_bandwidth / 1e9:.2f} GB/s\n"
        f"per operator and pass {eff.op_s * 1e6:.1f} us, memory traffic "
        f"{eff.memory_traffic:.2f} x saved bytes; optimizer step {eff.optimizer_bytes:.0f} "
        f"B per parameter + {eff.optimizer_tensor_s * 1e6:.1f} us per tensor\n"
        f"whole blocks: measured / component model {eff.block_forward:.2f} forward, "
        f"{eff.block_backward:.2f} backward; x {eff.node_sharing:.2f} with 2 processes "
        f"computing at once\n"
        f"gloo p2p: latency {cluster.intra_latency * 1e6:.1f} us, bandwidth "
        f"{cluster.intra_bandwidth / 1e9:.2f} GB/s; all-reduce reaches {eff.link:.2f} of it, "
        f"all-gather {eff.link_all_gather or eff.link:.2f}, reduce-scatter "
        f"{eff.link_reduce_scatter or eff.link:.2f}\n"
        f"inter-node link assumed: {cluster.inter_bandwidth / 1e9:.2f} GB/s, "
        f"{cluster.inter_latency * 1e6:.0f} us\n"
        f"wrote {path} (use it with --cluster {path})")
