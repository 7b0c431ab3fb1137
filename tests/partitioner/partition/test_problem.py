"""The partition problem's records: validation and the 1F1B in-flight counts."""

from __future__ import annotations

import pytest

from tripar.errors import ConfigError
from tripar.partitioner.partition.problem import PartitionProblem, one_f_one_b_in_flight


def test_one_f_one_b_in_flight_counts():
    assert one_f_one_b_in_flight(4, 8) == (4, 3, 2, 1)
    assert one_f_one_b_in_flight(4, 2) == (2, 2, 2, 1)


def test_problem_rejects_inconsistent_fields():
    base = dict(blocks=("a", "b"), forward_s=(1, 1), backward_s=(2, 2), recompute_s=(1, 1),
                activation_bytes=(4, 4), input_bytes=(1, 1), static_bytes=(0, 0),
                in_flight=(2, 1), memory_limit_bytes=100, num_microbatches=2)
    assert PartitionProblem(**base).memory_limit_bytes == (100, 100)
    with pytest.raises(ConfigError, match="forward_s has 1 entries for 2 blocks"):
        PartitionProblem(**{**base, "forward_s": (1,)})
    with pytest.raises(ConfigError, match="finite and >= 0"):
        PartitionProblem(**{**base, "activation_bytes": (-1, 4)})
    with pytest.raises(ConfigError, match="p \\* v"):
        PartitionProblem(**{**base, "in_flight": (1, 1, 1), "virtual_stages": 2})
    with pytest.raises(ConfigError, match="unknown recompute"):
        PartitionProblem(**{**base, "recompute": "some"})
    with pytest.raises(ConfigError, match="cut_s has 3 entries"):
        PartitionProblem(**{**base, "cut_s": (0, 0, 0)})
