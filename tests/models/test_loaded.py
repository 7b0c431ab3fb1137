"""tripar.models.loaded: the seeded RNG every MODEL spec form initialises under."""

from __future__ import annotations

import torch

from tripar.models.loaded import seeded


def test_seeded_draws_repeat_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(7, torch.device("cpu")):
        first = torch.rand(4)
    with seeded(7, torch.device("meta")):
        again = torch.rand(4)
    with seeded(8, torch.device("cpu")):
        other = torch.rand(4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(torch.rand(3), expected)
