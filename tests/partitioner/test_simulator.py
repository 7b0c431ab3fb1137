"""The step simulator: closed-form bubbles, p2p dependencies, memory, speed."""

from __future__ import annotations

import random

import pytest

from tripar.errors import PlanError
from tripar.partitioner.schedules import build_schedule
from tripar.partitioner.simulator import simulate
from tripar.partitioner.stage_cost import StageCost
from tripar.plan.schedule import Schedule

F, B, W = 1.0, 1.5, 0.5


def uniform(n: int, v: int = 1, **extra) -> list[StageCost]:
    return [StageCost(forward_s=F / v, backward_input_s=B / v, backward_weight_s=W / v, **extra)
            for _ in range(n)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_bubble_closed_form_gpipe_1f1b(name):
    for p in range(1, 7):
        for m in range(1, 13):
            r = simulate(build_schedule(name, p, m), uniform(p))
            assert r.bubble_fraction == pytest.approx((p - 1) / m, abs=1e-12)
            assert r.step_time_s == pytest.approx((m + p - 1) * (F + B + W))
            assert r.busy_s == pytest.approx([m * (F + B + W)] * p)


@pytest.mark.parametrize("p, v", [(2, 2), (2, 3), (4, 2), (4, 4), (8, 2)])
def test_bubble_closed_form_interleaved(p, v):
    for m in (p, 2 * p, 4 * p):
        r = simulate(build_schedule("interleaved-1f1b", p, m, vpp=v), uniform(p * v, v))
        assert r.bubble_fraction == pytest.approx((p - 1) / (v * m), abs=1e-12)
        assert r.step_time_s == pytest.approx(m * (F + B + W) + (p - 1) * (F + B + W) / v)


@pytest.mark.parametrize("f, b, w", [(1.0, 1.0, 1.0), (1.0, 1.5, 0.5), (2.0, 1.0, 1.0),
                                     (1.0, 2.0, 0.25)])
def test_zb_h1_closed_form(f, b, w):
    """ZB paper: (p-1)(F+B-W) of bubble instead of 1F1B's (p-1)(F+B+W) (W <= F, B; m >= p),
    so zb-h1 is shorter than 1f1b by 2 (p-1) W; F = B = W gives a (p-1)/(3m) bubble."""
    for p in range(1, 7):
        for m in range(p, 13):
            costs = [StageCost(forward_s=f, backward_input_s=b, backward_weight_s=w)] * p
            zb = simulate(build_schedule("zb-h1", p, m), costs).step_time_s
            one = simulate(build_schedule("1f1b", p, m), costs).step_time_s
            assert zb == pytest.approx(m * (f + b + w) + (p - 1) * (f + b - w))
            assert one - zb == pytest.approx(2 * (p - 1) * w)
    r = simulate(build_schedule("zb-h1", 4, 8), [StageCost(1.0, 1.0, 1.0)] * 4)
    assert r.bubble_fraction == pytest.approx(3 / (3 * 8))


def test_inflight_matches_reference_table():
    for p in range(1, 7):
        for m in range(1, 13):
            one = simulate(build_schedule("1f1b", p, m), uniform(p))
            assert one.stage_peak_inflight == tuple(min(p - i, m) for i in range(p))
            zb = simulate(build_schedule("zb-h1", p, m), uniform(p))
            assert zb.stage_peak_inflight == one.stage_peak_inflight
            gp = simulate(build_schedule("gpipe", p, m), uniform(p))
            assert gp.stage_peak_inflight == (m,) * p
    # interleaved: first rank holds p (1 + (p-1)/(p v)) full-stage microbatches, i.e.
    # v p + p - 1 stage-microbatches of 1/v of a stage each
    for p, v in [(2, 2), (4, 2), (4, 3), (8, 2)]:
        r = simulate(build_schedule("interleaved-1f1b", p, 4 * p, vpp=v), uniform(p * v, v))
        assert r.peak_inflight[0] / v == pytest.approx(p * (1 + (p - 1) / (p * v)))


def test_memory_bytes():
    p, m, act, inp, static = 4, 8, 100, 7, 1000
    one = simulate(build_schedule("1f1b", p, m),
                   uniform(p, activation_bytes=act, input_bytes=inp, static_bytes=static))
    assert one.peak_memory_bytes == tuple(static + min(p - i, m) * act for i in range(p))
    assert one.stage_peak_memory_bytes == one.peak_memory_bytes
    full = simulate(build_schedule("1f1b", p, m, recompute="full"),
                    uniform(p, activation_bytes=act, input_bytes=inp, static_bytes=static))
    # warm-up inputs kept, plus one microbatch's activations while it is recomputed
    assert full.peak_memory_bytes == tuple(static + min(p - i, m) * inp + act
                                           for i in range(p))
    assert full.stage_peak_inflight == (1,) * p
    for rank_timeline in full.memory_timeline:
        assert rank_timeline[0] == (0.0, static) and rank_timeline[-1][1] == static
    # interleaved: a rank's memory sums its virtual stages
    r = simulate(build_schedule("interleaved-1f1b", 2, 4, vpp=2),
                 uniform(4, 2, activation_bytes=10, static_bytes=1))
    assert r.peak_memory_bytes == tuple(2 + 10 * n for n in r.peak_inflight)


def test_zb_h1_memory_b_frees_activations_w_frees_the_rest():
    p, m = 4, 8
    r = simulate(build_schedule("zb-h1", p, m),
                 uniform(p, activation_bytes=100, weight_grad_bytes=30))
    assert r.stage_peak_pending_w == tuple(i + 1 for i in range(p))
    # last stage: p W's pending right after B3 (120), then W0 frees one and F4 takes one
    # microbatch's activations: 100 + 3 * 30
    assert r.peak_memory_bytes[p - 1] == 100 + 30 * (p - 1)
    assert r.peak_memory_bytes[0] == 4 * 100  # first stage: W right after B, as 1F1B
    assert max(tl[-1][1] for tl in r.memory_timeline) == 0
    assert simulate(build_schedule("1f1b", p, m), uniform(p)).stage_peak_pending_w == (0,) * p


def test_p2p_and_tail():
    c = StageCost(forward_s=1.0, backward_input_s=2.0, backward_weight_s=0.0, send_s=0.25,
                  tail_s=3.0)
    r = simulate(build_schedule("1f1b", 2, 1), [c, c])
    starts = {(e.stage, e.kind): e.start for e in r.events}
    assert starts[(1, "F")] == 1.25 and starts[(0, "B")] == 1.25 + 1.0 + 2.0 + 0.25
    assert r.pipeline_time_s == pytest.approx(6.5)
    assert r.finish_s == pytest.approx((9.5, 7.25))
    assert r.step_time_s == pytest.approx(9.5)


def test_events_respect_every_dependency():
    rng = random.Random(0)
    costs = [StageCost(forward_s=rng.uniform(0.5, 2), backward_input_s=rng.uniform(0.5, 2),
                       backward_weight_s=rng.uniform(0.1, 1), recompute_s=rng.uniform(0.5, 2),
                       send_s=rng.uniform(0, 0.3)) for _ in range(8)]
    for name, vpp, rec in [("1f1b", 1, "full"), ("zb-h1", 1, "none"),
                           ("interleaved-1f1b", 2, "none"), ("scp", 1, "stage-aware")]:
        s = build_schedule(name, 8 // vpp, 8, vpp=vpp, recompute=rec)
        r = simulate(s, costs[: s.num_stages])
        assert len(r.events) == sum(len(a) for a in s.actions)
        end = {(e.stage, e.kind.upper() if e.kind == "f" else e.kind, e.microbatch): e.end
               for e in r.events}
        last = s.num_stages - 1
        for e in r.events:
            if e.kind in "Ff" and e.stage > 0:
                assert e.start >= end[(e.stage - 1, "F", e.microbatch)] + \
                    costs[e.stage - 1].send_s - 1e-12
            if e.kind == "B" and e.stage < last:
                assert e.start >= end[(e.stage + 1, "B", e.microbatch)] + \
                    costs[e.stage].send_s - 1e-12
        by_rank: dict[int, list] = {}
        for e in r.events:
            by_rank.setdefault(e.rank, []).append(e)
        for rank, evs in by_rank.items():
            assert [str(a) for a in s.actions[rank]] == [f"{e.stage}{e.kind}{e.microbatch}"
                                                          for e in evs]
            assert all(a.end <= b.start + 1e-12 for a, b in zip(evs, evs[1:]))
            assert sum(e.end - e.start for e in evs) == pytest.approx(r.busy_s[rank])


def test_scp_is_never_slower_than_1f1b_with_full_recompute():
    for p in range(1, 9):
        for m in range(1, 17):
            for b, rc, snd in [(2.0, 1.0, 0.0), (1.0, 1.0, 0.0), (3.0, 1.0, 0.2), (2.0, 1.5, 0.1)]:
                costs = [StageCost(forward_s=1.0, backward_input_s=b, backward_weight_s=0.0,
                                   recompute_s=rc, send_s=snd)] * p
                scp = simulate(build_schedule("scp", p, m), costs, record_timeline=False)
                full = simulate(build_schedule("1f1b", p, m, recompute="full"), costs,
                                record_timeline=False)
                plain = simulate(build_schedule("1f1b", p, m), costs, record_timeline=False)
                assert scp.step_time_s <= full.step_time_s + 1e-9
                assert all(x <= y for x, y in zip(scp.stage_peak_inflight,
                                                  plain.stage_peak_inflight))
                if b == 2.0 and rc == 1.0 and snd == 0.0:
                    # every recomputation lands in idle time: as fast as 1F1B without any
                    assert scp.step_time_s == pytest.approx(plain.step_time_s)


def test_scp_on_imbalanced_stages():
    """Stages within +-20% of each other, random links: scp stays at or below 1F1B with full
    recomputation in almost every case; the forward shifted into stage S-2's bubble can wait
    for a slow upstream stage, which costs under 1% in the rare cases it shows."""
    rng = random.Random(1)
    slower, cases = 0, 0
    for p in range(2, 9):
        for m in range(1, 17):
            costs = []
            for _ in range(p):
                f = rng.uniform(0.8, 1.2)
                costs.append(StageCost(forward_s=f, backward_input_s=f * rng.uniform(1.5, 2.5),
                                       backward_weight_s=0.0, recompute_s=f,
                                       send_s=rng.uniform(0.0, 0.2)))
            scp = simulate(build_schedule("scp", p, m), costs, record_timeline=False)
            full = simulate(build_schedule("1f1b", p, m, recompute="full"), costs,
                            record_timeline=False)
            cases += 1
            slower += scp.step_time_s > full.step_time_s + 1e-9
            assert scp.step_time_s <= 1.01 * full.step_time_s
    assert slower <= cases // 50


def test_bad_inputs():
    s = build_schedule("1f1b", 2, 2)
    with pytest.raises(PlanError, match="2 virtual stages .* but 3 stage costs"):
        simulate(s, uniform(3))
    dead = Schedule.from_text("schedule x pp=2 vpp=1 microbatches=2\n"
                              "rank 0: F0 B0 F1 B1\nrank 1: F1 B1 F0 B0")
    with pytest.raises(PlanError, match="deadlocks"):
        simulate(dead, uniform(2))
    r = simulate(s, uniform(2), record_timeline=False)
    assert r.events == () and r.memory_timeline == ()
    assert r.step_time_s == simulate(s, uniform(2)).step_time_s


def test_large_interleaved_schedule_simulates_completely():
    # Its speed (under 2 s) is measured by benchmarks/simulate_speed.py, not here.
    p, m, v = 64, 512, 2
    s = build_schedule("interleaved-1f1b", p, m, vpp=v)
    r = simulate(s, uniform(p * v, v, activation_bytes=1, send_s=0.001))
    assert len(r.events) == 2 * p * v * m
    assert r.peak_inflight[0] == v * p + p - 1
