"""tripar.runtime: a plan's stages trained on torch.distributed.

What the layers above use: :func:`assemble` (a rank's ``ParallelModel`` from a capture
and a plan), the mesh (:func:`build_mesh`), starting a job (:func:`ensure_process_group`,
:func:`launch_local`), the precisions, pretrained weights in (:func:`match_pretrained`), the
errors a running job raises, and standard checkpoints out (:func:`export_checkpoint`).
"""

from tripar.runtime.assemble import assemble
from tripar.runtime.checkpoint import CheckpointError, read_manifest
from tripar.runtime.data_parallel import optimizer_step_bytes
from tripar.runtime.engine import BatchLayout, ParallelModel
from tripar.runtime.export import export_checkpoint
from tripar.runtime.launch import (
    LaunchError,
    ensure_process_group,
    job_cluster,
    launch_local,
    report,
)
from tripar.runtime.mesh import CommError, Mesh, RankFailedError, build_mesh, short_cause
from tripar.runtime.params import LocalParam
from tripar.runtime.precision import PRECISIONS, check_precision
from tripar.runtime.pretrained import Pretrained, load_pretrained, match_pretrained

__all__ = [
    "PRECISIONS",
    "BatchLayout",
    "CheckpointError",
    "CommError",
    "LaunchError",
    "LocalParam",
    "Mesh",
    "ParallelModel",
    "Pretrained",
    "RankFailedError",
    "assemble",
    "build_mesh",
    "check_precision",
    "ensure_process_group",
    "export_checkpoint",
    "job_cluster",
    "launch_local",
    "load_pretrained",
    "match_pretrained",
    "optimizer_step_bytes",
    "read_manifest",
    "report",
    "short_cause",
]
