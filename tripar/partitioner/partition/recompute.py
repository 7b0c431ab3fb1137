"""The per-stage recompute choice: the cheapest blocks to recompute so that a stage fits.

Blocks are grouped in *types* ``(sigma, rho, n)``: bytes a block of the type frees per
in-flight microbatch when recomputed, seconds its recompute takes, blocks of the type in
the stage. :func:`choose_recompute` gives the cheapest count per type under a policy
(``none``, ``full``, ``stage-aware``; see :mod:`tripar.partitioner.partition.problem`
for the memory model: the stage also holds the one block re-materialised at a time).

>>> choose_recompute([(8, 1.0, 4)], base=100, c=2, limit=80, policy="stage-aware")
(2.0, (2,), 76)
"""

from __future__ import annotations

import math

_INF = math.inf


def _cover(types: list[tuple[int, float, int]], need: int) -> tuple[float, tuple[int, ...]] | None:
    """Cheapest integer counts ``r_t <= n_t`` with ``sum r_t * sigma_t >= need``.

    ``types`` are ``(sigma, rho, n)``: bytes saved, time spent, blocks available.
    Branch and bound over types in order of time per byte, bounded by the
    fractional (greedy) relaxation. Exact; fast for the few block types a
    range of a real model has.
    """
    order = sorted(range(len(types)), key=lambda t: (types[t][1] / types[t][0], t))
    best_cost, best = _INF, None
    counts = [0] * len(types)

    def bound(pos: int, remaining: int) -> float:
        extra = 0.0
        for t in order[pos:]:
            sigma, rho, cnt = types[t]
            if cnt * sigma >= remaining:
                return extra + rho * remaining / sigma
            extra += rho * cnt
            remaining -= cnt * sigma
        return _INF

    def search(pos: int, remaining: int, cost: float) -> None:
        nonlocal best_cost, best
        if remaining <= 0:
            if cost < best_cost:
                best_cost, best = cost, tuple(counts)
            return
        if pos == len(order) or cost + bound(pos, remaining) >= best_cost:
            return
        t = order[pos]
        sigma, rho, cnt = types[t]
        top = min(cnt, -(-remaining // sigma))
        for r in range(top, -1, -1):
            counts[t] = r
            search(pos + 1, remaining - r * sigma, cost + r * rho)
        counts[t] = 0

    search(0, need, 0.0)
    return None if best is None else (best_cost, best)


def choose_recompute(types: list[tuple[int, float, int]], base: int, c: int, limit: int,
                      policy: str) -> tuple[float, tuple[int, ...], int] | None:
    """Cheapest recompute counts per type so that the stage fits.

    ``base = static + c * sum(act)`` is the stage's memory without recompute.
    Returns (recompute time, counts per type, memory) or None if nothing fits.
    """
    none = (0,) * len(types)
    if policy == "none" or not types:
        return (0.0, none, base) if base <= limit else None
    if policy == "full":
        counts = tuple(t[2] for t in types)
        memory = base - c * sum(s * n for s, _, n in types) + max(s for s, _, _ in types)
        return (sum(r * n for _, r, n in types), counts, memory) if memory <= limit else None
    if base <= limit:
        return 0.0, none, base
    best: tuple[float, tuple[int, ...], int] | None = None
    # Enumerate the type whose block is re-materialised at the peak (largest saving used).
    for top in sorted(range(len(types)), key=lambda t: -types[t][0]):
        sigma_top = types[top][0]
        usable = [t for t in range(len(types)) if types[t][0] <= sigma_top]
        # at least one block of `top`; cover the rest with any usable type
        need = base + sigma_top - limit - c * sigma_top  # bytes still to free, after one top
        sub = [(c * types[t][0], types[t][1], types[t][2] - (t == top)) for t in usable]
        sub_idx = [i for i, (_, _, cnt) in enumerate(sub) if cnt > 0]
        if need <= 0:
            found: tuple[float, tuple[int, ...]] | None = (0.0, ())
            picked = {}
        else:
            found = _cover([sub[i] for i in sub_idx], need)
            if found is None:
                continue
            picked = {usable[sub_idx[j]]: r for j, r in enumerate(found[1])}
        cost = types[top][1] + found[0]
        if best is not None and cost >= best[0]:
            continue
        counts = tuple(picked.get(t, 0) + (t == top) for t in range(len(types)))
        memory = (base - c * sum(types[t][0] * counts[t] for t in range(len(types)))
                  + sigma_top)
        best = (cost, counts, memory)
    return best
