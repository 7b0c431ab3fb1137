"""auto_parallel on real gloo ranks: every layout and schedule trains exactly like one process.

``MATRIX`` below is the whole parity matrix, as data. Each group of it runs on one set of
ranks (world = dp * tp * pp of its rows), rebuilding the ParallelModel for every run inside
the same ranks. A row is trained for ``STEPS`` steps on each of its models with each of its
optimizers and compared, parameter by parameter, with single-process training on the same
microbatches, computed once by the test process and handed to the ranks:

- fp32 rows, and bf16 rows whose layout keeps bf16's rounding (pipeline cuts and data
  parallelism move fp32 values and sum fp32 gradients): within the optimizer's tolerance
  of the single-process run (under autocast for bf16);
- bf16 rows under tensor parallelism (which sums bf16 partial products of the sharded
  matmuls, a rounding one process never makes): within ``bf16_tolerance(tp)`` of the
  single-process autocast run, and at least half of bf16's own effect away from the fp32
  run, so that a silently disabled autocast fails.

Every data-parallel replica is compared too: each rank's parameter checksums are
all-gathered, and the replicas of each (pp, tp) position must agree exactly (the full state
dict holds data-parallel rank 0's copy only).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import time
from dataclasses import dataclass

import pytest
import torch
from torch.testing import assert_close

from tests._ranks import run_ranks
from tripar import api
from tripar.codegen.collectives import ReduceScatterFromTP
from tripar.codegen.sub_pipeline import ReduceScatterStarted, ReduceStarted
from tripar.models import load_model

MODELS = {
    "gpt": "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8",
    "llama": "llama:layers=2,hidden=32,heads=4,kv_heads=2,vocab=64,seq=8",
    "bert": "bert:layers=2,hidden=32,heads=4,vocab=64,seq=8",
    "vit": "vit:image=16,patch=8,layers=2,hidden=32,heads=4,classes=10",
    "hf_gpt2": "hf:GPT2LMHeadModel:n_layer=2,n_embd=32,n_head=4,vocab_size=64,n_positions=16",
    # attention written out (no fused kernel): selective recomputation finds its core
    "gpt_eager": "gpt:layers=2,hidden=32,heads=8,vocab=64,seq=8,attention=eager",
    "llama_eager": "llama:layers=2,hidden=32,heads=8,kv_heads=4,vocab=64,seq=8,attention=eager",
    "gpt10": "gpt:layers=10,hidden=32,heads=4,vocab=64,seq=8",
    # dropout only between the tensor-parallel regions (embeddings, residual, MLP output):
    # every mask is drawn from the default stream, so a tp=2 run (sequence parallel or not)
    # draws what one process draws, and must train to the same parameters
    "hf_gpt2_dropout": "hf:GPT2LMHeadModel:n_layer=2,n_embd=32,n_head=4,vocab_size=64,"
                       "n_positions=16,attn_pdrop=0.0,resid_pdrop=0.2,embd_pdrop=0.2",
}
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
"""Without transformers the ``hf:`` models leave the matrix; the native models still run."""
GLOBAL_BATCH, STEPS = 4, 3

ALL = ("gpt", "llama", "bert", "vit", "hf_gpt2")
DEEP = ("gpt10",)
"""14 blocks: room for vpp values up to 7 on two pipeline ranks."""
LM = ("gpt", "llama")
SELECTIVE = ("gpt_eager", "llama_eager", "hf_gpt2")
"""Models with selective segments: the written-out attention cores, GPT-2's tanh GELU."""
SP = ("gpt", "llama", "bert", "hf_gpt2")
"""The models with a sequence (vit's first input is an image): sequence parallelism's rows."""
MB = ("gpt", "bert", "hf_gpt2")
"""The rows of microbatches of several samples: bert's loss (a mean over a microbatch's
masked tokens) tells which samples shared one; the others are plain means."""
SEED = 4321
"""The default random stream's seed before training, in one process and on every rank."""
SGD, ADAMW, BOTH = ("sgd",), ("adamw",), ("sgd", "adamw")
I1F1B = "interleaved-1f1b"

# Each row: (dp, tp, pp, schedule, vpp, zero, mbs, precision, models, optimizers[,
# recompute[, sp[, tp_overlap]]]); recompute defaults to the planner's choice, sp (default
# False) pins sequence parallelism, tp_overlap (default 1) the parts of a microbatch.
# mbs is the microbatch size: each replica runs GLOBAL_BATCH / (dp * mbs) microbatches (bert's
# loss, a mean over the masked tokens of a microbatch, also tells which samples shared one).
# A schedule's optimizer alternates between groups, so that each schedule meets both.
MATRIX: dict[str, list[tuple]] = {
    "world2": [
        (1, 1, 2, "gpipe",  1, 0, 1, "fp32", ALL, SGD),
        (1, 1, 2, "1f1b",   1, 0, 1, "fp32", ALL, ADAMW),
        (1, 1, 2, I1F1B,    2, 0, 1, "fp32", ALL, SGD),
        (1, 1, 2, "zb-h1",  1, 0, 1, "fp32", ALL, ADAMW),
        (1, 1, 2, "scp",    1, 0, 1, "fp32", ALL, SGD),
        (1, 1, 2, "1f1b",   1, 0, 2, "fp32", MB, SGD),
        (1, 1, 2, I1F1B,    2, 0, 2, "fp32", MB, ADAMW),
        (1, 1, 2, "gpipe",  1, 0, 4, "fp32", MB, SGD),
        (1, 1, 2, I1F1B,    5, 0, 1, "fp32", DEEP, SGD),
        (1, 1, 2, I1F1B,    7, 0, 1, "fp32", DEEP, ADAMW),
        (2, 1, 1, "1f1b",   1, 0, 1, "fp32", ALL, SGD),
        (2, 1, 1, "1f1b",   1, 0, 1, "fp32", LM, ADAMW),
        (2, 1, 1, "1f1b",   1, 1, 1, "fp32", ALL, ADAMW),
        (2, 1, 1, "1f1b",   1, 0, 2, "fp32", MB, SGD),
        (1, 2, 1, "1f1b",   1, 0, 1, "fp32", ALL, ADAMW),
        (1, 2, 1, "1f1b",   1, 0, 4, "fp32", MB, SGD),
        (1, 1, 2, "gpipe",  1, 0, 1, "bf16", LM, SGD),
        (1, 1, 2, "1f1b",   1, 0, 1, "bf16", LM, SGD),
        (1, 1, 2, I1F1B,    2, 0, 1, "bf16", LM, SGD),
        (1, 1, 2, "zb-h1",  1, 0, 1, "bf16", LM, SGD),
        (1, 1, 2, "scp",    1, 0, 2, "bf16", LM, SGD),
        (2, 1, 1, "1f1b",   1, 0, 1, "bf16", LM, BOTH),
        (1, 2, 1, "1f1b",   1, 0, 1, "bf16", LM, SGD),
        (1, 1, 2, "chimera", 1, 0, 1, "fp32", ("gpt", "hf_gpt2"), SGD),
        (1, 1, 2, "chimera", 1, 0, 1, "bf16", ("gpt",), ADAMW),
        (1, 2, 1, "1f1b",   1, 0, 1, "fp32", SP, SGD, None, True),
        (1, 2, 1, "1f1b",   1, 0, 2, "fp32", ("hf_gpt2_dropout",), SGD, None, True),
        (1, 2, 1, "1f1b",   1, 0, 1, "bf16", ("gpt",), SGD, None, True),
        (2, 1, 1, "1f1b",   1, 2, 1, "fp32", ("gpt", "hf_gpt2"), BOTH),
        (2, 1, 1, "1f1b",   1, 2, 1, "bf16", ("llama",), SGD),
        (1, 2, 1, "1f1b",   1, 0, 4, "fp32", (*LM, "hf_gpt2"), SGD, None, False, 2),
        (1, 2, 1, "1f1b",   1, 0, 4, "fp32", ("hf_gpt2", "llama"), ADAMW, None, True, 2),
        (1, 2, 1, "1f1b",   1, 0, 4, "bf16", ("gpt",), SGD, None, True, 4),
        (1, 2, 1, "1f1b",   1, 0, 4, "bf16", ("gpt",), SGD, None, False, 4),
        (1, 2, 1, "1f1b",   1, 0, 1, "fp32", (*LM, "hf_gpt2"), ADAMW, None, False, 2),
        (1, 2, 1, "1f1b",   1, 0, 1, "bf16", ("gpt", "hf_gpt2"), SGD, None, False, 4),
    ],
    "world4-dp-pp": [
        (1, 1, 4, "gpipe",  1, 0, 1, "fp32", ALL, ADAMW),
        (1, 1, 4, "1f1b",   1, 0, 1, "fp32", ALL, SGD),
        (1, 1, 4, "zb-h1",  1, 0, 1, "fp32", ALL, SGD),
        (1, 1, 4, "scp",    1, 0, 1, "fp32", ALL, ADAMW),
        (1, 1, 4, "1f1b",   1, 0, 2, "fp32", MB, ADAMW),
        (2, 1, 2, "gpipe",  1, 0, 1, "fp32", ALL, SGD),
        (2, 1, 2, "1f1b",   1, 1, 1, "fp32", ALL, ADAMW),
        (2, 1, 2, I1F1B,    2, 0, 1, "fp32", ALL, ADAMW),
        (2, 1, 2, "zb-h1",  1, 0, 1, "fp32", ALL, SGD),
        (2, 1, 2, "scp",    1, 0, 1, "fp32", ALL, ADAMW),
        (2, 1, 2, "zb-h1",  1, 0, 2, "fp32", MB, ADAMW),
        (2, 1, 2, "1f1b",   1, 0, 1, "bf16", LM, SGD),
        (1, 1, 4, "chimera", 1, 0, 1, "fp32", ("llama", "hf_gpt2"), ADAMW),
        (2, 1, 2, "chimera", 1, 1, 1, "fp32", ("gpt", "hf_gpt2"), ADAMW),
        (1, 1, 4, "chimera", 1, 0, 1, "bf16", ("llama",), SGD),
        (2, 1, 2, "chimera", 1, 0, 1, "bf16", ("gpt",), SGD),
        (2, 1, 2, "1f1b",   1, 2, 1, "fp32", ("gpt", "llama"), ADAMW),
        (2, 1, 2, I1F1B,    2, 2, 1, "fp32", ("gpt",), SGD),
        (2, 1, 2, "chimera", 1, 2, 1, "fp32", ("hf_gpt2",), SGD),
    ],
    "world4-tp": [
        (1, 2, 2, "gpipe",  1, 0, 1, "fp32", ALL, ADAMW),
        (1, 2, 2, "1f1b",   1, 0, 1, "fp32", ALL, SGD),
        (1, 2, 2, I1F1B,    2, 0, 1, "fp32", ALL, ADAMW),
        (1, 2, 2, "zb-h1",  1, 0, 1, "fp32", ALL, SGD),
        (1, 2, 2, "scp",    1, 0, 1, "fp32", ALL, ADAMW),
        (1, 2, 2, "1f1b",   1, 0, 2, "fp32", ALL, ADAMW),
        (2, 2, 1, "1f1b",   1, 0, 1, "fp32", ALL, SGD),
        (2, 2, 1, "1f1b",   1, 1, 1, "fp32", ALL, ADAMW),
        (1, 2, 2, "gpipe",  1, 0, 1, "bf16", LM, SGD),
        (1, 2, 2, "1f1b",   1, 0, 1, "bf16", LM, SGD),
        (1, 2, 2, I1F1B,    2, 0, 1, "bf16", LM, SGD),
        (1, 2, 2, "zb-h1",  1, 0, 1, "bf16", LM, SGD),
        (1, 2, 2, "scp",    1, 0, 1, "bf16", LM, SGD),
        (1, 2, 2, "1f1b",   1, 0, 1, "fp32", SELECTIVE, SGD, "selective"),
        (1, 2, 2, "zb-h1",  1, 0, 1, "fp32", ("llama",), SGD, None, True),
        (1, 2, 2, "scp",    1, 0, 1, "fp32", ("bert",), ADAMW, None, True),
        (2, 2, 1, "1f1b",   1, 1, 1, "fp32", ("hf_gpt2",), ADAMW, None, True),
        (1, 2, 2, I1F1B,    2, 0, 1, "bf16", ("gpt",), SGD, None, True),
        (1, 2, 2, "gpipe",  1, 0, 1, "fp32", ("gpt", "hf_gpt2"), ADAMW, None, True),
        (1, 2, 2, "chimera", 1, 0, 1, "fp32", ("gpt", "llama"), SGD, None, True),
        (1, 2, 2, "chimera", 1, 0, 1, "bf16", ("gpt",), SGD),
        (2, 2, 1, "1f1b",   1, 2, 1, "fp32", ("gpt", "hf_gpt2"), ADAMW),
        (2, 2, 1, "zb-h1",  1, 2, 1, "bf16", ("gpt",), SGD),
        (1, 2, 2, "zb-h1",  1, 0, 4, "fp32", ("gpt", "hf_gpt2"), ADAMW, None, False, 4),
        (1, 2, 2, "1f1b",   1, 0, 4, "fp32", ("gpt",), SGD, "full", True, 2),
        (2, 2, 1, "1f1b",   1, 1, 2, "fp32", ("gpt", "bert"), ADAMW, None, False, 2),
        (1, 2, 2, "chimera", 1, 0, 2, "bf16", ("gpt",), SGD, None, False, 2),
        (2, 2, 1, "1f1b",   1, 0, 2, "bf16", ("hf_gpt2",), SGD, None, False, 2),
        (1, 2, 2, I1F1B,    2, 0, 2, "fp32", ("llama",), SGD, None, False, 2),
        (1, 2, 2, "zb-h1",  1, 0, 1, "fp32", ("gpt", "hf_gpt2"), SGD, None, False, 2),
        (2, 2, 1, "1f1b",   1, 1, 1, "fp32", ("llama",), ADAMW, None, False, 4),
        (1, 2, 2, "chimera", 1, 0, 1, "fp32", ("gpt",), ADAMW, "full", False, 2),
    ],
    "world8": [
        (2, 2, 2, "gpipe",  1, 0, 1, "fp32", ("gpt", "bert", "hf_gpt2"), ADAMW),
        (2, 2, 2, "1f1b",   1, 1, 1, "fp32", ALL, BOTH),
        (2, 2, 2, I1F1B,    2, 0, 1, "fp32", ("llama", "vit", "hf_gpt2"), SGD),
        (2, 2, 2, "zb-h1",  1, 0, 1, "fp32", ("gpt", "llama", "bert"), ADAMW),
        (2, 2, 2, "scp",    1, 0, 1, "fp32", ("llama", "vit", "hf_gpt2"), SGD),
        (4, 1, 2, "1f1b",   1, 0, 1, "fp32", ALL, SGD),
        (4, 2, 1, "1f1b",   1, 1, 1, "fp32", ("llama", "bert", "vit"), ADAMW),
        (1, 4, 2, "1f1b",   1, 0, 1, "fp32", ALL, SGD),
        (2, 4, 1, "1f1b",   1, 0, 1, "fp32", ("gpt", "vit", "hf_gpt2"), ADAMW),
        (1, 4, 2, "1f1b",   1, 0, 1, "bf16", LM, SGD),
        (2, 1, 4, "chimera", 1, 1, 1, "fp32", ("gpt", "hf_gpt2"), SGD),
        (2, 2, 2, "1f1b",   1, 1, 1, "fp32", ("llama", "bert"), ADAMW, None, True),
    ],
}
# AdamW's eps is 1e-6: a key projection's bias has an exactly zero gradient (softmax does not
# see it), so its computed gradient is rounding noise (~1e-9), which AdamW with eps=1e-8 turns
# into steps of ~lr/10 whose sign depends on summation order (dp, microbatches).
OPTIMIZERS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.1), 1e-5),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, eps=1e-6), 1e-4),
}


@dataclass(frozen=True, slots=True)
class Run:
    """One model trained under one row of the matrix with one optimizer."""

    model: str
    optimizer: str
    dp: int
    tp: int
    pp: int
    schedule: str
    vpp: int
    zero: int
    mbs: int
    precision: str
    recompute: str | None = None
    sp: bool = False
    tp_overlap: int = 1

    @property
    def reference_key(self) -> tuple[str, str, int, str]:
        """The arguments of ``reference``: the single-process run it is compared with."""
        return (self.model, self.optimizer, self.mbs, self.precision)

    def __str__(self) -> str:
        return (f"{self.model} {self.optimizer} dp={self.dp} tp={self.tp} pp={self.pp} "
                f"{self.schedule} vpp={self.vpp} zero={self.zero} mbs={self.mbs} "
                f"{self.precision}" + (f" recompute={self.recompute}" if self.recompute else "")
                + (" sp" if self.sp else "")
                + (f" tp_overlap={self.tp_overlap}" if self.tp_overlap > 1 else ""))


def runs(group: str) -> list[Run]:
    """The runs of ``group``: its rows expanded over their models and optimizers."""
    return [Run(model, opt, *row[:8], *row[10:]) for row in MATRIX[group] for model in row[8]
            if HAS_TRANSFORMERS or not MODELS[model].startswith("hf:") for opt in row[9]]


U_BF16 = 2.0**-8
"""bf16's unit roundoff: 8 significant bits, round to nearest."""


def bf16_tolerance(tp: int) -> float:
    """How far, relative to the size of the training update (``update_error``), a bf16 run
    under tensor parallelism may be from one process's autocast run.

    Autocast rounds each matmul's fp32-accumulated result to bf16 once: a relative error of
    at most u = 2^-8. A row-parallel matmul on tp ranks (and the all-reduce of a column-
    parallel layer's input gradient) instead rounds each of its tp partial sums to bf16 and
    adds them in bf16, tp - 1 more roundings: at most (2 * tp - 1) * u, so the two runs
    differ there by at most 2 * tp * u relative. The rest of the arithmetic is the same,
    and the update carries the relative error of the values it is made of: bf16's whole
    effect on one process's update (``update_error`` of the autocast run from the fp32 run)
    measures 0.89 to 1.04 u for these models over three SGD steps, so a few steps do not
    amplify it. Hence 2 * tp * u: 0.016 at tp=2, 0.031 at tp=4. (Measured: 0.82 to 0.99 u,
    at tp 2 and 4 alike, for gpt and llama and every schedule.)
    """
    return 2 * tp * U_BF16


@functools.cache
def _model(name: str):
    """The model (the initial weights every run starts from), its example and its capture;
    each rank captures for itself (graphs do not pickle)."""
    spec = MODELS[name]
    loaded = load_model(spec, batch_size=1, seq_len=8 if spec.startswith("hf:") else None)
    captured = api.capture_model(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    return loaded, captured


@functools.cache
def batches(name: str) -> tuple:
    """The global batch of each step."""
    spec = MODELS[name]
    out = []
    for step in range(STEPS):
        more = load_model(spec, batch_size=GLOBAL_BATCH, seed=100 + step,
                          seq_len=8 if spec.startswith("hf:") else None)
        out.append(more.example_kwargs or more.example_inputs)
    return tuple(out)


def _forward(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(*batch)


def _micro(batch, k: int, size: int = 1):
    """Microbatch ``k`` of ``size`` samples: samples k * size .. (k + 1) * size - 1 (dp
    ranks take contiguous slices of the batch, and each splits its slice in order)."""
    if isinstance(batch, dict):
        return {key: t[k * size:(k + 1) * size] for key, t in batch.items()}
    return tuple(t[k * size:(k + 1) * size] for t in batch)


@functools.cache
def reference(name: str, opt: str, mbs: int = 1, precision: str = "fp32"
              ) -> dict[str, torch.Tensor]:
    """Single-process training with the same microbatches of ``mbs`` samples (gradients
    accumulated), under bf16 autocast for ``precision="bf16"``. Computed by the test
    process, once, and handed to the ranks."""
    spec = MODELS[name]
    model = load_model(spec, batch_size=1, seq_len=8 if spec.startswith("hf:") else None).model
    make_opt, _ = OPTIMIZERS[opt]
    optimizer = make_opt(list(model.parameters()))
    n = GLOBAL_BATCH // mbs
    torch.manual_seed(SEED)
    for batch in batches(name):
        for k in range(n):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = _forward(model, _micro(batch, k, mbs))
            (loss.float() / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.cache
def initial(name: str) -> dict[str, torch.Tensor]:
    """The weights every run starts from."""
    spec = MODELS[name]
    model = load_model(spec, batch_size=1, seq_len=8 if spec.startswith("hf:") else None).model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def update_error(got: dict, want: dict, start: dict) -> float:
    """||got - want|| / ||want - start|| over all parameters: how far the training updates
    differ, relative to their size."""
    diff = sum(float((got[k] - v).double().pow(2).sum()) for k, v in want.items())
    size = sum(float((v - start[k]).double().pow(2).sum()) for k, v in want.items())
    return (diff / size) ** 0.5


def train(run: Run, steps: tuple):
    loaded, captured = _model(run.model)
    make_opt, _ = OPTIMIZERS[run.optimizer]
    pm = api.auto_parallel(loaded.model, captured=captured, example_inputs=loaded.example_inputs,
                           example_kwargs=loaded.example_kwargs, optimizer=make_opt,
                           global_batch_size=GLOBAL_BATCH, dp=run.dp, tp=run.tp, pp=run.pp,
                           vpp=run.vpp,
                           num_microbatches=GLOBAL_BATCH // (run.dp * run.mbs),
                           schedule=run.schedule, zero=run.zero, sp=run.sp,
                           tp_overlap=run.tp_overlap,
                           precision=run.precision, recompute=run.recompute, timeout_s=30)
    torch.manual_seed(SEED)  # what one process's dropout draws from (the same on every rank)
    losses = [pm.train_step(b) for b in steps]
    return pm, losses


def _checksums(pm) -> list[tuple[str, float, float]]:
    """(FQN, sum, position-weighted sum) in float64 of each parameter this rank holds:
    equal on two replicas only if their parameters are (all but surely) equal."""
    out = []
    for lp in pm.params:
        t = lp.param.detach().double().reshape(-1)
        ramp = torch.arange(1, t.numel() + 1, dtype=torch.float64) / t.numel()
        out.append((lp.fqn, float(t.sum()), float((t * ramp).sum())))
    return out


def _check_replicas(run: Run, gathered: list) -> None:
    """Every data-parallel replica of each (pp, tp) position holds the same parameters and
    returned the same losses as data-parallel rank 0; under chimera pipeline rank r and its
    mirror pp - 1 - r (the two holders of the same stages) hold the same parameters too."""
    if run.schedule == "chimera":
        at = {coords: dict((fqn, sums) for fqn, *sums in rows) for coords, rows, _ in gathered}
        for (pp, dp, tp), mine in at.items():
            theirs = at[(run.pp - 1 - pp, dp, tp)]
            assert mine == theirs, (f"{run}: pipeline ranks {pp} and {run.pp - 1 - pp} (dp {dp}, "
                                    f"tp {tp}) hold the same stages but different parameters")
    first: dict[tuple[int, int], tuple[int, list]] = {}
    for rank, (coords, sums, losses) in enumerate(gathered):
        assert losses == gathered[0][2], f"{run}: rank {rank} losses {losses} != {gathered[0][2]}"
        pp, dp, tp = coords
        if dp == 0:
            first[(pp, tp)] = (rank, sums)
    for rank, (coords, sums, _) in enumerate(gathered):
        pp, dp, tp = coords
        base, want = first[(pp, tp)]
        for mine, theirs in zip(sums, want, strict=True):
            assert mine == theirs, (
                f"{run}: dp replica on rank {rank} (pp {pp}, dp {dp}, tp {tp}) differs from "
                f"rank {base} (dp 0) in {mine[0]}: checksums {mine[1:]} vs {theirs[1:]}")


def _compare(run: Run, full: dict, refs: dict, start: dict) -> str:
    """Rank 0: the full state dict against the single-process run; what was measured."""
    ref = refs[run.reference_key]
    assert set(full) == set(ref), (str(run), set(full) ^ set(ref))
    if run.precision == "bf16" and run.tp > 1:
        fp32 = refs[(run.model, run.optimizer, run.mbs, "fp32")]
        to_bf16, to_fp32 = update_error(full, ref, start), update_error(full, fp32, start)
        effect = update_error(ref, fp32, start)  # how far bf16 moves one process's training
        assert to_bf16 < bf16_tolerance(run.tp), (
            f"{run}: update {to_bf16:.4f} from the autocast run, over the tolerance "
            f"{bf16_tolerance(run.tp):.4f}")
        # a run that kept fp32 (autocast silently off) lies within fp32 rounding of the fp32
        # run; one under autocast at least half of bf16's effect away (triangle inequality:
        # effect - to_bf16, and to_bf16 stays below the effect it is compared with)
        assert to_fp32 > effect / 2, (
            f"{run}: update {to_fp32:.2e} from the fp32 run, bf16's effect is {effect:.2e}: "
            f"did autocast run?")
        return f"to_bf16={to_bf16:.2e} to_fp32={to_fp32:.2e} bf16_effect={effect:.2e}"
    rtol = OPTIMIZERS[run.optimizer][1]
    for key, value in ref.items():
        assert_close(full[key], value, rtol=rtol, atol=rtol,
                     msg=lambda m, key=key: f"{run}: {key}: {m}")
    if run.precision == "bf16":  # the same rounding as one autocast process: not fp32's
        fp32 = refs[(run.model, run.optimizer, run.mbs, "fp32")]
        to_bf16, to_fp32 = update_error(full, ref, start), update_error(full, fp32, start)
        # measured: to_bf16 <= 5e-8, to_fp32 3.5e-3 (SGD) to 6e-2 (AdamW)
        assert to_fp32 > 100 * max(to_bf16, 1e-6), (str(run), to_bf16, to_fp32)
        return f"to_bf16={to_bf16:.2e} to_fp32={to_fp32:.2e}"
    return ""


@functools.cache
def _eval_model(name: str) -> torch.nn.Module:
    spec = MODELS[name]
    return load_model(spec, batch_size=1, seq_len=8 if spec.startswith("hf:") else None).model


def _compare_eval(run: Run, full: dict, batch, evaluated: float) -> None:
    """``eval_step`` of the trained parallel model is one process's mean microbatch loss
    with the same parameters (the same microbatches, no dropout, the same autocast)."""
    model = _eval_model(run.model)
    model.load_state_dict(full)
    model.eval()
    n = GLOBAL_BATCH // run.mbs
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                         enabled=run.precision == "bf16"):
        want = sum(float(_forward(model, _micro(batch, k, run.mbs))) for k in range(n)) / n
    tolerance = 1e-5 if run.precision == "fp32" else 2e-2
    assert math.isclose(evaluated, want, rel_tol=tolerance, abs_tol=tolerance), (
        f"{run}: eval_step {evaluated} vs one process {want}")


def _compare_all(group: str, data: bytes) -> list[str]:
    """On every rank: each run of ``group`` trained and compared. ``data`` is ``torch.save``
    of (model -> step batches, reference key -> single-process result, model -> initial
    weights); bytes, since tensors pickled by multiprocessing travel as one shared-memory
    file descriptor each. Rank 0 compares and returns a line per run."""
    import torch.distributed as dist

    steps, refs, starts = torch.load(io.BytesIO(data), weights_only=False)
    rank = dist.get_rank()
    done = []
    for run in runs(group):
        t0 = time.perf_counter()
        pm, losses = train(run, steps[run.model])
        what = str(run)
        assert pm.plan.parallel.schedule == run.schedule or run.pp == 1, what
        assert pm.plan.parallel.micro_batch_size == run.mbs, what
        assert pm.plan.parallel.sp == run.sp, what
        assert pm.plan.parallel.tp_overlap == run.tp_overlap, what
        if run.tp_overlap > 1:  # the stages run in parts, their collectives started
            assert any(isinstance(m, ReduceStarted | ReduceScatterStarted)
                       for p in pm.programs for m in p.module.modules()), what
        if run.sp:  # the region exits reduce-scatter: the parts between run on the shard
            assert any(isinstance(m, ReduceScatterFromTP) for p in pm.programs
                       for m in p.module.modules()), what
        assert pm.plan.inputs.dtype == run.precision, what  # costed for the compute dtype
        if run.recompute == "selective":  # every stage checkpoints its selected nodes
            assert all(st.selective for st in pm.plan.stages), what
            assert any(type(m).__name__ == "Recomputed" for p in pm.programs
                       for m in p.module.modules()), what
        assert {p.dtype for p in pm.parameters()} == {torch.float32}, what  # master weights
        if run.tp > 1:  # regions sharded, and this rank holds slices of their weights
            assert pm.plan.tp_regions, what
            sliced = [lp for lp in pm.params if lp.param.shape != lp.shape]
            assert sliced and all(lp.param.numel() * run.tp == math.prod(lp.shape)
                                  for lp in sliced), what
        assert all(math.isfinite(x) for x in losses), what
        c = pm.mesh.coords
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, ((c.pp, c.dp, c.tp), _checksums(pm), losses))
        full = pm.full_state_dict()
        evaluated = pm.eval_step(steps[run.model][0])
        pm.close()
        if rank == 0:
            _check_replicas(run, gathered)
            measured = _compare(run, full, refs, starts[run.model])
            _compare_eval(run, full, steps[run.model][0], evaluated)
            done.append(f"{what} {time.perf_counter() - t0:.2f}s {measured}".rstrip())
    return done


@pytest.mark.timeout(600)
@pytest.mark.parametrize("group", list(MATRIX))
def test_every_layout_matches_single_process(group):
    (world,) = {dp * tp * pp for dp, tp, pp, *_ in MATRIX[group]}
    todo = runs(group)
    keys = {r.reference_key for r in todo} | {(r.model, r.optimizer, r.mbs, "fp32") for r in todo}
    names = sorted({r.model for r in todo})
    data = io.BytesIO()
    torch.save(({n: batches(n) for n in names}, {k: reference(*k) for k in keys},
                {n: initial(n) for n in names}), data)
    results = run_ranks(_compare_all, world, group, data.getvalue(), timeout_s=570,
                        pg_timeout_s=60)
    print("\n".join(results[0]))
    assert len(results[0]) == len(todo)


def _dropout_schedules() -> list[float]:
    """With dropout, tp=2 x pp=2: scp (forward without activations, then recompute) and
    selective recomputation (the attention core re-run in the backward) draw the very masks
    1F1B draws, in the replicated and in the tensor-parallel streams."""
    import torch.distributed as dist

    spec = "gpt:layers=2,hidden=32,heads=8,vocab=64,seq=8,dropout=0.2,attention=eager"
    loaded = load_model(spec, batch_size=GLOBAL_BATCH)
    captured = api.capture_model(loaded.model, loaded.example_inputs)
    states = {}
    for schedule, recompute in (("1f1b", "none"), ("scp", None), ("1f1b", "selective")):
        torch.manual_seed(1234 + dist.get_rank() % 2)  # each tp rank its own default stream
        pm = api.auto_parallel(loaded.model, captured=captured, optimizer=OPTIMIZERS["sgd"][0],
                               tp=2, pp=2, num_microbatches=GLOBAL_BATCH, schedule=schedule,
                               recompute=recompute, seed=7, timeout_s=30)
        assert all(st.selective for st in pm.plan.stages) == (recompute == "selective")
        for _ in range(2):
            pm.train_step(loaded.example_inputs)
        states[(schedule, recompute)] = pm.full_state_dict()
        pm.close()
    without = {}
    base = states[("1f1b", "none")]
    for key, value in base.items():
        for other in (("scp", None), ("1f1b", "selective")):
            assert_close(states[other][key], value, rtol=1e-6, atol=1e-6,
                         msg=lambda m, key=key, other=other: f"{other} {key}: {m}")
        without[key] = float((value - loaded.model.state_dict()[key]).abs().max())
    return sorted(without.values())[-3:]


def test_scp_recompute_replays_dropout_masks_with_tensor_parallelism():
    for moved in run_ranks(_dropout_schedules, 4, timeout_s=180, pg_timeout_s=60):
        assert moved[-1] > 1e-3  # it trained
