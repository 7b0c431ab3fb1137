"""tripar.codegen: a plan into each rank's programs.

Stage split (``split``), tensor-parallel rewrite (``tensor_parallel``, ``collectives``,
``tp_shard``, ``tp_rng``), weight materialisation (``weights``), readable source
(``emit``), and the pipeline of them for one rank (``build``).
"""

from tripar.codegen.build import RankProgram, build, build_pipeline, write_rank
from tripar.codegen.emit import stage_source, write_stages
from tripar.codegen.split import (
    StageProgram,
    StageSplit,
    TiedGroup,
    flat_graph_inputs,
    rank_stages,
    split_for_plan,
)
from tripar.codegen.tensor_parallel import RewriteError, tp_rewrite
from tripar.codegen.tp_shard import ParamShard, shard_map, shard_parameters
from tripar.codegen.weights import materialize_stage, param_map

__all__ = [
    "ParamShard",
    "RankProgram",
    "RewriteError",
    "StageProgram",
    "StageSplit",
    "TiedGroup",
    "build",
    "build_pipeline",
    "flat_graph_inputs",
    "materialize_stage",
    "param_map",
    "rank_stages",
    "shard_map",
    "shard_parameters",
    "split_for_plan",
    "stage_source",
    "tp_rewrite",
    "write_rank",
    "write_stages",
]
