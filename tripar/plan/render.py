"""The text form of a Plan that people read (``tripar plan``, ``tripar show``).

Plain text, fixed-width columns, no colour: it goes to terminals, logs and
issue comments alike.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tripar.plan.config import ParallelConfig

if TYPE_CHECKING:
    from tripar.plan.plan import Alternative, Estimate, Plan


def fmt_bytes(n: float) -> str:
    """Bytes in the largest unit that keeps a number >= 1 (decimal units).

    >>> fmt_bytes(71_234_000_000), fmt_bytes(512), fmt_bytes(3_500_000)
    ('71.2 GB', '512 B', '3.5 MB')
    """
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_time(s: float) -> str:
    """Seconds with a unit a person reads at a glance.

    >>> fmt_time(12.345), fmt_time(0.0121), fmt_time(0.0000042)
    ('12.35 s', '12.1 ms', '4.2 us')
    """
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_count(n: float) -> str:
    """A count with B / M / k.

    >>> fmt_count(174_620_000_000), fmt_count(3_400_000), fmt_count(999)
    ('174.62B', '3.40M', '999')
    """
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{int(n)}"


def fmt_rate(tokens_per_s: float) -> str:
    """Tokens per second, with k / M.

    >>> fmt_rate(85_012.0), fmt_rate(1_234_567.0), fmt_rate(12.0)
    ('85.0k', '1.23M', '12')
    """
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M"
    if tokens_per_s >= 1e3:
        return f"{tokens_per_s / 1e3:.1f}k"
    return f"{tokens_per_s:.0f}"


def fmt_parallel(par: ParallelConfig) -> str:
    """One line for a parallel configuration.

    >>> fmt_parallel(ParallelConfig(dp=2, tp=4, pp=8, micro_batch_size=1, num_microbatches=16))
    'dp=2 tp=4 pp=8 vpp=1 | micro-batch 1 x 16 | 1f1b | recompute none | ZeRO-0'
    """
    return (f"dp={par.dp} tp={par.tp} pp={par.pp} vpp={par.vpp} | micro-batch "
            f"{par.micro_batch_size} x {par.num_microbatches} | {par.schedule} | recompute "
            f"{par.recompute} | ZeRO-{par.zero}")


def fmt_estimate(est: Estimate, device_memory: int | None = None) -> str:
    """Step time, throughput, peak memory (of the device's) and bubble on one line."""
    mem = fmt_bytes(est.peak_memory_bytes)
    if device_memory:
        mem += f" of {fmt_bytes(device_memory)}"
    return (f"step {fmt_time(est.step_time_s)}, {fmt_rate(est.tokens_per_s)} tokens/s, "
            f"peak memory {mem}, bubble {est.bubble_fraction:.1%}")


def fmt_flops(rate: float) -> str:
    """A FLOP rate as a person reads it.

    >>> fmt_flops(312e12), fmt_flops(3.6e10)
    ('312 TFLOP/s', '36.0 GFLOP/s')
    """
    if rate >= 1e12:
        return f"{rate / 1e12:.0f} TFLOP/s"
    return f"{rate / 1e9:.1f} GFLOP/s"


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


def _alternative(alt: Alternative, best: Estimate) -> str:
    line = fmt_parallel(alt.parallel)
    if alt.estimate is not None and best.step_time_s > 0:
        slower = alt.estimate.step_time_s / best.step_time_s - 1
        line += f"\n      step {fmt_time(alt.estimate.step_time_s)} ({slower:+.1%})"
    else:
        line += "\n      not costed"
    return f"{line}: {alt.reason} [{alt.binding.value}]"


def render_plan(plan: Plan, *, width: int = 100) -> str:
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
    out.append(f"{'stage':>5} {'rank':>4}  {'blocks':<{block_w}} {'recompute':>11} "
               f"{'time/mb':>9} {'memory':>9}")
    for st in plan.stages:
        rec = "-" if not st.recompute else f"{len(st.recompute)}/{len(st.blocks)}"
        out.append(f"{st.index:>5} {st.rank:>4}  {_blocks(st.blocks, block_w):<{block_w}} "
                   f"{rec:>11} {fmt_time(st.time_s):>9} {fmt_bytes(st.memory_bytes):>9}")
    if plan.tp_regions:
        kinds = Counter(r.kind for r in plan.tp_regions)
        out.append("")
        out.append(f"tensor parallel (tp={par.tp}): {len(plan.tp_regions)} regions sharded: "
                   + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        out.extend("  " + line for line in fmt_names([r.name for r in plan.tp_regions],
                                                      width - 2, lines=3))
    if plan.schedule:
        out.append("")
        out.append(f"schedule {par.schedule}:")
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
