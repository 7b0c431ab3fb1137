"""Schedule generators: published orders, recompute placement, input checks."""

from __future__ import annotations

import pytest

from tripar.errors import ConfigError
from tripar.partitioner.schedules import build_schedule, scp_recomputed, warmup_in_flight
from tripar.partitioner.simulator import simulate
from tripar.partitioner.stage_cost import StageCost
from tripar.plan.schedule import ActionKind, Schedule

REFERENCE_SCP_4x6 = """\
schedule scp pp=4 vpp=1 microbatches=6
rank 0: F0 F1 F2 f3 B0 f4 B1 f5 B2 R3 B3 R4 B4 R5 B5
rank 1: f0 F1 F2 R0 B0 F3 B1 f4 B2 f5 B3 R4 B4 R5 B5
rank 2: f0 f1 F2 R0 B0 R1 B1 F3 B2 F4 B3 F5 B4 B5
rank 3: F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5
"""


def _text(s: Schedule, rank: int) -> str:
    return " ".join(s._token(a) for a in s.actions[rank])


def test_scp_reproduces_merak_orders():
    assert build_schedule("scp", 4, 6).to_text() == REFERENCE_SCP_4x6
    # REFERENCE.md's plain 1F1B on s2
    assert _text(build_schedule("1f1b", 4, 6), 2) == "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5"


@pytest.mark.parametrize("name, vpps", [("gpipe", [1]), ("1f1b", [1]), ("zb-h1", [1]),
                                        ("scp", [1]), ("interleaved-1f1b", [2, 3]),
                                        ("chimera", [1])])
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_every_schedule_is_valid(name, vpps, recompute):
    if name == "scp" and recompute == "none":
        recompute = "stage-aware"
    for pp in range(1, 7):
        for vpp in vpps:
            for m in range(1, 13):
                if name == "interleaved-1f1b" and m % pp:
                    continue
                if name == "chimera" and (pp % 2 or m % 2):
                    continue
                s = build_schedule(name, pp, m, vpp=vpp, recompute=recompute)
                assert (s.name, s.pp, s.vpp, s.num_microbatches) == (name, pp, vpp, m)
                s.validate()
                assert Schedule.from_text(s.to_text()) == s


def test_gpipe_and_1f1b_orders():
    assert _text(build_schedule("gpipe", 3, 3), 1) == "F0 F1 F2 B0 B1 B2"
    s = build_schedule("1f1b", 4, 6)
    assert _text(s, 0) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5"
    assert _text(s, 3) == "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5"
    # fewer microbatches than stages: warm-up is capped
    assert _text(build_schedule("1f1b", 4, 2), 0) == "F0 F1 B0 B1"


def test_full_recompute_puts_r_right_before_b():
    for name in ("gpipe", "1f1b", "zb-h1"):
        s = build_schedule(name, 3, 5, recompute="full")
        for acts in s.actions:
            kinds = [a.kind for a in acts]
            assert ActionKind.FORWARD not in kinds
            assert kinds.count(ActionKind.RECOMPUTE) == 5
            for i, a in enumerate(acts):
                if a.kind is ActionKind.BACKWARD:
                    prev = acts[i - 1]
                    assert (prev.kind, prev.microbatch) == (ActionKind.RECOMPUTE, a.microbatch)
    assert _text(build_schedule("1f1b", 2, 2, recompute="full"), 0) == "f0 f1 R0 B0 R1 B1"


def test_per_stage_recompute():
    s = build_schedule("interleaved-1f1b", 2, 4, vpp=2, recompute=[True, False, False, True])
    recomputing = {a.stage for acts in s.actions for a in acts if a.kind is ActionKind.RECOMPUTE}
    forwards_f = {a.stage for acts in s.actions for a in acts
                  if a.kind is ActionKind.FORWARD_INPUT_ONLY}
    assert recomputing == forwards_f == {0, 3}
    s.validate()


@pytest.mark.parametrize("pp, m, vpp", [(2, 4, 2), (4, 8, 2), (2, 8, 5), (2, 6, 7), (4, 4, 3),
                                        (8, 48, 6), (8, 16, 12)])
def test_interleaved_in_flight_parts_add_up_to_the_simulated_rank_peak(pp, m, vpp):
    """The planner's in-flight count per virtual stage: a rank's parts sum to the peak the
    simulator measures on it, the last virtual stage of the last rank (the head's) holds
    one microbatch, and no stage holds more than its own simulated peak."""
    counts = warmup_in_flight("interleaved-1f1b", pp, m, vpp)
    cost = StageCost(forward_s=1.0, backward_input_s=1.0, backward_weight_s=1.0)
    sim = simulate(build_schedule("interleaved-1f1b", pp, m, vpp=vpp), [cost] * (pp * vpp),
                   record_timeline=False)
    assert tuple(sum(counts[r::pp]) for r in range(pp)) == sim.peak_inflight
    assert all(c <= s for c, s in zip(counts, sim.stage_peak_inflight))
    assert counts[-1] == (1 if m > pp else m)


def test_interleaved_follows_megatron_warmup():
    pp, vpp, m = 4, 2, 8
    s = build_schedule("interleaved-1f1b", pp, m, vpp=vpp)
    for r, acts in enumerate(s.actions):
        first_b = next(i for i, a in enumerate(acts) if a.kind is ActionKind.BACKWARD)
        warmup = min(2 * (pp - 1 - r) + (vpp - 1) * pp, m * vpp)
        assert first_b == warmup + 1  # warm-up forwards, then the first steady forward
    # forwards go through chunk 0 for a group of pp microbatches, then chunk 1
    assert _text(s, 0).startswith("0F0 0F1 0F2 0F3 4F0 4F1 4F2 4F3 0F4")
    # backwards start on the last chunk
    assert next(a for a in s.actions[3] if a.kind is ActionKind.BACKWARD).stage == 7


def test_zb_h1_defers_rank_many_w():
    pp, m = 4, 8
    s = build_schedule("zb-h1", pp, m)
    for r, acts in enumerate(s.actions):
        kinds = [a.kind for a in acts]
        assert kinds.count(ActionKind.WEIGHT) == m
        first_w = kinds.index(ActionKind.WEIGHT)
        assert kinds[:first_w].count(ActionKind.BACKWARD) == r + 1
        # after the last B, the W's of the last r + 1 microbatches fill the cool-down
        last_b = len(kinds) - 1 - kinds[::-1].index(ActionKind.BACKWARD)
        assert [a.microbatch for a in acts[last_b + 1:]] == list(range(m - r - 1, m))


@pytest.mark.parametrize("stages, m", [(2, 1), (2, 5), (3, 2), (5, 3), (6, 12), (8, 20)])
def test_scp_rule_is_general(stages, m):
    s = build_schedule("scp", stages, m)
    s.validate()
    plain = build_schedule("1f1b", stages, m)
    for k, acts in enumerate(s.actions):
        d = stages - 1 - k
        chosen = scp_recomputed(k, stages, m)
        recomputed = {a.microbatch for a in acts if a.kind is ActionKind.RECOMPUTE}
        assert recomputed == chosen == {a.microbatch for a in acts
                                        if a.kind is ActionKind.FORWARD_INPUT_ONLY}
        if d == 0:
            assert not chosen
        if d == 1:
            assert chosen == set(range(min(2, m)))
        if d >= 2:
            assert set(range(max(0, m - d), m)) <= chosen  # the cool-down microbatches
        # every R right before its B
        for i, a in enumerate(acts):
            if a.kind is ActionKind.RECOMPUTE:
                assert (acts[i + 1].kind, acts[i + 1].microbatch) == (ActionKind.BACKWARD,
                                                                      a.microbatch)
        # same forward/backward skeleton as 1F1B, except the shifted forward at d = 1
        skeleton = [("F" if a.kind in (ActionKind.FORWARD, ActionKind.FORWARD_INPUT_ONLY)
                     else "B", a.microbatch) for a in acts if a.kind is not ActionKind.RECOMPUTE]
        base = [(a.kind.value, a.microbatch) for a in plain.actions[k]]
        if d == 1 and m >= 3:
            i = base.index(("B", 0))
            base[i], base[i + 1] = base[i + 1], base[i]
        assert skeleton == base


def test_scp_recompute_options():
    full = build_schedule("scp", 4, 6, recompute="full")
    for k, acts in enumerate(full.actions):
        n_r = sum(a.kind is ActionKind.RECOMPUTE for a in acts)
        assert n_r == (0 if k == 3 else 6)
    some = build_schedule("scp", 4, 6, recompute=[True, False, True, True])
    assert _text(some, 1) == _text(build_schedule("1f1b", 4, 6), 1)
    assert _text(some, 0) == "F0 F1 F2 f3 B0 f4 B1 f5 B2 R3 B3 R4 B4 R5 B5"
    with pytest.raises(ConfigError, match="use schedule '1f1b'"):
        build_schedule("scp", 4, 6, recompute="none")


@pytest.mark.parametrize("args, kwargs, match", [
    (("pipedream", 2, 2), {}, "unknown schedule 'pipedream'"),
    (("1f1b", 0, 2), {}, "pp must be a positive integer"),
    (("1f1b", 2, 0), {}, "num_microbatches must be a positive integer"),
    (("1f1b", 2, 4), {"vpp": 2}, "vpp=2 needs schedule 'interleaved-1f1b'"),
    (("interleaved-1f1b", 4, 6), {"vpp": 2}, "multiple of pp \\(4\\).*use 8 or 4"),
    (("interleaved-1f1b", 4, 8), {"vpp": 1}, "needs vpp >= 2"),
    (("1f1b", 2, 4), {"recompute": "some"}, "unknown recompute 'some'"),
    (("1f1b", 2, 4), {"recompute": [True]}, "must be 2 booleans"),
    (("1f1b", 2, 4), {"recompute": "stage-aware"}, "rule of schedule 'scp'"),
    (("scp", 2, 4), {"recompute": [1, 0]}, "must be 2 booleans"),
    (("chimera", 3, 4), {}, r"needs an even pp \(got pp=3\).*use pp=2 or pp=4"),
    (("chimera", 4, 5), {}, r"even number of microbatches \(got 5\).*use 4 or 6"),
])
def test_impossible_inputs_raise_config_error(args, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_schedule(*args, **kwargs)


def _idle_share(name: str, pp: int, m: int, backward: float = 1.0) -> float:
    """Idle time of the busiest rank over the pipeline's length (the papers' bubble ratio),
    uniform stages, forward 1, no communication."""
    cost = StageCost(forward_s=1.0, backward_input_s=backward, backward_weight_s=0.0)
    r = simulate(build_schedule(name, pp, m), [cost] * pp)
    return (r.pipeline_time_s - max(r.busy_s)) / r.pipeline_time_s


@pytest.mark.parametrize("pp, m", [(2, 2), (2, 6), (4, 4), (4, 8), (4, 12), (6, 6), (6, 12),
                                   (8, 8), (8, 16), (8, 32)])
def test_chimera_bubble_is_the_papers(pp, m):
    """Chimera (Li and Hoefler, Table 1): bubble ratio (D - 2) / (2 N + D - 2) against
    1F1B's (D - 1) / (N + D - 1), with forward and backward one slot each as the paper
    counts them."""
    assert _idle_share("chimera", pp, m) == pytest.approx((pp - 2) / (2 * m + pp - 2))
    assert _idle_share("1f1b", pp, m) == pytest.approx((pp - 1) / (m + pp - 1))
    # with the backward twice the forward Chimera still beats 1F1B's bubble
    assert _idle_share("chimera", pp, m, 2.0) < _idle_share("1f1b", pp, m, 2.0) or pp == 2


@pytest.mark.parametrize("pp", [2, 4, 6, 8])
def test_chimera_balances_activations(pp):
    """With N = D microbatches (the paper's basic unit) rank r holds r + D/2 + 1 stage
    microbatches at its peak (the ranks at either end D/2 + 1, the middle ones D): the
    paper's [(D/2 + 1), D], where 1F1B's rank r holds D - r (D on rank 0, 1 on the last).
    Each stage's replica keeps min(D - s, N / 2), as ``warmup_in_flight`` tells the
    memory model."""
    cost = StageCost(forward_s=1.0, backward_input_s=2.0, backward_weight_s=0.0,
                     activation_bytes=1)
    chimera = simulate(build_schedule("chimera", pp, pp), [cost] * pp)
    one_f_one_b = simulate(build_schedule("1f1b", pp, pp), [cost] * pp)
    want = tuple(min(r, pp - 1 - r) + pp // 2 + 1 for r in range(pp))
    assert chimera.peak_inflight == want
    assert (min(want), max(want)) == (pp // 2 + 1, pp)
    assert one_f_one_b.peak_inflight == tuple(pp - r for r in range(pp))
    assert chimera.peak_memory_bytes == want  # one byte per stage microbatch
    assert chimera.stage_peak_inflight == warmup_in_flight("chimera", pp, pp)
    for m in (2 * pp, 4 * pp):  # more microbatches: each replica of stage s holds D - s
        many = simulate(build_schedule("chimera", pp, m), [cost] * pp)
        assert many.stage_peak_inflight == warmup_in_flight("chimera", pp, m)
        assert many.peak_inflight == (pp + 1,) * pp


def test_chimera_places_the_two_pipelines():
    """Rank i runs stage i on the first half of the microbatches and stage D-1-i on the
    second; each pipeline on its own is 1F1B (forward order kept, each stage's backwards in
    microbatch order)."""
    s = build_schedule("chimera", 4, 8)
    for rank, acts in enumerate(s.actions):
        for a in acts:
            assert a.stage == (rank if a.microbatch < 4 else 3 - rank), (rank, a)
        for pipe in (range(4), range(4, 8)):
            mine = [a for a in acts if a.microbatch in pipe]
            for kind in (ActionKind.FORWARD, ActionKind.BACKWARD):
                assert [a.microbatch for a in mine if a.kind is kind] == list(pipe)
