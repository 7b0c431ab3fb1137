"""The Megatron collectives on real gloo ranks (t = 2 and 4), against one-process references."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from tests._ranks import run_ranks
from tripar.codegen.collectives import (
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    scatter_to_tp,
    vocab_parallel_cross_entropy,
    vocab_parallel_embedding,
)
from tripar.codegen.tp_rng import RNGTracker, tp_rng_tracker


def _check_all(t: int) -> bytes:
    """Every check on this rank; returns a few values for the parent to compare across ranks."""
    import torch.distributed as dist
    from torch.testing import assert_close

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)  # the same draws on every rank
    x = torch.randn(4, 8, generator=g)
    w = [torch.randn(8, 3, generator=g) for _ in range(t)]  # rank r's weight

    # f then a rank-specific linear: the input gradient is the sum over ranks
    xr = x.clone().requires_grad_()
    (copy_to_tp(xr) @ w[rank]).sum().backward()
    assert_close(xr.grad, sum(torch.ones(4, 3) @ wi.T for wi in w))

    # g: forward sums the ranks' values, backward passes the gradient unchanged
    xr = (x * (rank + 1)).detach().requires_grad_()
    y = reduce_from_tp(xr)
    assert_close(y, x * sum(range(1, t + 1)))
    (y * 3).sum().backward()
    assert_close(xr.grad, torch.full_like(x, 3.0))

    # scatter: own columns forward, gradients gathered backward
    xr = x.clone().requires_grad_()
    piece = scatter_to_tp(xr, 1)
    assert_close(piece, x.chunk(t, 1)[rank])
    (piece * (rank + 1)).sum().backward()
    assert_close(xr.grad, torch.cat([torch.full((4, 8 // t), r + 1.0) for r in range(t)], 1))

    # gather: concatenation forward, own slice of the gradient backward
    xr = x.chunk(t, 1)[rank].clone().requires_grad_()
    full = gather_from_tp(xr, 1)
    assert_close(full, x)
    (full * torch.arange(8.0)).sum().backward()
    assert_close(xr.grad, torch.arange(8.0).chunk(t)[rank].expand(4, -1))

    # vocab-parallel cross entropy, with ignored targets, every reduction, 3-d logits
    vocab = 4 * t
    logits = torch.randn(6, vocab, generator=g) * 3
    target = torch.randint(0, vocab, (6,), generator=g)
    target[2] = -100
    for reduction in ("mean", "sum", "none"):
        ref_in = logits.clone().requires_grad_()
        ref = F.cross_entropy(ref_in, target, reduction=reduction)
        up = torch.randn(ref.shape, generator=g)
        (ref * up).sum().backward()
        mine_in = logits.chunk(t, 1)[rank].clone().requires_grad_()
        got = vocab_parallel_cross_entropy(mine_in, target, reduction=reduction)
        assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
        (got * up).sum().backward()
        assert_close(mine_in.grad, ref_in.grad.chunk(t, 1)[rank], rtol=1e-5, atol=1e-6)
    seq = torch.randn(2, vocab, 3, generator=g)  # [N, C, d]: the class dim is 1
    tgt = torch.randint(0, vocab, (2, 3), generator=g)
    ref_in = seq.clone().requires_grad_()
    F.cross_entropy(ref_in, tgt, ignore_index=1).backward()
    mine_in = seq.chunk(t, 1)[rank].clone().requires_grad_()
    got = vocab_parallel_cross_entropy(mine_in, tgt, ignore_index=1)
    got.backward()
    assert_close(got, F.cross_entropy(seq, tgt, ignore_index=1), rtol=1e-5, atol=1e-6)
    assert_close(mine_in.grad, ref_in.grad.chunk(t, 1)[rank], rtol=1e-5, atol=1e-6)

    # vocab-parallel embedding + g equals the full lookup; the padding row gets no gradient
    table = torch.randn(vocab, 5, generator=g)
    ids = torch.tensor([[0, 1, vocab - 1, 3], [2, 2, 0, vocab // 2]])
    ref_w = table.clone().requires_grad_()
    F.embedding(ids, ref_w, padding_idx=2).pow(2).sum().backward()
    mine_w = table.chunk(t)[rank].clone().requires_grad_()
    out = reduce_from_tp(vocab_parallel_embedding(ids, mine_w, rank * 4, padding_idx=2))
    assert_close(out, F.embedding(ids, table))
    out.pow(2).sum().backward()
    assert_close(mine_w.grad, ref_w.grad.chunk(t)[rank])

    buf = io.BytesIO()
    torch.save({"loss": got.detach(), "rng": tp_rng_tracker(5, rank).get_states()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("t", [2, 4])
def test_collectives_match_one_process(t):
    results = [torch.load(io.BytesIO(b)) for b in run_ranks(_check_all, t, t)]
    for r in results[1:]:
        torch.testing.assert_close(r["loss"], results[0]["loss"])  # replicated result
    states = [r["rng"]["tensor-parallel"] for r in results]
    assert all(not torch.equal(states[0], s) for s in states[1:])  # one stream per tp rank


def test_rng_tracker_forks_without_touching_the_default_stream():
    tracker = RNGTracker()
    tracker.add("a", seed=3)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", seed=4)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    with tracker.fork("a"):
        first = torch.rand(3)
    with tracker.fork("a"):
        second = torch.rand(3)  # the stream continues where it stopped
    torch.testing.assert_close(torch.rand(3), expected)
    saved = torch.Generator().manual_seed(3)
    torch.testing.assert_close(torch.cat([first, second]), torch.rand(6, generator=saved))
    states = tracker.get_states()
    with tracker.fork("a"):
        again = torch.rand(2)
    tracker.set_states(states)  # replay, as recomputation does
    with tracker.fork("a"):
        torch.testing.assert_close(torch.rand(2), again)
    with pytest.raises(KeyError, match="never added"):
        with tracker.fork("missing"):
            pass
