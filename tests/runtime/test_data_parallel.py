"""Data parallelism on gloo ranks: overlapped buckets, ZeRO-2 = plain dp holding 1/dp of the
gradients (ZeRO-1 keeping the whole buckets), global-norm clipping."""

from __future__ import annotations

import pytest
import torch
from runtime_models import train_and_compare
from torch.testing import assert_close

from tests._ranks import run_ranks
from tripar.runtime.data_parallel import local_batch
from tripar.runtime.mesh import build_mesh

CASES = [("interleaved-1f1b", 2, "adamw"), ("zb-h1", 1, "sgd")]


def _zero_and_clip(layouts: list[tuple[int, int]]) -> list[str]:
    done = []
    for pp, dp in layouts:
        mesh = build_mesh(pp, dp, 1, timeout_s=30)
        clipped = False
        for schedule, vpp, opt in CASES:
            if pp == 1 and vpp > 1:
                continue
            plain = train_and_compare(mesh, schedule, vpp, opt)
            zero = train_and_compare(mesh, schedule, vpp, opt, zero=2)
            what = f"pp={pp} dp={dp} {schedule} {opt}"
            # ZeRO-2 against plain dp directly (both also matched one process above)
            for name, p in plain["params"].items():
                assert_close(zero["params"][name], p, rtol=1e-5, atol=1e-5,
                             msg=lambda m, n=name, w=what: f"{w}: ZeRO-2 differs at {n}: {m}")
            # after the backward a ZeRO-2 rank holds its 1/dp shard of each bucket and
            # nothing else; plain dp holds every gradient
            held = sum(p.numel() for p in plain["params"].values())
            assert plain["grad_numel"] == held, what
            assert zero["grad_numel"] == zero["padded"] // dp < held, what
            assert plain["overlapped"] > 0 and zero["overlapped"] > 0, what
            if opt == "adamw":  # exp_avg and exp_avg_sq: 2 values per (padded) element
                assert plain["state_numel"] == 2 * sum(p.numel() for p in plain["params"].values())
                assert zero["state_numel"] == 2 * zero["padded"] // dp < plain["state_numel"], what
            if opt == "sgd":  # ZeRO-1 keeps the persistent buckets, so every value
                one = train_and_compare(mesh, schedule, vpp, opt, zero=1)
                assert one["grad_numel"] == one["padded"] >= held, what
                for name, p in plain["params"].items():
                    assert_close(one["params"][name], p, rtol=1e-5, atol=1e-5)
            if not clipped:  # clipping once per layout, with and without ZeRO
                for use_zero in (0, 2):
                    train_and_compare(mesh, schedule, vpp, opt, zero=use_zero, clip=0.5)
                clipped = True
            done.append(what)
    return done


@pytest.mark.parametrize("world, layouts", [(4, [(2, 2), (1, 4)])], ids=["pp2xdp2+dp4"])
def test_zero2_and_clipping_match_single_process(world, layouts):
    results = run_ranks(_zero_and_clip, world, layouts, timeout_s=120)
    assert all(len(r) == 3 for r in results), results


def _pipeline_only(schedules: list[str]) -> list[str]:
    """pp=2, dp=1: nothing to reduce, so no bucket is copied or launched; training (with
    clipping, whose norm sums over pp) still matches one process."""
    mesh = build_mesh(2, 1, 1, timeout_s=30)
    done = []
    for schedule in schedules:
        for clip in (None, 0.5):
            got = train_and_compare(mesh, schedule, 1, "adamw", clip=clip)
            assert got["overlapped"] == 0, (schedule, got["overlapped"])
            done.append(f"{schedule} clip={clip}")
    from tripar.runtime.data_parallel import DataParallel

    sync = DataParallel([torch.nn.Linear(2, 2)], mesh, lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert sync._hooks == [], "dp=1 without ZeRO must register no gradient hooks"
    zero = DataParallel([torch.nn.Linear(2, 2)], mesh, lambda ps: torch.optim.SGD(ps, lr=0.1),
                        zero=2)
    assert len(zero._hooks) == 2  # ZeRO at dp=1 still flattens into its shards
    zero.remove_hooks()
    # ZeRO-1 (like plain dp over more ranks): autograd accumulates straight into the
    # persistent bucket, the gradients being views of it
    lin = torch.nn.Linear(2, 2)
    one = DataParallel([lin], mesh, lambda ps: torch.optim.SGD(ps, lr=0.1), zero=1)
    (bucket,) = one.buckets
    one.begin_step(2)
    lin(torch.ones(1, 2)).sum().backward()
    assert all(p.grad.untyped_storage().data_ptr() == bucket.buffer.untyped_storage().data_ptr()
               for p in lin.parameters())
    lin(torch.ones(1, 2)).sum().backward()  # the last microbatch launches the bucket
    assert bucket.buffer.tolist() == [2.0] * 6  # bias, then weight: both microbatches summed
    one.finish()
    assert one.grad_numel() == 6 and all(p.grad is None for p in lin.parameters())
    one.remove_hooks()
    return done


def test_pipeline_only_skips_the_reduction_and_still_clips():
    results = run_ranks(_pipeline_only, 2, ["1f1b", "zb-h1"], timeout_s=120)
    assert all(len(r) == 4 for r in results), results


def test_local_batch_slices_dim0():
    class FakeMesh:
        dp = 2
        device = torch.device("cpu")

        class coords:  # noqa: N801 - mimics MeshCoords
            dp = 1

    x, y = torch.arange(8).reshape(4, 2), torch.arange(4)
    got = local_batch((x, y), FakeMesh)
    assert got[0].tolist() == [[4, 5], [6, 7]] and got[1].tolist() == [2, 3]
    assert local_batch({"y": y}, FakeMesh)["y"].tolist() == [2, 3]
    FakeMesh.device = torch.device("meta")  # a rank on another device (CUDA under NCCL)
    assert local_batch((x, y), FakeMesh)[0].device.type == "meta"
