"""The text form of a Plan that people read (``tripar plan``, ``tripar show``).

Plain text, fixed-width columns, no colour: it goes to terminals, logs and
issue comments alike. Numbers are written by ``tripar.plan.units``.

``Plan.render`` calls ``render_plan`` with itself; this module reads the plan's parts
(``PlanParts``) and does not import ``tripar.plan.plan``, so the two form no circle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from tripar.plan.config import ParallelConfig
from tripar.plan.records import (
    Alternative,
    ClusterInfo,
    Estimate,
    Inputs,
    ModelInfo,
    SolverRun,
    StagePlan,
    TPShard,
)
from tripar.plan.units import fmt_bytes, fmt_count, fmt_flops, fmt_rate, fmt_time


class PlanParts(Protocol):
    """What ``render_plan`` reads of a plan: the fields of ``tripar.plan.plan.Plan``."""

    model: ModelInfo
    cluster: ClusterInfo
    inputs: Inputs
    parallel: ParallelConfig
    stages: tuple[StagePlan, ...]
    estimate: Estimate
    tp_regions: tuple[TPShard, ...]
    schedule: tuple[str, ...]
    solvers: tuple[SolverRun, ...]
    solve_time_s: float
    alternatives: tuple[Alternative, ...]
    notes: tuple[str, ...]


def fmt_parallel(par: ParallelConfig) -> str:
    """One line for a parallel configuration.

    >>> fmt_parallel(ParallelConfig(dp=2, tp=4, pp=8, micro_batch_size=1, num_microbatches=16))
    'dp=2 tp=4 pp=8 vpp=1 | micro-batch 1 x 16 | 1f1b | recompute none | ZeRO-0'
    >>> fmt_parallel(ParallelConfig(1, 2, 1, 4, 8, sp=True, tp_overlap=2))[-26:]
    'ZeRO-0 | sp | tp-overlap 2'
    """
    return (f"dp={par.dp} tp={par.tp} pp={par.pp} vpp={par.vpp} | micro-batch "
            f"{par.micro_batch_size} x {par.num_microbatches} | {par.schedule} | recompute "
            f"{par.recompute} | ZeRO-{par.zero}" + (" | sp" if par.sp else "")
            + (f" | tp-overlap {par.tp_overlap}" if par.tp_overlap > 1 else ""))


def fmt_estimate(est: Estimate, device_memory: int | None = None) -> str:
    """Step time, throughput, peak memory (of the device's) and bubble on one line."""
    mem = fmt_bytes(est.peak_memory_bytes)
    if device_memory:
        mem += f" of {fmt_bytes(device_memory)}"
    return (f"step {fmt_time(est.step_time_s)}, {fmt_rate(est.tokens_per_s)} tokens/s, "
            f"peak memory {mem}, bubble {est.bubble_fraction:.1%}")


def fmt_names(names: Sequence[str], width: int, lines: int = 1) -> list[str]:
    """Names separated by commas on at most ``lines`` lines of at most ``width``
    characters; what does not fit is counted (``(+3 more)``).

    >>> fmt_names(["h.0:attention:0", "h.0:mlp:0", "h.1:attention:0"], 40)
    ['h.0:attention:0, h.0:mlp:0 (+1 more)']
    >>> fmt_names(["h.0:attention:0", "h.0:mlp:0", "h.1:attention:0"], 30, lines=2)
    ['h.0:attention:0, h.0:mlp:0,', 'h.1:attention:0']
    """
    names = list(names)
    out: list[str] = []
    i = 0
    while i < len(names) and len(out) < lines:
        last = len(out) == lines - 1
        line = names[i]
        i += 1
        while i < len(names):
            more = f" (+{len(names) - i - 1} more)" if last and i + 1 < len(names) else ""
            if len(f"{line}, {names[i]}{more},") > width:
                break
            line += f", {names[i]}"
            i += 1
        out.append(line)
    if i < len(names):
        tail = f" (+{len(names) - i} more)"
        out[-1] = out[-1][: max(0, width - len(tail))] + tail
    return [line + ("," if k < len(out) - 1 else "") for k, line in enumerate(out)]


def _blocks(blocks: tuple[str, ...], width: int) -> str:
    text = blocks[0] if len(blocks) == 1 else f"{blocks[0]} .. {blocks[-1]} ({len(blocks)})"
    return text if len(text) <= width else text[: width - 3] + "..."


def fmt_device_memory(stages: Sequence[StagePlan], device_memory: Sequence[int],
                      limit: int, *, width: int = 100) -> list[str]:
    """Each pipeline rank's device memory at its peak, with its virtual stages' parts
    (what each holds at that moment, or each one's own peak where the plan did not record
    it); nothing for one stage per rank.

    >>> stages = [StagePlan(s, s % 2, s // 2, (f"h.{s}",), (), 0.01, 3 * 10**9,
    ...                     memory_at_device_peak_bytes=(2 + s) * 10**9) for s in range(4)]
    >>> print("\\n".join(fmt_device_memory(stages, (6 * 10**9, 8 * 10**9), 80 * 10**9)))
    device memory at each rank's peak = its virtual stages' parts:
      rank 0     6.0 GB of 80.0 GB = stage 0 2.0 GB + stage 2 4.0 GB
      rank 1     8.0 GB of 80.0 GB = stage 1 3.0 GB + stage 3 5.0 GB
    """
    if len({st.rank for st in stages}) == len(stages):
        return []
    recorded = any(st.memory_at_device_peak_bytes for st in stages)
    out = ["device memory at each rank's peak = its virtual stages' parts:" if recorded else
           "device memory at each rank's peak; its virtual stages' own peaks (apart in time):"]
    for rank, used in enumerate(device_memory):
        parts = [f"stage {st.index} "
                 + fmt_bytes(st.memory_at_device_peak_bytes if recorded else st.memory_bytes)
                 for st in stages if st.rank == rank]
        line = f"  rank {rank:<3} {fmt_bytes(used):>8} of {fmt_bytes(limit)} = "
        indent = " " * len(line)
        for i, part in enumerate(parts):
            piece = part if i == 0 else f" + {part}"
            if len(line) + len(piece) > width and i:
                out.append(line)
                line, piece = indent, f"+ {part}"
            line += piece
        out.append(line)
    return out


def _alternative(alt: Alternative, best: Estimate) -> str:
    line = fmt_parallel(alt.parallel)
    if alt.estimate is not None and best.step_time_s > 0:
        slower = alt.estimate.step_time_s / best.step_time_s - 1
        line += f"\n      step {fmt_time(alt.estimate.step_time_s)} ({slower:+.1%})"
    else:
        line += "\n      not costed"
    return f"{line}: {alt.reason} [{alt.binding.value}]"


def _device_memory(plan: PlanParts) -> tuple[int, ...]:
    """Each pipeline rank's peak: the estimate's per-rank peaks (``Plan.device_memory``)."""
    est, pp = plan.estimate, plan.parallel.pp
    if len(est.stage_memory_bytes) == pp:
        return est.stage_memory_bytes
    return tuple(sum(st.memory_bytes for st in plan.stages if st.rank == r) for r in range(pp))


def render_plan(plan: PlanParts, *, width: int = 100) -> str:
    """The plan as text: what runs where, what it costs, and what else was close."""
    par, cl, est = plan.parallel, plan.cluster, plan.estimate
    model = plan.model
    out = [
        f"model:    {model.spec} ({len(model.blocks)} blocks, {fmt_count(model.params)} "
        f"parameters, fingerprint {model.fingerprint})",
        f"cluster:  {cl.nodes} x {cl.devices_per_node} {cl.device} "
        f"({fmt_bytes(cl.device_memory_bytes)}, {fmt_flops(cl.peak_flops)}; "
        f"{fmt_bytes(cl.intra_bandwidth)}/s in a node, {fmt_bytes(cl.inter_bandwidth)}/s "
        f"between nodes)",
        f"batch:    {plan.inputs.global_batch_size} samples x {plan.inputs.seq_len} tokens "
        f"({plan.inputs.dtype})",
        "",
        f"parallel: {fmt_parallel(par)}",
        f"estimate: {fmt_estimate(est, cl.device_memory_bytes)}",
        "",
    ]
    block_w = max(20, width - 52)
    rec_w = max(11, *(len(st.granularity) for st in plan.stages))
    out.append(f"{'stage':>5} {'rank':>4}  {'blocks':<{block_w}} {'recompute':>{rec_w}} "
               f"{'time/mb':>9} {'memory':>9}")
    for st in plan.stages:
        rec = "-" if st.granularity == "none" else st.granularity
        ranks = "+".join(map(str, par.ranks_of(st.index)))  # chimera: both holders
        out.append(f"{st.index:>5} {ranks:>4}  {_blocks(st.blocks, block_w):<{block_w}} "
                   f"{rec:>{rec_w}} {fmt_time(st.time_s):>9} {fmt_bytes(st.memory_bytes):>9}")
    device = fmt_device_memory(plan.stages, _device_memory(plan), cl.device_memory_bytes,
                               width=width)
    if device:
        out.append("")
        out.extend(device)
    if plan.tp_regions:
        kinds = Counter(r.kind for r in plan.tp_regions)
        out.append("")
        out.append(f"tensor parallel (tp={par.tp}): {len(plan.tp_regions)} regions sharded: "
                   + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        out.extend("  " + line for line in fmt_names([r.name for r in plan.tp_regions],
                                                      width - 2, lines=3))
    if plan.schedule:
        out.append("")
        out.append(f"schedule {par.schedule}:" + (
            f" two pipelines, microbatches 0-{par.num_microbatches // 2 - 1} down (stage s on "
            f"rank s), the rest up (stage s on rank {par.pp - 1}-s)" if par.pipelines == 2
            else ""))
        for rank in sorted({0, len(plan.schedule) - 1}):
            acts = plan.schedule[rank]
            head = f"  rank {rank}: "
            if len(head) + len(acts) > width:
                acts = acts[: width - len(head) - 4].rsplit(" ", 1)[0] + " ..."
            out.append(head + acts)
    if plan.solvers:
        out.append("")
        runs = "; ".join(f"{r.problem} by {r.solver} ({r.status}, {fmt_time(r.solve_time_s)})"
                         for r in plan.solvers)
        out.append(f"solved in {fmt_time(plan.solve_time_s)}: {runs}")
    if plan.alternatives:
        out.append("")
        out.append("runners-up:")
        for i, alt in enumerate(plan.alternatives, 1):
            out.append(f"  {i}. {_alternative(alt, est)}")
    for note in plan.notes:
        out.append(f"note: {note}")
    return "\n".join(out) + "\n"
