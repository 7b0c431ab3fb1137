"""Draw a simulated (or measured) pipeline timeline: one row per rank, a colour per action.

matplotlib is imported inside ``draw_timeline`` only, so planning never needs it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from tripar.errors import ConfigError
from tripar.partitioner.simulator import SimResult, TimelineEvent
from tripar.plan.schedule import PIPELINE_MARKS

__all__ = ["KIND_COLOURS", "draw_timeline"]

KIND_COLOURS = {
    "F": "#4c72b0",  # forward, activations kept
    "f": "#a6c8e8",  # forward keeping only the input
    "R": "#dd8452",  # recompute
    "B": "#55a868",  # backward (input gradient, or the whole backward)
    "W": "#8172b3",  # weight gradient
}
_KIND_NAMES = {"F": "F forward", "f": "f forward (input kept)", "R": "R recompute",
               "B": "B backward", "W": "W weight grad"}
_LABEL_LIMIT = 600  # write microbatch numbers in the bars up to this many events
_UP_HATCH = "//"  # the up pipeline's bars, under two pipelines


def draw_timeline(
    result_or_events: SimResult | Iterable[TimelineEvent],
    path: str | Path,
    *,
    title: str | None = None,
    pipeline_of: Callable[[int], int] | None = None,
) -> Path:
    """Draw the timeline to ``path``; ``.png`` or ``.svg`` chooses the format.

    Bars carry the microbatch number (``stage:microbatch`` on ranks with several
    virtual stages) when there are few enough to read. Under two pipelines (chimera),
    ``pipeline_of`` gives a microbatch's pipeline (``Schedule.pipeline_of``: 0 down,
    1 up): the up pipeline's bars are hatched, labels end in its mark (``v`` or ``^``)
    and the legend names both.

    >>> import tempfile, os
    >>> from tripar.partitioner.schedules import build_schedule
    >>> from tripar.partitioner.simulator import simulate
    >>> from tripar.partitioner.stage_cost import StageCost
    >>> cost = StageCost(forward_s=1.0, backward_input_s=1.0, backward_weight_s=1.0)
    >>> result = simulate(build_schedule("zb-h1", 2, 3), [cost] * 2)
    >>> out = draw_timeline(result, os.path.join(tempfile.mkdtemp(), "zb.svg"), title="zb-h1")
    >>> out.stat().st_size > 1000
    True
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise ConfigError(f"timeline file {str(path)!r} must end in .png or .svg")
    events = list(result_or_events.events if isinstance(result_or_events, SimResult)
                  else result_or_events)
    if not events:
        raise ConfigError("no timeline events to draw; simulate with record_timeline=True")

    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    num_ranks = max(e.rank for e in events) + 1
    stages_of: dict[int, set[int]] = defaultdict(set)
    bars: dict[tuple[int, str, int], list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        pipeline = pipeline_of(e.microbatch) if pipeline_of else 0
        bars[(e.rank, e.kind, pipeline)].append((e.start, e.end - e.start))
        stages_of[e.rank].add(e.stage)
    end = max(e.end for e in events)
    many = len(events) > _LABEL_LIMIT

    width_in = min(24.0, max(9.0, 0.25 * len(events) / num_ranks + 4.0))
    fig = Figure(figsize=(width_in, min(40.0, 1.4 + 0.45 * num_ranks)))
    ax = fig.add_subplot()
    inch_per_s = (width_in - 3.0) / (end if end > 0 else 1.0)
    for (rank, kind, up), spans in bars.items():  # the hatch takes the edge colour
        ax.broken_barh(spans, (rank - 0.4, 0.8), facecolors=KIND_COLOURS.get(kind, "grey"),
                       edgecolors="#ffffff99" if up else "none" if many else "white",
                       linewidth=0.0 if many else 0.5, hatch=_UP_HATCH if up else None)
    if not many:
        for e in events:
            text = (f"{e.stage}:{e.microbatch}" if len(stages_of[e.rank]) > 1
                    else str(e.microbatch))
            if pipeline_of is not None:
                text += PIPELINE_MARKS[pipeline_of(e.microbatch)]
            if (e.end - e.start) * inch_per_s >= 0.075 * len(text) + 0.03:
                ax.text((e.start + e.end) / 2, e.rank, text, ha="center", va="center",
                        fontsize=7, color="black" if e.kind in ("f", "W") else "white")
    ax.set_ylim(num_ranks - 0.5, -0.5)
    step = max(1, num_ranks // 32)
    ax.set_yticks(range(0, num_ranks, step))
    ax.set_yticklabels([f"rank {r}" for r in range(0, num_ranks, step)])
    ax.set_xlim(0, end * 1.01 if end > 0 else 1.0)
    ax.set_xlabel("time (s)")
    present = [k for k in KIND_COLOURS if any(kind == k for _, kind, _ in bars)]
    handles = [Patch(color=KIND_COLOURS[k], label=_KIND_NAMES[k]) for k in present]
    if pipeline_of is not None:
        down, up = PIPELINE_MARKS
        handles += [Patch(facecolor="white", edgecolor="black", label=f"{down} down pipeline"),
                    Patch(facecolor="white", edgecolor="black", hatch=_UP_HATCH,
                          label=f"{up} up pipeline (hatched)")]
    ax.legend(handles=handles,
              loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt, dpi=120)
    return path
