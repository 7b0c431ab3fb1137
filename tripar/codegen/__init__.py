"""tripar.codegen: a plan into each rank's programs.

The records (``stage``: ``TensorSpec``, ``StageProgram``, ``StageSplit``), the stage
split (``split``), the tensor-parallel rewrite (``tensor_parallel``, ``collectives``,
``tp_shard``, ``tp_rng``, ``tp_verify``), weight materialisation (``weights``),
recomputation (``recompute``), readable source (``emit``), and the passes of them for
one rank (``build``), which both ``tripar codegen`` and the runtime's assembly run.
"""

from tripar.codegen.build import (
    RankProgram,
    SplitForRank,
    build,
    build_pipeline,
    check_plan,
    split_for_rank,
    stage_programs,
    write_rank,
)
from tripar.codegen.emit import stage_source, write_stages
from tripar.codegen.recompute import apply_recompute
from tripar.codegen.split import block_nodes, rank_stages, split_for_plan
from tripar.codegen.stage import StageProgram, StageSplit, TensorSpec, TiedGroup
from tripar.codegen.tensor_parallel import RewriteError, tp_rewrite
from tripar.codegen.tp_rng import tp_rng_tracker
from tripar.codegen.tp_shard import ParamShard, shard_map, shard_parameters
from tripar.codegen.weights import materialize_stage, param_map

__all__ = [
    "ParamShard",
    "RankProgram",
    "RewriteError",
    "SplitForRank",
    "StageProgram",
    "StageSplit",
    "TensorSpec",
    "TiedGroup",
    "apply_recompute",
    "block_nodes",
    "build",
    "build_pipeline",
    "check_plan",
    "materialize_stage",
    "param_map",
    "rank_stages",
    "shard_map",
    "shard_parameters",
    "split_for_plan",
    "split_for_rank",
    "stage_programs",
    "stage_source",
    "tp_rewrite",
    "tp_rng_tracker",
    "write_rank",
    "write_stages",
]
