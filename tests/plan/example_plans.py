"""A valid hand-written plan that the tests of ``tripar.plan`` vary field by field."""

from __future__ import annotations

import dataclasses

from tripar.plan import (
    Alternative,
    Binding,
    ClusterInfo,
    Estimate,
    Inputs,
    ModelInfo,
    ParallelConfig,
    Plan,
    SolverRun,
    StagePlan,
    TPShard,
)

BLOCKS = ("embed", "h.0", "h.1", "h.2", "h.3", "head")
GB = 10**9


def make_plan(**overrides) -> Plan:
    """A valid plan: 6 blocks on dp=2 tp=2 pp=2, 8 devices, 1F1B with 4 microbatches."""
    par = ParallelConfig(dp=2, tp=2, pp=2, micro_batch_size=2, num_microbatches=4,
                         recompute="stage-aware", zero=1)
    stages = (
        StagePlan(0, 0, 0, BLOCKS[:3], ("h.0",), 0.012, 60 * GB, in_flight=2),
        StagePlan(1, 1, 0, BLOCKS[3:], (), 0.013, 55 * GB, in_flight=1),
    )
    fields = dict(
        model=ModelInfo("gpt:layers=4", "0123456789abcdef", BLOCKS, 1_500_000_000),
        cluster=ClusterInfo("a100-80g", 1, 8, 80 * GB, 312e12, 300e9, 25e9, 1e-6, 5e-6,
                            "1x8 a100-80g"),
        inputs=Inputs(16, 2048),
        parallel=par,
        stages=stages,
        estimate=Estimate(step_time_s=0.2, tokens_per_s=16 * 2048 / 0.2,
                          peak_memory_bytes=60 * GB, bubble_fraction=0.2,
                          stage_memory_bytes=(60 * GB, 55 * GB), compute_s=0.15,
                          communication_s=0.01),
        tp_regions=(TPShard("h.0", "mlp", ("h_0_fc1", "h_0_fc2"),
                            (("h.0.fc1.weight", 0), ("h.0.fc2.weight", 1))),
                    TPShard("h.0", "attention", ("h_0_qkv", "h_0_proj"))),
        schedule=("F0 F1 B0 F2 B1 F3 B2 B3", "F0 B0 F1 B1 F2 B2 F3 B3"),
        solvers=(SolverRun("search", "enumeration", "optimal", 0.2, 0.5),
                 SolverRun("partition", "dp", "optimal", 0.2, 0.01)),
        solve_time_s=0.6,
        alternatives=(
            Alternative(dataclasses.replace(par, tp=1, dp=4, num_microbatches=2), None,
                        "needs 91.2 GB > 80.0 GB on pipeline rank 0", Binding.MEMORY),
            Alternative(dataclasses.replace(par, pp=1, dp=4, num_microbatches=2),
                        Estimate(0.25, 16 * 2048 / 0.25, 70 * GB, 0.0), "more communication",
                        Binding.COMMUNICATION),
        ),
        notes=("tp pinned by the user",),
    )
    fields.update(overrides)
    return Plan(**fields)
