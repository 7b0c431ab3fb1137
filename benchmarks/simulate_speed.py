"""How long the simulator takes on a large pipeline (issue: p=64, m=512, v=2 under 2 s).

    python benchmarks/simulate_speed.py

Prints the time to build the interleaved schedule, to validate it, and to simulate it
with and without the timeline, as the median of a few runs.
"""

from __future__ import annotations

import os
import statistics
import time

from tripar.partitioner.schedules import build_schedule
from tripar.partitioner.simulator import simulate
from tripar.partitioner.stage_cost import StageCost


def _median_s(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(pp: int = 64, microbatches: int = 512, vpp: int = 2) -> dict[str, float]:
    schedule = build_schedule("interleaved-1f1b", pp, microbatches, vpp=vpp)
    costs = [StageCost(forward_s=1.0 / vpp, backward_input_s=1.0 / vpp, backward_weight_s=1.0 / vpp,
                       send_s=0.001, activation_bytes=1)] * (pp * vpp)
    result = {
        "build_s": _median_s(lambda: build_schedule("interleaved-1f1b", pp, microbatches, vpp=vpp)),
        "validate_s": _median_s(schedule.validate),
        "simulate_s": _median_s(lambda: simulate(schedule, costs)),
        "simulate_no_timeline_s": _median_s(lambda: simulate(schedule, costs,
                                                             record_timeline=False)),
    }
    actions = sum(len(a) for a in schedule.actions)
    print(f"interleaved-1f1b p={pp} m={microbatches} v={vpp}: {actions} actions, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, value in result.items():
        print(f"  {name:24s} {value:6.2f} s")
    return result


if __name__ == "__main__":
    main()
