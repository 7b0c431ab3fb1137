"""The minimal time of every (stage, first block, stop) range, and its recompute choice.

:class:`StageTable` is what the exact DP (:mod:`tripar.partitioner.partition.dp`), the
fixed split (:mod:`~tripar.partitioner.partition.fixed`) and the diagnosis of an
infeasible problem (:mod:`~tripar.partitioner.partition.diagnose`) read; :func:`trace`
reads a chain DP's argmins back into stage boundaries.
"""

from __future__ import annotations

import math

import numpy as np

from tripar.partitioner.partition.problem import PartitionProblem
from tripar.partitioner.partition.recompute import choose_recompute

_INF = math.inf


def _unique_rows(counts: np.ndarray, base: np.ndarray) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """Distinct (counts..., base) rows and each row's index among them.

    Packs the small per-type counts into one int64 when they fit, so that two
    one-dimensional sorts replace numpy's much slower row-wise ``unique``.
    """
    rows, types = counts.shape
    bits = max(1, int(counts.max(initial=0)).bit_length())
    if types * bits <= 62:
        packed = np.zeros(rows, dtype=np.int64)
        for t in range(types):
            packed = (packed << bits) | counts[:, t]
        order = np.lexsort((base, packed))
        p_sorted, b_sorted = packed[order], base[order]
        new = np.ones(rows, dtype=bool)
        new[1:] = (p_sorted[1:] != p_sorted[:-1]) | (b_sorted[1:] != b_sorted[:-1])
        group = np.cumsum(new) - 1
        inverse = np.empty(rows, dtype=np.int64)
        inverse[order] = group
        firsts = order[new]
    else:
        keys = np.column_stack([counts, base])
        _, firsts, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
    unique = [(*(int(x) for x in counts[i]), int(base[i])) for i in firsts.tolist()]
    return unique, inverse


class StageTable:
    """Minimal stage time of every (stage, first, stop), and its recompute choice.

    Ranges that fit without recompute, and ranges that do not fit even with every
    block recomputed, are costed with numpy in one go; only the ranges between
    need a recompute choice, and those are cached by composition (how many
    blocks of each recomputable type they hold), so the many ranges of a chain
    of identical layers share one computation.
    """

    def __init__(self, problem: PartitionProblem, *, tables: bool = True) -> None:
        self.problem = problem
        n = problem.num_blocks
        type_key: dict[tuple[int, float], int] = {}
        self.block_type = [-1] * n
        for b in range(n):
            if problem.recomputable(b):
                key = (problem.saving_bytes(b), problem.recompute_s[b])
                self.block_type[b] = type_key.setdefault(key, len(type_key))
        self.types = list(type_key)
        prefix = np.zeros((n + 1, len(self.types)), dtype=np.int64)
        for b in range(n):
            prefix[b + 1] = prefix[b]
            if self.block_type[b] >= 0:
                prefix[b + 1, self.block_type[b]] += 1
        self.prefix = prefix
        self.cache: dict[tuple, tuple[float, tuple[int, ...], int] | None] = {}
        rec = [b for b in range(n) if self.block_type[b] >= 0]
        save = np.zeros(n, dtype=np.int64)
        rec_s = np.zeros(n)
        save[rec] = [problem.saving_bytes(b) for b in rec]
        rec_s[rec] = [problem.recompute_s[b] for b in rec]

        def span(values, dtype):
            cum = np.concatenate([[0], np.cumsum(values, dtype=dtype)])
            return cum[None, :] - cum[:, None]          # [first, stop]

        self.fb = span(np.add(problem.forward_s, problem.backward_s), np.float64)
        self.act = span(problem.activation_bytes, np.int64)
        self.static = span(problem.static_bytes, np.int64)
        self.save = span(save, np.int64)
        self.rec_s = span(rec_s, np.float64)
        self.top = np.zeros((n + 1, n + 1), dtype=np.int64)   # largest saving in [first, stop)
        for first in range(n):
            self.top[first, first + 1:] = np.maximum.accumulate(save[first:])
        cut = np.zeros(n + 1)
        cut[1:n] = problem.cut_s
        self.cut = cut
        self.tables = [self._stage(s) for s in range(problem.num_stages)] if tables else []

    def valid(self, s: int) -> np.ndarray:
        """Ranges stage s can hold while every other stage keeps at least one block."""
        n, k = self.problem.num_blocks, self.problem.num_stages
        first = np.arange(n + 1)[:, None]
        stop = np.arange(n + 1)[None, :]
        return (first >= s) & (stop > first) & (stop <= n - (k - 1 - s))

    def least_memory(self, s: int) -> np.ndarray:
        """Each range's memory on stage s with every recomputable block recomputed
        (the least the policy allows; see the module docstring)."""
        c = self.problem.in_flight[s]
        base = self.static + c * self.act
        if self.problem.recompute == "none":
            return base
        return base - c * self.save + self.top

    def _stage(self, s: int) -> np.ndarray:
        """(n+1) x (n+1) matrix of stage s's minimal time for [first, stop), inf if not fit."""
        p = self.problem
        c, limit = p.in_flight[s], p.memory_limit_bytes[s]
        valid = self.valid(s)
        cut = self.cut[None, :] if s + 1 < p.num_stages else 0.0
        times = np.full(valid.shape, _INF)
        fits_full = valid & (self.least_memory(s) <= limit)
        if p.recompute == "full":
            times[fits_full] = (self.fb + self.rec_s + cut)[fits_full]
            return times
        base = self.static + c * self.act
        plain = valid & (base <= limit)
        times[plain] = (self.fb + cut)[plain]
        first, stop = np.nonzero(fits_full & ~plain)
        if len(first):
            # one recompute choice per distinct (composition, base memory)
            counts = self.prefix[stop] - self.prefix[first]
            unique, inverse = _unique_rows(counts, base[first, stop])
            extra = np.empty(len(unique))
            for u, row in enumerate(unique):
                got = self._solve(row[:-1], row[-1], c, limit)
                assert got is not None, "least memory fits, so some choice fits"
                extra[u] = got[0]
            times[first, stop] = (self.fb[first, stop] + extra[inverse]
                                  + (self.cut[stop] if s + 1 < p.num_stages else 0.0))
        return times

    def choice(self, s: int, first: int, stop: int) -> tuple[float, tuple[int, ...], int] | None:
        """(recompute time, recompute count per type, memory) of the cheapest fit, or None."""
        p = self.problem
        c, limit = p.in_flight[s], p.memory_limit_bytes[s]
        base = int(self.static[first, stop] + c * self.act[first, stop])
        if base <= limit and p.recompute != "full":
            return 0.0, (0,) * len(self.types), base
        counts = tuple(int(x) for x in self.prefix[stop] - self.prefix[first])
        return self._solve(counts, base, c, limit)

    def _solve(self, counts: tuple[int, ...], base: int, c: int,
               limit: int) -> tuple[float, tuple[int, ...], int] | None:
        key = (counts, base, c, limit)
        if key not in self.cache:
            present = [t for t, cnt in enumerate(counts) if cnt]
            sub = [(self.types[t][0], self.types[t][1], counts[t]) for t in present]
            got = choose_recompute(sub, base, c, limit, self.problem.recompute)
            if got is not None:
                full = [0] * len(self.types)
                for t, r in zip(present, got[1]):
                    full[t] = r
                got = (got[0], tuple(full), got[2])
            self.cache[key] = got
        return self.cache[key]

    def recompute_blocks(self, s: int, first: int, stop: int) -> tuple[int, ...]:
        """The blocks a stage recomputes: per type, the earliest ones of the range."""
        choice = self.choice(s, first, stop)
        assert choice is not None
        left = list(choice[1])
        out = []
        for b in range(first, stop):
            t = self.block_type[b]
            if t >= 0 and left[t] > 0:
                out.append(b)
                left[t] -= 1
        return tuple(out)


def trace(args: list[np.ndarray], n: int) -> list[int]:
    """First block of each stage, read back from a chain DP's argmin per stage (the
    stage's first block for each stop) from the last stage's stop ``n``.

    >>> import numpy as np
    >>> trace([np.array([0, 0, 0, 0]), np.array([0, 0, 1, 2])], 3)
    [0, 2]
    """
    bounds, stop = [], n
    for arg in reversed(args):
        stop = int(arg[stop])
        bounds.append(stop)
    return bounds[::-1]
