"""The exact stage partition of a chain with one long run of identical blocks, by counts.

A transformer's chain is a few blocks (embedding), a run of ``L`` identical
layers, and a few blocks after it (norm, head, loss). For such a chain a
partition is fixed by (1) which gaps of the few blocks before and after the
run are cuts (a *structure*: ``2^(a+z)`` of them) and (2) how many layers each
stage holding layers gets. Every stage that holds only layers costs the same
for the same count, so its time is a vector over the count, and the problem
the generic DP (:func:`tripar.partitioner.partition.dp.solve_partition_dp`) solves
over ``(n+1)^2`` ranges per stage is solved here over counts:

* stage times per count come from closed forms, vectorised over the count
  (the minimal number of layers to recompute for a stage to fit is a ceiling
  of an affine function of the count; the few other blocks of the stage are
  enumerated);
* the least feasible bottleneck ``B*`` is found by bisection over the stage
  time values, each test ``sum_s N_s(B) >= L`` with ``N_s(B)`` the most layers
  stage s can hold within ``B`` (stage times grow with the count);
* for each cap ``B >= B*`` that changes some ``N_s`` (and until
  ``sum_lb / v + (m v - 1) B`` cannot win), the least sum of stage times is a
  DP over stages and layer counts restricted to the counts the caps leave open
  (``N_s`` minus the others' slack), which is narrow near ``B*``.

The model and the objective are those of ``problem.py``, so the result is the
same optimum (ties may split differently). The work is linear in ``L`` (the
count vectors) plus terms that do not grow with it; ``PartitionSolution.work``
counts it.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np

from tripar.partitioner.partition.diagnose import diagnose_infeasible
from tripar.partitioner.partition.problem import (
    PartitionProblem,
    PartitionSolution,
    evaluate_partition,
)
from tripar.partitioner.partition.recompute import choose_recompute

_INF = math.inf
MIN_RUN = 8
"""Shortest run of identical blocks worth the count solver."""
MAX_EDGE_BLOCKS = 6
"""Most blocks before plus after the run (the structures are 2 to this power)."""


def find_run(problem: PartitionProblem) -> tuple[int, int] | None:
    """``[start, stop)`` of the longest run of identical consecutive blocks (same times,
    bytes and cut after them, the run's last cut aside), or None when it is shorter than
    ``MIN_RUN`` or leaves more than ``MAX_EDGE_BLOCKS`` other blocks.

    >>> find_run(PartitionProblem.uniform(12, stages=2, memory_limit_bytes=10,
    ...                                   num_microbatches=2))
    (0, 12)
    """
    p, n = problem, problem.num_blocks

    def key(b: int) -> tuple:
        return (p.forward_s[b], p.backward_s[b], p.recompute_s[b], p.activation_bytes[b],
                p.input_bytes[b], p.static_bytes[b])

    best, start = (0, 0), 0
    for b in range(1, n + 1):
        same = b < n and key(b) == key(start) and (b - start < 2 or p.cut_s[b - 1]
                                                    == p.cut_s[b - 2])
        if not same:
            if b - start > best[1] - best[0]:
                best = (start, b)
            start = b
    a, e = best
    if e - a < MIN_RUN or a + (n - e) > MAX_EDGE_BLOCKS:
        return None
    return best


class _Chain:
    """Times of stages over counts for one problem and run."""

    def __init__(self, problem: PartitionProblem, run: tuple[int, int]) -> None:
        p = self.p = problem
        self.a, self.e = run
        self.L = self.e - self.a
        self.n, self.k = p.num_blocks, p.num_stages
        lay = self.a
        self.fb = p.forward_s[lay] + p.backward_s[lay]
        self.act, self.static = p.activation_bytes[lay], p.static_bytes[lay]
        self.sigma = p.saving_bytes(lay) if p.recomputable(lay) else 0
        self.rho = p.recompute_s[lay]
        self.inner_cut = p.cut_s[lay] if self.L > 1 else 0.0
        self.counts = np.arange(self.L + 1, dtype=np.int64)
        self.work = 0
        self._fixed: dict[tuple[int, int, int], float] = {}
        self._vectors: dict[tuple, np.ndarray] = {}

    def cut_after(self, s: int, stop: int) -> float:
        return self.p.cut_s[stop - 1] if s + 1 < self.k else 0.0

    def fixed_time(self, s: int, first: int, stop: int) -> float:
        """Time of stage s holding [first, stop) of the blocks around the run."""
        key = (s, first, stop)
        if key not in self._fixed:
            p = self.p
            blocks = range(first, stop)
            base = sum(p.static_bytes[b] for b in blocks) + p.in_flight[s] * sum(
                p.activation_bytes[b] for b in blocks)
            types: dict[tuple[int, float], int] = {}
            for b in blocks:
                if p.recomputable(b):
                    t = (p.saving_bytes(b), p.recompute_s[b])
                    types[t] = types.get(t, 0) + 1
            sub = [(s_, r, c) for (s_, r), c in types.items()]
            got = choose_recompute(sub, base, p.in_flight[s], p.memory_limit_bytes[s],
                                    p.recompute)
            self._fixed[key] = _INF if got is None else math.fsum(
                [*(p.forward_s[b] + p.backward_s[b] for b in blocks), got[0],
                 self.cut_after(s, stop)])
            self.work += 1
        return self._fixed[key]

    def layer_vector(self, s: int, extras: tuple[int, ...], cut: float) -> np.ndarray:
        """Time of stage s holding ``extras`` (blocks around the run) and c layers, for
        c = 0..L (inf for c = 0 and where nothing fits)."""
        key = (s, extras, cut)
        if key in self._vectors:
            return self._vectors[key]
        p, c = self.p, self.counts
        cs, limit = p.in_flight[s], p.memory_limit_bytes[s]
        ex_static = sum(p.static_bytes[b] for b in extras)
        ex_act = sum(p.activation_bytes[b] for b in extras)
        ex_fb = math.fsum(p.forward_s[b] + p.backward_s[b] for b in extras)
        base = ex_static + c * self.static + cs * (ex_act + c * self.act)
        plain = ex_fb + c * self.fb + cut
        rec_ex = [b for b in extras if p.recomputable(b)]
        best = np.full(self.L + 1, _INF)
        if p.recompute == "none":
            best = np.where(base <= limit, plain, _INF)
        elif p.recompute == "full":
            sig = [p.saving_bytes(b) for b in rec_ex] + ([self.sigma] if self.sigma else [])
            r = c if self.sigma else np.zeros_like(c)
            freed = cs * (sum(p.saving_bytes(b) for b in rec_ex) + r * self.sigma)
            top = np.where(r > 0, max(sig, default=0),
                           max((p.saving_bytes(b) for b in rec_ex), default=0))
            extra = math.fsum(p.recompute_s[b] for b in rec_ex) + r * self.rho
            best = np.where(base - freed + top <= limit, plain + extra, _INF)
        else:
            best = np.where(base <= limit, plain, _INF)
            for size in range(len(rec_ex) + 1):
                for chosen in itertools.combinations(rec_ex, size):
                    saved = sum(p.saving_bytes(b) for b in chosen)
                    top_x = max((p.saving_bytes(b) for b in chosen), default=0)
                    cost_x = math.fsum(p.recompute_s[b] for b in chosen)
                    if chosen:   # no layer recomputed
                        fits = base - cs * saved + top_x <= limit
                        best = np.minimum(best, np.where(fits, plain + cost_x, _INF))
                    if self.sigma:   # r >= 1 layers recomputed
                        top = max(top_x, self.sigma)
                        need = base + top - limit - cs * saved
                        r = np.maximum(1, -((-need) // (cs * self.sigma)))
                        ok = r <= c
                        best = np.minimum(best, np.where(ok, plain + cost_x + r * self.rho,
                                                         _INF))
        best[0] = _INF
        self.work += self.L + 1
        self._vectors[key] = best
        return best


def _structures(chain: _Chain):
    """Every (prefix cuts, suffix cuts) with at least one stage left for the layers."""
    a, e, n, k = chain.a, chain.e, chain.n, chain.k
    pre_gaps = list(range(a))                 # cut after block g, g < a
    suf_gaps = list(range(e - 1, n - 1))      # cut after block g, e-1 <= g < n-1
    for pc in itertools.product((0, 1), repeat=len(pre_gaps)):
        pre = [g for g, on in zip(pre_gaps, pc) if on]
        for sc in itertools.product((0, 1), repeat=len(suf_gaps)):
            suf = [g for g, on in zip(suf_gaps, sc) if on]
            layer_stages = k - len(pre) - len(suf)
            if 1 <= layer_stages <= chain.L:
                yield pre, suf, layer_stages


class _Structure:
    """One structure: its fixed stages and the count vectors of its layer stages."""

    def __init__(self, chain: _Chain, pre: list[int], suf: list[int], kl: int) -> None:
        self.pre, self.suf, self.kl = pre, suf, kl
        q = len(pre)
        r = q + kl - 1
        self.q = q
        starts = [0] + [g + 1 for g in pre]
        fixed = [chain.fixed_time(s, starts[s], starts[s + 1]) for s in range(q)]
        head_stop = suf[0] + 1 if suf else chain.n
        ends = [g + 1 for g in suf] + [chain.n]
        fixed += [chain.fixed_time(r + 1 + j, ends[j], ends[j + 1]) for j in range(len(suf))]
        self.fixed_max = max(fixed, default=0.0)
        self.fixed_sum = math.fsum(fixed)
        tail = tuple(range(starts[-1], chain.a))
        head = tuple(range(chain.e, head_stop))
        rows = []
        for s in range(q, r + 1):
            extras = (tail if s == q else ()) + (head if s == r else ())
            cut = chain.cut_after(s, head_stop) if s == r else (
                chain.inner_cut if s + 1 < chain.k else 0.0)
            rows.append(chain.layer_vector(s, extras, cut))
        self.vectors = np.vstack(rows)
        self.finite = np.isfinite(self.vectors)
        body = self.vectors[:, 1:]
        self.monotone = bool(np.all(body[:, 1:] >= body[:, :-1]))
        self.last_caps: tuple[int, ...] | None = None

    def caps(self, cap: float) -> np.ndarray | None:
        """Most layers each layer stage can hold within ``cap``; None when infeasible."""
        if self.fixed_max > cap:
            return None
        most = ((self.vectors <= cap) & self.finite).sum(axis=1)
        if most.min() < 1 or most.sum() < self.vectors.shape[1] - 1:
            return None
        return most

    def least_sum(self, most: np.ndarray, L: int, chain: _Chain
                  ) -> tuple[float, list[int]]:
        """Least sum of stage times with layer stage j holding 1..most[j] layers, L in all."""
        total = int(most.sum())
        lo = np.maximum(1, L - (total - most))
        prefix_lo, prefix_hi = 0, 0
        best = np.zeros(1)          # best[x - prefix_lo]: least sum with x layers so far
        choices = []
        for j in range(self.kl):
            c = np.arange(lo[j], most[j] + 1)
            rest_lo, rest_hi = int(lo[j + 1:].sum()), int(most[j + 1:].sum())
            new_lo = max(prefix_lo + int(lo[j]), L - rest_hi)
            new_hi = min(prefix_hi + int(most[j]), L - rest_lo)
            xs = np.arange(new_lo, new_hi + 1)
            prev = xs[:, None] - c[None, :] - prefix_lo
            ok = (prev >= 0) & (prev < len(best))
            cand = np.where(ok, best[np.clip(prev, 0, len(best) - 1)] + self.vectors[j, c][None, :],
                            _INF)
            arg = np.argmin(cand, axis=1)
            best = cand[np.arange(len(xs)), arg]
            choices.append((c[arg], new_lo))
            chain.work += cand.size
            prefix_lo, prefix_hi = new_lo, new_hi
        if prefix_lo != L or not math.isfinite(best[0]):
            return _INF, []
        counts, x = [], L
        for got, base in reversed(choices):
            n_j = int(got[x - base])
            counts.append(n_j)
            x -= n_j
        return self.fixed_sum + float(best[0]), counts[::-1]


def solve_partition_runs(problem: PartitionProblem, run: tuple[int, int]
                         ) -> PartitionSolution | None:
    """The exact partition by layer counts (see the module docstring); None when the
    problem does not suit it (stage times not growing with the count), so that the
    caller uses the generic DP. InfeasibleError (from
    ``diagnose_infeasible``) when no partition fits.

    >>> from tripar.partitioner.partition.dp import solve_partition_dp
    >>> prob = PartitionProblem.uniform(24, stages=4, activation_bytes=10, input_bytes=1,
    ...                                 memory_limit_bytes=120, num_microbatches=8)
    >>> fast = solve_partition_runs(prob, find_run(prob))
    >>> fast.objective_s == solve_partition_dp(prob, use_runs=False).objective_s
    True
    """
    start = time.perf_counter()
    v, steady = problem.virtual_stages, problem.num_microbatches * problem.virtual_stages - 1
    chain = _Chain(problem, run)
    structures = [_Structure(chain, *s) for s in _structures(chain)]
    if not structures or not all(s.monotone for s in structures):
        return None
    values = np.unique(np.concatenate(
        [s.vectors[np.isfinite(s.vectors)] for s in structures]
        + [np.array([s.fixed_max for s in structures])]))
    values = values[np.isfinite(values)]

    def feasible(cap: float) -> bool:
        chain.work += len(structures)
        return any(s.caps(cap) is not None for s in structures)

    if not len(values) or not feasible(values[-1]):
        raise diagnose_infeasible(problem)   # nothing fits: name the stage that falls short
    lo, hi = 0, len(values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(values[mid]):
            hi = mid
        else:
            lo = mid + 1
    p = problem
    cuts = sorted(p.cut_s)
    sum_lb = math.fsum(p.forward_s) + math.fsum(p.backward_s) + math.fsum(cuts[:chain.k - 1])
    best_value, best = _INF, None
    # with one microbatch (m v = 1) only the sum counts: one pass with no cap
    for cap in (values[lo:] if steady else [_INF]):
        if steady and sum_lb / v + steady * cap >= best_value:
            break
        for st in structures:
            most = st.caps(cap)
            if most is None:
                continue
            key = tuple(most.tolist())
            if key == st.last_caps:
                continue   # same counts open as at a lower cap: no better sum
            st.last_caps = key
            total, counts = st.least_sum(most, chain.L, chain)
            value = total / v + (steady * cap if steady else 0.0)
            if value < best_value:
                best_value, best = value, (st, counts)
    assert best is not None
    st, counts = best
    starts = [0] + [g + 1 for g in st.pre]
    at = chain.a
    for n_j in counts[:-1]:
        at += n_j
        starts.append(at)
    starts += [g + 1 for g in st.suf]
    bounds = starts[:chain.k]
    rec = [_recompute_blocks(problem, s, bounds[s], bounds[s + 1] if s + 1 < chain.k
                             else chain.n) for s in range(chain.k)]
    sol = evaluate_partition(problem, bounds, rec, solver="dp-runs", status="optimal",
                             solve_time_s=time.perf_counter() - start)
    assert math.isclose(sol.objective_s, best_value, rel_tol=1e-9, abs_tol=1e-12), \
        (sol.objective_s, best_value)
    return PartitionSolution(sol.stages, sol.objective_s, sol.bottleneck_s, sol.solver,
                             sol.status, time.perf_counter() - start, work=chain.work)


def _recompute_blocks(problem: PartitionProblem, s: int, first: int, stop: int
                      ) -> tuple[int, ...]:
    """The blocks stage s recomputes: the cheapest fitting counts per type (as the
    generic DP chooses them), the earliest blocks of each type."""
    p = problem
    blocks = range(first, stop)
    kinds: dict[tuple[int, float], list[int]] = {}
    for b in blocks:
        if p.recomputable(b):
            kinds.setdefault((p.saving_bytes(b), p.recompute_s[b]), []).append(b)
    base = sum(p.static_bytes[b] for b in blocks) + p.in_flight[s] * sum(
        p.activation_bytes[b] for b in blocks)
    if base <= p.memory_limit_bytes[s] and p.recompute != "full":
        return ()
    types = [(sig, rho, len(members)) for (sig, rho), members in kinds.items()]
    got = choose_recompute(types, base, p.in_flight[s], p.memory_limit_bytes[s], p.recompute)
    assert got is not None
    return tuple(sorted(b for members, r in zip(kinds.values(), got[1]) for b in members[:r]))
