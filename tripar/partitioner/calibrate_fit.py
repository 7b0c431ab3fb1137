"""The GPU efficiency curve fitted to published training runs, and its out-of-sample check.

A published run is a model on a cluster under a parallel configuration, with the
throughput its authors measured (the Megatron-LM tables of :mod:`.megatron`). tripar costs
it as it costs any plan (stage costs of the proxy graph, the schedule, the simulator),
and :func:`fit_efficiency` chooses the :class:`Efficiency` fields ``matmul_max`` and
``matmul_half`` (and ``memory_traffic`` when asked) that minimise the squared log error
of the predicted TFLOP/s per GPU. :func:`leave_one_out` predicts each run from a fit made
without it.

Why it is fast. Every action's duration is affine in
``theta = (1 / matmul_max, matmul_half / matmul_max, memory_traffic)``: a product takes
``flops (x + half) / (peak max x)``, the other work ``traffic x bytes / bandwidth``, the
collectives do not depend on theta. The simulated step time is a longest path through
the schedule, so it is a maximum of affine functions of theta: convex and piecewise
affine. Each :class:`CalibrationRun` keeps the affine pieces it met where it was
simulated (value and slopes by finite differences: "cuts"); their maximum is a model of
its step time, exact at those points. Nelder-Mead minimises the loss on the models, the
optimum is simulated, a run whose model differs there from its simulation gets a cut
at that point, and the loss is minimised again, until every model agrees with the
simulator at the optimum. The fit returned is thus scored by the simulator itself; only
the search path runs on the models. A leave-one-out over the ten Megatron rows
simulates each run a few times, where a simulator-driven Nelder-Mead would take
thousands of simulations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from tripar.errors import ConfigError, TriparError
from tripar.graph.proxy import ProxyGraph
from tripar.partitioner.cost.stages import recompute_fractions, stage_costs, uniform_boundaries
from tripar.partitioner.hardware import Cluster, Efficiency
from tripar.partitioner.schedules import build_schedule
from tripar.partitioner.simulator import encode_schedule, simulate
from tripar.plan.config import ParallelConfig

MODEL_RTOL = 1e-6
"""How close (relative) a run's model must be to its simulation at the fitted point."""
_STEP = 1e-5
"""Relative finite-difference step of a cut's slopes."""
_MAX_ROUNDS = 8


class FitError(TriparError):
    """The fit did not settle: the models never agreed with the simulator at the optimum."""


class CalibrationRun:
    """One published run as tripar costs it.

    ``flops`` is what the publication counts for one step (the 96-factor formula for the
    Megatron table); ``published`` its TFLOP/s per GPU. ``config.recompute`` is
    ``"none"`` or ``"full"``. The schedule is built and encoded once; :meth:`step_time`
    then re-costs the stages and simulates, as :func:`step_estimate` does.

    >>> from tripar.partitioner.hardware import Cluster
    >>> cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=1, num_microbatches=4,
    ...                      recompute="full")
    >>> run = CalibrationRun("tiny", example_graph(layers=4), Cluster.builtin("a100-80g"),
    ...                      cfg, flops=1e12, published=100.0)
    >>> from tripar.partitioner.cost.step import step_estimate
    >>> run.step_time() == step_estimate(run.graph, run.cluster, cfg).step_time_s
    True
    """

    def __init__(self, name: str, graph: ProxyGraph, cluster: Cluster, config: ParallelConfig,
                 *, flops: float, published: float) -> None:
        if config.recompute not in ("none", "full"):
            raise ConfigError(f"a calibration run recomputes 'none' or 'full', got "
                              f"{config.recompute!r} ({name})")
        if not (flops > 0 and published > 0):
            raise ConfigError(f"run {name}: flops and published TFLOP/s must be > 0, got "
                              f"{flops} and {published}")
        self.name, self.graph, self.cluster, self.config = name, graph, cluster, config
        self.flops, self.published = float(flops), float(published)
        stages = config.pp * config.vpp
        self._bounds = uniform_boundaries(graph, stages)
        self._schedule = build_schedule(config.schedule, config.pp, config.num_microbatches,
                                        vpp=config.vpp, recompute=config.recompute)
        self._encoded = encode_schedule(self._schedule)
        self._cuts: dict[Efficiency, list[tuple[tuple[float, ...], float, tuple[float, ...]]]] = {}
        """Per fixed part of the efficiency (``_fixed``): (theta, step time, slopes)."""
        self.simulations = 0
        """How many times :meth:`step_time` simulated this run."""

    def step_time(self, efficiency: Efficiency | None = None) -> float:
        """Simulated seconds of one step with ``efficiency`` (default: the cluster's)."""
        cluster = self.cluster
        if efficiency is not None:
            cluster = replace(cluster, device=replace(cluster.device, efficiency=efficiency))
        stages = self.config.pp * self.config.vpp
        if self.config.recompute == "full":  # the schedule's f/R actions recompute
            costs = stage_costs(self.graph, cluster, self.config, self._bounds,
                                recompute="none", explicit_recompute=True)
        else:
            costs = stage_costs(self.graph, cluster, self.config, self._bounds,
                                recompute=recompute_fractions("none", stages))
        self.simulations += 1
        return simulate(self._schedule, costs, record_timeline=False,
                        encoded=self._encoded).step_time_s

    def predict(self, efficiency: Efficiency | None = None) -> float:
        """Predicted TFLOP/s per GPU: the published FLOPs over the simulated step."""
        return self._tflops(self.step_time(efficiency))

    def _tflops(self, seconds: float) -> float:
        return self.flops / seconds / self.config.devices / 1e12

    # The model of the step time in theta (see the module docstring).
    def _cut(self, theta: tuple[float, ...], base: Efficiency) -> None:
        """Simulate at ``theta`` and keep the affine piece found there."""
        value = self.step_time(_efficiency(theta, base))
        slopes = []
        for k, t in enumerate(theta):
            h = _STEP * max(abs(t), 1.0)
            moved = tuple(v + (h if i == k else 0.0) for i, v in enumerate(theta))
            slopes.append((self.step_time(_efficiency(moved, base)) - value) / h)
        self._cuts.setdefault(_fixed(base, len(theta)), []).append(
            (theta, value, tuple(slopes)))

    def _modelled(self, theta: tuple[float, ...], base: Efficiency) -> float:
        """The largest of the cuts at ``theta``: a lower bound of the step time there."""
        return max(value + sum(g * (t - t0) for g, t, t0 in zip(slopes, theta, at))
                   for at, value, slopes in self._cuts[_fixed(base, len(theta))])

    def _has_cuts(self, base: Efficiency, size: int) -> bool:
        return bool(self._cuts.get(_fixed(base, size)))


def _fixed(base: Efficiency, size: int) -> Efficiency:
    """What the cuts of a theta of ``size`` depend on: ``base`` without the fitted fields."""
    return replace(base, matmul_max=1.0, matmul_half=0.0, source="",
                   memory_traffic=0.0 if size > 2 else base.memory_traffic)


def _theta(eff: Efficiency, fit_traffic: bool) -> tuple[float, ...]:
    theta = (1.0 / eff.matmul_max, eff.matmul_half / eff.matmul_max)
    return theta + (eff.memory_traffic,) if fit_traffic else theta


def _efficiency(theta: Sequence[float], base: Efficiency) -> Efficiency:
    traffic = theta[2] if len(theta) > 2 else base.memory_traffic
    return replace(base, matmul_max=1.0 / theta[0], matmul_half=theta[1] / theta[0],
                   memory_traffic=traffic)


@dataclass(frozen=True, slots=True)
class EfficiencyFit:
    """What :func:`fit_efficiency` found."""

    efficiency: Efficiency
    loss: float
    """Sum over the runs of log(predicted / published)^2, predicted by the simulator."""
    predicted: tuple[float, ...]
    """TFLOP/s per GPU of each run at the fitted efficiency (simulated)."""
    rounds: int
    """Nelder-Mead minimisations until the models agreed with the simulator."""


def fit_efficiency(runs: Sequence[CalibrationRun], base: Efficiency, *,
                   fit_traffic: bool = False,
                   start: tuple[float, float] | None = None) -> EfficiencyFit:
    """The efficiency that minimises the squared log error over ``runs``.

    Fitted: ``matmul_max`` and ``matmul_half`` (and ``memory_traffic`` with
    ``fit_traffic``); the other fields are ``base``'s. Nelder-Mead starts at ``start``
    (``matmul_max``, ``matmul_half``), default ``base``'s. Runs are costed on their own
    clusters with the efficiency replaced. Raises FitError if the step-time models never
    agree with the simulator at the optimum.

    Runs published by a known curve give it back (to Nelder-Mead's tolerance):

    >>> from tripar.partitioner.hardware import Cluster
    >>> truth = Efficiency(matmul_max=0.7, matmul_half=40.0, memory_traffic=1.0)
    >>> one = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=1, num_microbatches=1)
    >>> runs = [CalibrationRun(f"h{h}", example_graph(hidden=h), Cluster.builtin("a100-80g"),
    ...                        one, flops=1e12, published=1.0) for h in (64, 256, 1024, 4096)]
    >>> for run in runs:
    ...     run.published = run.predict(truth)
    >>> fit = fit_efficiency(runs, replace(truth, matmul_max=0.5, matmul_half=100.0))
    >>> round(fit.efficiency.matmul_max, 2), round(fit.efficiency.matmul_half)
    (0.7, 40)
    """
    if not runs:
        raise ConfigError("fit_efficiency needs at least one published run")
    e_max, half = start if start is not None else (base.matmul_max, base.matmul_half)

    def make(x: Sequence[float]) -> Efficiency | None:
        traffic = x[2] if fit_traffic else base.memory_traffic
        if not 0.05 < x[0] <= 1.0 or traffic < 0 or not -2 < x[1] < 9:
            return None
        return replace(base, matmul_max=x[0], matmul_half=math.exp(x[1]),
                       memory_traffic=traffic)

    def loss_of(seconds: Sequence[float]) -> float:
        return sum(math.log(run._tflops(s) / run.published) ** 2
                   for run, s in zip(runs, seconds))

    def modelled_loss(x: Sequence[float]) -> float:
        eff = make(x)
        if eff is None:
            return 1e9
        theta = _theta(eff, fit_traffic)
        return loss_of([run._modelled(theta, base) for run in runs])

    x0 = [e_max, math.log(max(half, 1.0))]
    steps = [0.1, 1.0]
    if fit_traffic:
        x0, steps = x0 + [base.memory_traffic], steps + [1.0]
    start_eff = make(x0)
    if start_eff is None:
        raise ConfigError(f"fit start matmul_max={e_max}, matmul_half={half} is outside the "
                          f"fitted range (0.05 < matmul_max <= 1, e^-2 < matmul_half < e^9)")
    size = len(_theta(start_eff, fit_traffic))
    for run in runs:
        if not run._has_cuts(base, size):
            run._cut(_theta(start_eff, fit_traffic), base)
    for rounds in range(1, _MAX_ROUNDS + 1):
        best, _ = nelder_mead(modelled_loss, x0, steps=steps)
        eff = make(best)
        theta = _theta(eff, fit_traffic)
        exact = [run.step_time(eff) for run in runs]
        off = [run for run, s in zip(runs, exact)
               if abs(run._modelled(theta, base) - s) > MODEL_RTOL * s]
        if not off:
            return EfficiencyFit(eff, loss_of(exact),
                                 tuple(run._tflops(s) for run, s in zip(runs, exact)), rounds)
        for run in off:
            run._cut(theta, base)
    raise FitError(f"the step-time models of {len(off)} runs ({', '.join(r.name for r in off)}) "
                   f"still differ from the simulator after {_MAX_ROUNDS} rounds")


def leave_one_out(runs: Sequence[CalibrationRun], base: Efficiency, *,
                  fit_traffic: bool = False,
                  start: tuple[float, float] | None = None) -> tuple[float, ...]:
    """Each run's TFLOP/s per GPU predicted (simulated) with the efficiency fitted to the
    other runs (:func:`fit_efficiency` with ``base``, ``fit_traffic`` and ``start``)."""
    if len(runs) < 2:
        raise ConfigError(f"leave-one-out needs at least 2 runs, got {len(runs)}")
    predicted = []
    for i, held_out in enumerate(runs):
        fit = fit_efficiency([r for j, r in enumerate(runs) if j != i], base,
                             fit_traffic=fit_traffic, start=start)
        predicted.append(held_out.predict(fit.efficiency))
    return tuple(predicted)


def nelder_mead(f: Callable[[list[float]], float], x0: Sequence[float], steps: Sequence[float],
                iterations: int = 120, tolerance: float = 1e-7) -> tuple[list[float], float]:
    """Minimise ``f`` from ``x0`` (a small, dependency-free Nelder-Mead); (x, f(x)).

    >>> x, value = nelder_mead(lambda x: (x[0] - 1) ** 2 + (x[1] + 2) ** 2, [0, 0], [1, 1],
    ...                        iterations=200, tolerance=1e-12)
    >>> [round(v, 3) for v in x]
    [1.0, -2.0]
    """
    simplex = [list(x0)] + [[x + (s if i == j else 0) for j, x in enumerate(x0)]
                            for i, s in enumerate(steps)]
    values = [f(x) for x in simplex]
    for _ in range(iterations):
        order = sorted(range(len(simplex)), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < tolerance:
            break
        centroid = [sum(col) / (len(simplex) - 1) for col in zip(*simplex[:-1])]

        def towards(scale, centroid=centroid, worst=simplex[-1]):
            return [c + scale * (w - c) for c, w in zip(centroid, worst)]

        reflected = towards(-1.0)
        fr = f(reflected)
        if fr < values[0]:
            expanded = towards(-2.0)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = towards(0.5)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (x - b) for b, x in zip(best, p)]
                                    for p in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    i = min(range(len(simplex)), key=values.__getitem__)
    return simplex[i], values[i]
