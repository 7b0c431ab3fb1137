"""Tensor-parallel region choice: the ILP against brute-force enumeration."""

from __future__ import annotations

import itertools
import random

import pytest

from tripar.errors import ConfigError, InfeasibleError
from tripar.graph.proxy import TPRegion
from tripar.partitioner.tp_choice import (
    TPCandidate,
    build_tp_problem,
    choose_tp_regions,
    region_name,
)


def region(block: str, kind: str, degrees=(2, 4, 8)) -> TPRegion:
    return TPRegion(kind=kind, block=block, nodes=(f"{block}_fc1", f"{block}_fc2"),
                    shards=((f"{block}.fc1.weight", 0), (f"{block}.fc2.weight", 1)),
                    forward_collective="all_reduce", backward_collective="all_reduce",
                    comm_bytes=1024, degrees=tuple(degrees))


def brute_force(cands, degree, memory_bytes, limit):
    """Least time delta over every subset of groups (None if nothing fits)."""
    groups: dict[str, list[TPCandidate]] = {}
    for c in cands:
        if degree in c.region.degrees:
            groups.setdefault(c.group or c.name, []).append(c)
    keys = list(groups)
    best = None
    for mask in itertools.product((0, 1), repeat=len(keys)):
        chosen = [c for k, on in zip(keys, mask) if on for c in groups[k]]
        mem = memory_bytes - sum(c.memory_saving_bytes for c in chosen)
        if mem > limit:
            continue
        delta = sum(c.collective_s - c.compute_saving_s for c in chosen)
        if best is None or delta < best - 1e-12:
            best = delta
    return best


def test_ilp_matches_brute_force_on_random_cases():
    rng = random.Random(11)
    feasible = 0
    for _ in range(40):
        cands = []
        for i in range(rng.randint(1, 8)):
            degrees = rng.choice([(2, 4), (2,), (2, 4, 8), (4,)])
            group = rng.choice(["", "", "layer-mlp", "layer-attn"])
            cands.append(TPCandidate(region(f"h.{i}", rng.choice(["mlp", "attention"]), degrees),
                                     rng.randint(0, 20) / 4, rng.randint(0, 20) / 4,
                                     rng.randint(0, 100), group))
        degree = rng.choice([2, 4])
        memory = 1000
        limit = rng.randint(850, 1000)
        want = brute_force(cands, degree, memory, limit)
        if want is None:
            with pytest.raises(InfeasibleError, match=f"at tp={degree}"):
                choose_tp_regions(cands, degree=degree, memory_bytes=memory,
                                  memory_limit_bytes=limit)
            continue
        feasible += 1
        got = choose_tp_regions(cands, degree=degree, memory_bytes=memory,
                                memory_limit_bytes=limit)
        assert got.status == "optimal"
        assert got.time_delta_s == pytest.approx(want, abs=1e-9)
        assert got.memory_bytes <= limit
        assert all(degree in r.degrees for r in got.sharded)
        assert len(got.sharded) + len(got.replicated) == len(cands)
    assert feasible >= 25


def test_memory_forces_a_slower_shard():
    mlp = TPCandidate(region("h.0", "mlp"), compute_saving_s=1.0, collective_s=2.0,
                      memory_saving_bytes=400)
    attn = TPCandidate(region("h.0", "attention"), compute_saving_s=1.0, collective_s=1.5,
                       memory_saving_bytes=100)
    roomy = choose_tp_regions([mlp, attn], degree=2, memory_bytes=1000, memory_limit_bytes=1000)
    assert roomy.sharded == () and roomy.time_delta_s == 0.0
    tight = choose_tp_regions([mlp, attn], degree=2, memory_bytes=1000, memory_limit_bytes=650)
    # only the MLP frees enough (400 >= 350); the attention alone (100) would not
    assert [region_name(r) for r in tight.sharded] == ["h.0:mlp:0"]
    assert tight.memory_bytes == 600 and tight.time_delta_s == pytest.approx(1.0)
    reasons = dict((region_name(r), why) for r, why in tight.replicated)
    assert "cost more time" in reasons["h.0:attention:0"]


def test_only_proven_degrees_are_sharded():
    att = TPCandidate(region("h.0", "attention", degrees=(2, 4)), 5.0, 1.0, 10)
    choice = choose_tp_regions([att], degree=8, memory_bytes=100, memory_limit_bytes=100)
    assert choice.sharded == ()
    (reg, why), = choice.replicated
    assert "not proven at tp=8" in why and "2, 4" in why
    assert choose_tp_regions([att], degree=4, memory_bytes=100,
                             memory_limit_bytes=100).sharded == (att.region,)


def test_groups_share_one_decision_and_variable(tmp_path):
    cands = [TPCandidate(region(f"h.{i}", "mlp"), 1.0, 0.6, 10, group="layer:mlp")
             for i in range(96)]
    milp = build_tp_problem(cands, degree=4, memory_bytes=10_000, memory_limit_bytes=10_000)
    assert len(milp.variables) == 1
    text = milp.dump_lp(tmp_path / "tp.lp").read_text()
    assert "shard_g0_layer_mlp" in text and "memory_limit" in text
    choice = choose_tp_regions(cands, degree=4, memory_bytes=10_000, memory_limit_bytes=10_000)
    assert len(choice.sharded) == 96
    assert choice.time_delta_s == pytest.approx(96 * -0.4)


def test_infeasible_even_when_all_sharded():
    cands = [TPCandidate(region("h.0", "mlp"), 0.0, 0.0, 100)]
    with pytest.raises(InfeasibleError) as info:
        choose_tp_regions(cands, degree=2, memory_bytes=1000, memory_limit_bytes=800)
    text = str(info.value)
    assert "needs 900 bytes" in text and "has 800 bytes" in text and "pipeline stages" in text


def test_degree_one_and_bad_inputs():
    cands = [TPCandidate(region("h.0", "mlp"), 1.0, 0.0, 100)]
    one = choose_tp_regions(cands, degree=1, memory_bytes=50, memory_limit_bytes=100)
    assert one.sharded == () and one.memory_bytes == 50 and one.solver == "none"
    with pytest.raises(ConfigError, match="positive integer"):
        build_tp_problem(cands, degree=0, memory_bytes=1, memory_limit_bytes=1)
    with pytest.raises(ConfigError, match="collective_s of h.0:mlp:0 must be >= 0"):
        TPCandidate(region("h.0", "mlp"), 1.0, -1.0, 0)
