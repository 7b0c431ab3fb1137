"""Random stage-partition problems for the partition tests (importable by name:
tests/partitioner/conftest.py puts this folder on the path)."""

from __future__ import annotations

import random

from tripar.partitioner.partition.problem import PartitionProblem


def random_problem(rng: random.Random, n: int, k: int, *, v: int = 1,
                   recompute: str = "stage-aware") -> PartitionProblem:
    m = rng.randint(1, 6)
    act = [rng.randint(1, 40) for _ in range(n)]
    inp = [rng.randint(0, a) for a in act]
    static = [rng.randint(0, 30) for _ in range(n)]
    fwd = [rng.randint(1, 20) / 4 for _ in range(n)]
    in_flight = tuple(min(k - s, m) for s in range(k)) if v == 1 else tuple(
        rng.randint(1, m) for _ in range(k))
    per_stage = (sum(static) + max(in_flight) * sum(act)) / k
    limit = tuple(int(per_stage * rng.uniform(0.6, 2.0)) for _ in range(k))
    return PartitionProblem(
        blocks=tuple(f"b{i}" for i in range(n)), forward_s=fwd,
        backward_s=[2 * f + rng.randint(0, 4) / 4 for f in fwd],
        recompute_s=[f + rng.randint(0, 2) / 4 for f in fwd],
        activation_bytes=act, input_bytes=inp, static_bytes=static, in_flight=in_flight,
        memory_limit_bytes=limit, num_microbatches=m, virtual_stages=v,
        cut_s=[rng.randint(0, 3) / 8 for _ in range(n - 1)], recompute=recompute)
