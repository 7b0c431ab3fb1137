"""Measured on this machine: tripar's pipeline runtime against torch.distributed.pipelining.

Two local CPU processes (gloo, one compute thread each) train the zoo ``gpt`` on the
shipped corpus (``tripar.data``). Every system trains the same model from the same
initial weights on the same global batches, split into the same microbatches:

- ``tripar <schedule>``: ``tripar.auto_parallel`` with ``pp=2``, ``dp=1``, the schedule,
  the recomputation and the number of microbatches pinned (the planner picks the stage
  split on the calibrated CPU profile); timed through ``ParallelModel.train_step``.
- ``torch <schedule>``: ``torch.distributed.pipelining`` (``PipelineStage`` with
  ``ScheduleGPipe`` / ``Schedule1F1B``) on deep copies of the very stage modules tripar
  built for that schedule, so only the runtime differs; after the schedule's step the
  tied embedding / LM-head replicas' gradients are summed with one all-reduce (what
  tripar's runtime does) and the same AdamW steps.
- ``tripar chimera``: the same two processes as two pipelines in opposite directions
  (Chimera): each holds both stages, runs half the microbatches through each, and the
  two replicas' gradients are summed (an all-reduce of the whole model) before the step.
- ``tripar tp=2`` and ``tripar tp=2 tp-overlap=2``: the two processes as one
  tensor-parallel group (pp=1) on microbatches of two samples (half as many), each
  microbatch whole, or as two parts of one sample whose all-reduces overlap the other
  part's compute (Merak's sub-pipelined tensor parallelism).
- ``single``: the unsplit model in one process (rank 0; rank 1 waits), the same
  microbatches with gradient accumulation, the same AdamW.

Systems are interleaved: each round runs one step of every system, in an order that
rotates from round to round, each step bracketed by barriers, so that machine noise
hits them alike; medians over rounds are reported (after warm-up rounds). Each tripar
plan's step time is also predicted by the simulator (``step_estimate``) on the
calibrated profile (``tripar calibrate --out benchmarks/results/cpu_profile.json``).

    python benchmarks/pipeline_vs_torch.py [--quick] [--calibrate] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = RESULTS / "cpu_profile.json"

TRIPAR_SYSTEMS = {
    # name: (schedule, recompute)
    "tripar 1f1b": ("1f1b", "none"),
    "tripar gpipe": ("gpipe", "none"),
    "tripar scp stage-aware": ("scp", "stage-aware"),
    "tripar 1f1b full-recompute": ("1f1b", "full"),
    "tripar chimera": ("chimera", "none"),
    "tripar tp=2": ("1f1b", "none"),
    "tripar tp=2 tp-overlap=2": ("1f1b", "none"),
}
TENSOR_PARALLEL = {"tripar tp=2": 1, "tripar tp=2 tp-overlap=2": 2}
"""Systems run with tp=2 (pp=1) on microbatches of two samples: name -> tp_overlap."""
TORCH_SYSTEMS = {"torch 1f1b": "tripar 1f1b", "torch gpipe": "tripar gpipe"}
"""torch system -> the tripar system whose stage modules it runs."""


@dataclass(frozen=True, slots=True)
class MeasureConfig:
    """What to measure; every field is the same for every system."""

    layers: int = 8
    hidden: int = 256
    heads: int = 4
    seq: int = 128
    micro_batch_size: int = 1
    num_microbatches: int = 4
    rounds: int = 12
    """Timed rounds (one step of every system per round)."""
    warmup: int = 2
    """Untimed rounds first."""
    profile: str = str(PROFILE)
    """Calibrated cluster profile (``tripar calibrate``) for the planner and simulator."""
    systems: tuple[str, ...] = ("single", *TRIPAR_SYSTEMS, *TORCH_SYSTEMS)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.num_microbatches

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq


QUICK = MeasureConfig(layers=8, hidden=128, heads=4, seq=64, micro_batch_size=1,
                      num_microbatches=4, rounds=3, warmup=1)


@dataclass(frozen=True, slots=True)
class SystemResult:
    """One system's measured steps (rank 0's wall time between barriers)."""

    name: str
    step_s: tuple[float, ...]
    losses: tuple[float, ...]
    tokens: int
    predicted_s: float | None = None
    """The simulator's step time for this configuration on the calibrated profile."""
    plan: str = ""
    """Stage split and schedule, for tripar systems and the torch runs of their modules."""
    cpu_s: tuple[float, ...] = ()
    """Per step, the busiest rank's CPU seconds (``time.process_time``): what the step
    cost when no other process took the cores (wall time includes waiting for them)."""

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_s) if self.cpu_s else float("nan")

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.median_s

    @property
    def spread(self) -> float:
        """Interquartile range over the median (0.0 with fewer than 4 samples)."""
        if len(self.step_s) < 4:
            return 0.0
        q = statistics.quantiles(self.step_s, n=4)
        return (q[2] - q[0]) / self.median_s


@dataclass(frozen=True, slots=True)
class Measurement:
    """Everything one run measured."""

    config: MeasureConfig
    systems: tuple[SystemResult, ...]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    wall_s: float
    cpu: str = ""
    torch_version: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def get(self, name: str) -> SystemResult:
        return next(s for s in self.systems if s.name == name)

    @property
    def ideal_tokens_per_s(self) -> float:
        """2 x single-process tokens/s x m / (m + 1): two stages, 1F1B's bubble, no overhead."""
        m = self.config.num_microbatches
        return 2 * self.get("single").tokens_per_s * m / (m + 1)

    def to_dict(self) -> dict:
        return {"config": asdict(self.config),
                "systems": [{**asdict(s), "median_s": s.median_s,
                             "tokens_per_s": s.tokens_per_s} for s in self.systems],
                "load_before": self.load_before, "load_after": self.load_after,
                "wall_s": self.wall_s, "cpu": self.cpu, "torch_version": self.torch_version,
                "notes": list(self.notes)}

    @staticmethod
    def from_dict(d: dict) -> Measurement:
        cfg = MeasureConfig(**{**d["config"], "systems": tuple(d["config"]["systems"])})
        systems = tuple(SystemResult(s["name"], tuple(s["step_s"]), tuple(s["losses"]),
                                     s["tokens"], s["predicted_s"], s["plan"],
                                     tuple(s.get("cpu_s", ())))
                        for s in d["systems"])
        return Measurement(cfg, systems, tuple(d["load_before"]), tuple(d["load_after"]),
                           d["wall_s"], d.get("cpu", ""), d.get("torch_version", ""),
                           tuple(d.get("notes", ())))


# ---- one rank ------------------------------------------------------------------------------

def _spec(cfg: MeasureConfig, vocab: int) -> str:
    return (f"gpt:layers={cfg.layers},hidden={cfg.hidden},heads={cfg.heads},vocab={vocab},"
            f"seq={cfg.seq}")


def _loss(out, mb):
    import torch.nn.functional as F

    return F.cross_entropy(out.reshape(-1, out.shape[-1]), mb[1].reshape(-1))


def _target_loss(out, target):
    import torch.nn.functional as F

    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def _describe(plan) -> str:
    par = plan.parallel
    cuts = " | ".join(f"{s.blocks[0]}..{s.blocks[-1]}" for s in plan.stages)
    recompute = [",".join(s.recompute) or "-" for s in plan.stages]
    tp = f"tp={par.tp} tp_overlap={par.tp_overlap} " if par.tp > 1 else ""
    return (f"{tp}{par.schedule} recompute={par.recompute} m={par.num_microbatches} "
            f"b={par.micro_batch_size}; stages [{cuts}]; recomputed per stage {recompute}")


def _boundaries(plan, graph) -> list[int]:
    index = {b.name: i for i, b in enumerate(graph.blocks)}
    return [index[s.blocks[0]] for s in plan.stages]


class _Single:
    """The unsplit model, gradient accumulation over the microbatches, AdamW."""

    def __init__(self, model, m: int) -> None:
        import torch

        self.model = copy.deepcopy(model)
        self.m = m
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)

    def step(self, batch) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for ids, targets in zip(batch[0].chunk(self.m), batch[1].chunk(self.m)):
            loss = _target_loss(self.model(ids), targets) / self.m
            loss.backward()
            total += float(loss.detach())
        self.optimizer.step()
        return total


class _TorchPipeline:
    """torch.distributed.pipelining on copies of tripar's stage modules of one plan."""

    def __init__(self, pm, schedule: str, m: int) -> None:
        import torch
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        (program,) = pm.programs
        original = program.module
        self.module = copy.deepcopy(original)
        by_id = {id(p): name for name, p in original.named_parameters()}
        copies = dict(self.module.named_parameters())
        self.tied = [copies[by_id[id(p)]] for p in pm.tied.parameters]
        self.batch_inputs = program.batch_inputs
        rank, num = pm.mesh.coords.pp, pm.mesh.pp
        self.first, self.last = rank == 0, rank == num - 1
        assert self.first == (self.batch_inputs == (0,)) and (self.first or not
                                                              self.batch_inputs), \
            f"stage {rank} reads batch fields {self.batch_inputs}; expected stage 0 ids only"
        stage = PipelineStage(self.module, rank, num, torch.device("cpu"),
                              group=dist.group.WORLD)
        kind = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[schedule]
        self.schedule = kind(stage, n_microbatches=m, loss_fn=_target_loss)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-3)

    def step(self, batch) -> float:
        import torch
        import torch.distributed as dist

        self.optimizer.zero_grad(set_to_none=True)
        losses: list = []
        args = (batch[0],) if self.first else ()
        kwargs = {"target": batch[1], "losses": losses} if self.last else {}
        self.schedule.step(*args, **kwargs)
        for p in self.tied:  # the tied embedding / LM head: sum the replicas' gradients
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        self.optimizer.step()
        total = torch.tensor(float(sum(float(x.detach()) for x in losses) / len(losses))
                             if losses else 0.0)
        dist.all_reduce(total)  # the loss lives on the last stage; every rank returns it
        return float(total)


def _rank_main(cfg: MeasureConfig) -> dict:
    """Runs on each of the 2 ranks; rank 0 returns the timings."""
    import torch
    import torch.distributed as dist

    from tripar.api import auto_parallel, capture_model
    from tripar.data import CharTokenizer, TextBatches, corpus
    from tripar.models.spec import load_model
    from tripar.partitioner import step_estimate
    from tripar.partitioner.hardware import Cluster
    from tripar.plan.config import ParallelConfig

    rank = dist.get_rank()
    text = corpus(2000, seed=0)
    tok = CharTokenizer.from_text(text)
    data = TextBatches(tok.encode(text), cfg.global_batch, cfg.seq, seed=1)
    loaded = load_model(_spec(cfg, tok.vocab_size), batch_size=cfg.global_batch, seed=0)
    model = loaded.model
    example = data.batch(0)
    captured = capture_model(model, (example[0],))
    cluster = Cluster.from_file(cfg.profile)
    m = cfg.num_microbatches

    steppers, predicted, plans = {}, {}, {}
    for name in cfg.systems:
        if name in TRIPAR_SYSTEMS:
            schedule, recompute = TRIPAR_SYSTEMS[name]
            if name in TENSOR_PARALLEL:  # the plan's own estimate prices its regions
                pm = auto_parallel(model, cluster=cluster, example_inputs=(example[0],),
                                   loss_fn=_loss, captured=captured, pp=1, tp=2, dp=1,
                                   num_microbatches=max(1, m // 2), schedule=schedule,
                                   recompute=recompute, tp_overlap=TENSOR_PARALLEL[name],
                                   global_batch_size=cfg.global_batch, sp=False)
                steppers[name] = pm
                plans[name] = _describe(pm.plan)
                predicted[name] = pm.plan.estimate.step_time_s
                continue
            pm = auto_parallel(model, cluster=cluster, example_inputs=(example[0],),
                               loss_fn=_loss, captured=captured, pp=2, dp=1,
                               num_microbatches=m, schedule=schedule, recompute=recompute,
                               global_batch_size=cfg.global_batch)
            steppers[name] = pm
            plans[name] = _describe(pm.plan)
            est = step_estimate(captured.graph, cluster, pm.plan.parallel,
                                _boundaries(pm.plan, captured.graph),
                                recompute=recompute, record_timeline=False)
            predicted[name] = est.step_time_s
    for name in cfg.systems:
        if name in TORCH_SYSTEMS:
            source = steppers[TORCH_SYSTEMS[name]]
            steppers[name] = _TorchPipeline(source, TRIPAR_SYSTEMS[TORCH_SYSTEMS[name]][0], m)
            plans[name] = plans[TORCH_SYSTEMS[name]]
        elif name == "single":
            steppers[name] = _Single(model, m) if rank == 0 else None
            single = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=cfg.micro_batch_size,
                                    num_microbatches=m, schedule="1f1b")
            predicted[name] = step_estimate(captured.graph, cluster, single,
                                            record_timeline=False).step_time_s
            plans[name] = f"one process, {m} microbatches accumulated"

    times: dict[str, list[float]] = {n: [] for n in cfg.systems}
    cpu: dict[str, list[float]] = {n: [] for n in cfg.systems}
    losses: dict[str, list[float]] = {n: [] for n in cfg.systems}
    names = list(cfg.systems)
    for r in range(cfg.warmup + cfg.rounds):
        batch = data.batch(r)
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            stepper = steppers[name]
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            if name == "single":
                loss = stepper.step(batch) if stepper is not None else float("nan")
            elif name in TRIPAR_SYSTEMS:
                loss = stepper.train_step(batch)
            else:
                loss = stepper.step(batch)
            used = time.process_time() - start_cpu
            dist.barrier()
            elapsed = time.perf_counter() - start
            if r >= cfg.warmup:
                times[name].append(elapsed)
                cpu[name].append(used)
            losses[name].append(loss)
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, cpu)
    if rank != 0:
        return {}
    busiest = {n: [max(rc[n][i] for rc in per_rank) for i in range(len(cpu[n]))]
               for n in names}
    return {"systems": [{"name": n, "step_s": times[n], "losses": losses[n],
                         "tokens": cfg.tokens_per_step, "predicted_s": predicted.get(n),
                         "plan": plans.get(n, ""), "cpu_s": busiest[n]} for n in names],
            "torch_version": torch.__version__}


def measure(cfg: MeasureConfig, *, timeout_s: float = 900.0) -> Measurement:
    """Run every system of ``cfg`` on 2 local gloo processes; rank 0's timings."""
    from tripar.runtime.launch import launch_local

    if not Path(cfg.profile).exists():
        raise FileNotFoundError(f"no CPU profile at {cfg.profile}; run `tripar calibrate "
                                f"--out {cfg.profile}` first")
    load_before = os.getloadavg()
    start = time.perf_counter()
    out = launch_local(_rank_main, 2, cfg, timeout_s=timeout_s)[0]
    wall = time.perf_counter() - start
    systems = tuple(SystemResult(s["name"], tuple(s["step_s"]), tuple(s["losses"]),
                                 s["tokens"], s["predicted_s"], s["plan"], tuple(s["cpu_s"]))
                    for s in out["systems"])
    return Measurement(cfg, systems, load_before, os.getloadavg(), wall, _cpu_name(),
                       out["torch_version"])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


# ---- where the cost model is off: one transformer block, op by op -------------------------

@dataclass(frozen=True, slots=True)
class BlockCheck:
    """One ``gpt`` block (one microbatch) measured op by op in this process (one thread)
    against the cost model's BlockCost on the calibrated profile; milliseconds."""

    measured_forward_ms: float
    measured_backward_ms: float
    """B + W."""
    matmul_ms: float
    """Forward + backward time in matrix products (``aten::mm``, ``addmm``, ``bmm``)."""
    attention_ms: float
    """Forward + backward time in the attention kernel (``scaled_dot_product_*``)."""
    other_ms: float
    """Everything else: elementwise, norms, GELU, autograd and Python overhead."""
    model_forward_ms: float
    model_backward_ms: float
    model_product_ms: float
    """The cost model's time for the products and attention (fwd + bwd): its total less
    ``model_memory_ms``."""
    model_memory_ms: float
    """The cost model's time for everything else (fwd + bwd): the memory-bound term
    ``3 x traffic x saved / bandwidth`` plus ``2 x op_s x ops``, each pass scaled by the
    profile's ``block_forward`` / ``block_backward``."""


def block_check(cfg: MeasureConfig, repeats: int = 10) -> BlockCheck:
    """Measure one block of ``cfg``'s model and cost it (runs in the calling process)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tripar.api import capture_model
    from tripar.models.spec import load_model
    from tripar.partitioner import block_costs
    from tripar.partitioner.hardware import Cluster
    from tripar.plan.config import ParallelConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model(_spec(cfg, 64), batch_size=cfg.micro_batch_size)
        captured = capture_model(loaded.model, (loaded.example_inputs[0],))
        cluster = Cluster.from_file(cfg.profile)
        one = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=cfg.micro_batch_size,
                             num_microbatches=1)
        names = [b.name for b in captured.graph.blocks]
        block = captured.graph.blocks[names.index("blocks.0")]
        cost = block_costs(captured.graph, cluster, one)[names.index("blocks.0")]
        spec = cluster.device
        eff = spec.efficiency
        rate = spec.memory_bandwidth * eff.memory
        memory = eff.memory_traffic * cost.saved_bytes / rate  # one forward's bytes
        # forward: bytes + op_s per operator; backward twice the bytes + op_s per operator;
        # each pass scaled as the cost model scales it (block_forward / block_backward)
        memory_ms = (eff.block_forward * (memory + eff.op_s * block.ops)
                     + eff.block_backward * (2 * memory + eff.op_s * block.ops)) * 1e3
        model_ms = (cost.forward_s + cost.backward_input_s + cost.backward_weight_s) * 1e3
        products_ms = model_ms - memory_ms
        module = loaded.model.blocks[0]
        x = torch.randn(cfg.micro_batch_size, cfg.seq, cfg.hidden, requires_grad=True)
        forward, backward = [], []
        for i in range(repeats + 2):
            start = time.process_time()
            y = module(x)
            mid = time.process_time()
            y.backward(torch.ones_like(y))
            end = time.process_time()
            if i >= 2:
                forward.append(mid - start)
                backward.append(end - mid)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                y = module(x)
                y.backward(torch.ones_like(y))
        mm = attn = total = 0.0
        for e in prof.key_averages():
            total += e.self_cpu_time_total
            if e.key in ("aten::mm", "aten::addmm", "aten::bmm"):
                mm += e.self_cpu_time_total
            elif "scaled_dot_product" in e.key:
                attn += e.self_cpu_time_total
        us = 1e-3 / repeats
    finally:
        torch.set_num_threads(threads)
    return BlockCheck(statistics.median(forward) * 1e3, statistics.median(backward) * 1e3,
                      mm * us, attn * us, (total - mm - attn) * us,
                      cost.forward_s * 1e3, (cost.backward_input_s + cost.backward_weight_s) * 1e3,
                      products_ms, memory_ms)


def markdown_block(check: BlockCheck) -> str:
    measured = check.measured_forward_ms + check.measured_backward_ms
    model = check.model_forward_ms + check.model_backward_ms
    profiled = check.matmul_ms + check.attention_ms + check.other_ms
    return "\n".join([
        "| one block, one microbatch (ms) | measured | cost model |", "|---|---:|---:|",
        f"| forward | {check.measured_forward_ms:.2f} | {check.model_forward_ms:.2f} |",
        f"| backward (B + W) | {check.measured_backward_ms:.2f} | "
        f"{check.model_backward_ms:.2f} |",
        f"| total | {measured:.2f} | {model:.2f} |",
        f"| matrix products + attention (profiled fwd+bwd) | "
        f"{check.matmul_ms + check.attention_ms:.2f} | {check.model_product_ms:.2f} |",
        f"| everything else (elementwise, norms, GELU, autograd, Python) | "
        f"{check.other_ms:.2f} | {check.model_memory_ms:.2f} |",
        f"| profiled total (profiler overhead included) | {profiled:.2f} | |"]) + "\n"


# ---- tables --------------------------------------------------------------------------------

def markdown(result: Measurement) -> str:
    """The measured tables as markdown."""
    cfg = result.config
    lines = [f"Model `{_spec(cfg, 0).replace(',vocab=0', '')}` (char vocabulary), global batch "
             f"{cfg.global_batch} x {cfg.seq} tokens = {cfg.micro_batch_size} x "
             f"{cfg.num_microbatches} microbatches; {cfg.rounds} timed rounds after "
             f"{cfg.warmup} warm-up rounds, systems interleaved; {result.cpu}, torch "
             f"{result.torch_version}; load average (1/5/15 min) before "
             f"{'/'.join(f'{x:.2f}' for x in result.load_before)}, after "
             f"{'/'.join(f'{x:.2f}' for x in result.load_after)}; run took "
             f"{result.wall_s:.0f} s.", "",
             "| system | median step s | IQR/median | tokens/s | busiest rank CPU s | "
             "simulated step s | measured/simulated | first-step loss | plan |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in result.systems:
        sim = f"{s.predicted_s:.3f}" if s.predicted_s else "-"
        ratio = f"{s.median_s / s.predicted_s:.2f}" if s.predicted_s else "-"
        lines.append(f"| {s.name} | {s.median_s:.3f} | {s.spread:.0%} | "
                     f"{s.tokens_per_s:,.0f} | {s.median_cpu_s:.3f} | {sim} | {ratio} | "
                     f"{s.losses[0]:.4f} | {s.plan} |")
    lines += ["", "| comparison | ratio |", "|---|---:|"]
    for a, b in headline_pairs(result):
        lines.append(f"| {a} / {b} (tokens/s) | "
                     f"{result.get(a).tokens_per_s / result.get(b).tokens_per_s:.3f} |")
    if "single" in cfg.systems:
        m = cfg.num_microbatches
        for name in ("tripar 1f1b", "tripar gpipe", "torch 1f1b", "torch gpipe"):
            if name in cfg.systems:
                lines.append(f"| {name} / ideal (2 x single x {m}/{m + 1}) | "
                             f"{result.get(name).tokens_per_s / result.ideal_tokens_per_s:.3f} |")
    return "\n".join(lines) + "\n"


def headline_pairs(result: Measurement) -> list[tuple[str, str]]:
    names = set(result.config.systems)
    pairs = [(f"tripar {s}", f"torch {s}") for s in ("1f1b", "gpipe")
             if f"tripar {s}" in names and f"torch {s}" in names]
    if {"tripar scp stage-aware", "tripar 1f1b full-recompute"} <= names:
        pairs.append(("tripar scp stage-aware", "tripar 1f1b full-recompute"))
    if {"tripar chimera", "tripar 1f1b"} <= names:
        pairs.append(("tripar chimera", "tripar 1f1b"))
    if {"tripar tp=2 tp-overlap=2", "tripar tp=2"} <= names:
        pairs.append(("tripar tp=2 tp-overlap=2", "tripar tp=2"))
    return pairs


def plot(result: Measurement, path: Path) -> None:
    """Bar chart of median tokens/s (with the ideal line) and measured vs simulated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(result.systems)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [s.name for s in systems]
    left.barh(names, [s.tokens_per_s for s in systems],
              color=["tab:gray" if n == "single" else "tab:blue" if n.startswith("tripar")
                     else "tab:orange" for n in names])
    if "single" in names:
        left.axvline(result.ideal_tokens_per_s, color="k", linestyle="--",
                     label="ideal pp=2 (2 x single x m/(m+1))")
        left.legend(loc="lower right", fontsize=8)
    left.invert_yaxis()
    left.set(xlabel="tokens/s (median)", title="measured, 2 CPU processes")
    with_sim = [s for s in systems if s.predicted_s]
    right.scatter([s.predicted_s for s in with_sim], [s.median_s for s in with_sim])
    for s in with_sim:
        right.annotate(s.name, (s.predicted_s, s.median_s), fontsize=7)
    top = max(max(s.predicted_s for s in with_sim), max(s.median_s for s in with_sim)) * 1.1
    right.plot([0, top], [0, top], "k--", lw=0.8, label="measured = simulated")
    right.fill_between([0, top], [0, 0.8 * top], [0, 1.2 * top], alpha=0.1, label="+-20%")
    right.set(xlim=(0, top), ylim=(0, top), xlabel="simulated step s (calibrated profile)",
              ylabel="measured median step s", title="measured vs simulated")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def calibrate(profile: Path, *, quick: bool = False) -> None:
    """``tripar calibrate [--quick] --out profile`` in a fresh process (one thread)."""
    import subprocess

    profile.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tripar.cli", "calibrate", "--out", str(profile),
               "--device", "cpu", "--devices-per-node", "2", "--format", "json",
               *(["--quick"] if quick else [])]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def run_all(out: Path, *, quick: bool = False, recalibrate: bool = False,
            rounds: int | None = None) -> tuple[Measurement, BlockCheck]:
    """Calibrate (when asked or when ``out`` has no profile), measure every system, check one
    block against the cost model; write ``measured.png`` and ``measured.json`` into ``out``."""
    profile = out / "cpu_profile.json"
    if recalibrate or not profile.exists():
        calibrate(profile, quick=quick)
    cfg = QUICK if quick else MeasureConfig()
    cfg = MeasureConfig(**{**asdict(cfg), "profile": str(profile),
                           **({"rounds": rounds} if rounds else {})})
    result = measure(cfg)
    check = block_check(cfg)
    plot(result, out / "measured.png")
    (out / "measured.json").write_text(json.dumps(
        {**result.to_dict(), "block_check": asdict(check)}, indent=1))
    return result, check


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model, 3 rounds")
    parser.add_argument("--calibrate", action="store_true",
                        help="run `tripar calibrate` first (always done when OUT has no "
                             "cpu_profile.json)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds")
    parser.add_argument("--out", default=str(RESULTS),
                        help="folder of cpu_profile.json, measured.png and measured.json")
    args = parser.parse_args(argv)
    result, check = run_all(Path(args.out), quick=args.quick, recalibrate=args.calibrate,
                            rounds=args.rounds)
    print(markdown(result))
    print(markdown_block(check))


if __name__ == "__main__":
    main()
