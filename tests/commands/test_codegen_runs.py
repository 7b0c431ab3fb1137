"""``tripar codegen``'s output is what the ranks run.

A tensor-parallel x pipeline plan (tp=2, pp=2, 1F1B) whose stages checkpoint some of
their blocks is written out by ``tripar codegen``; then, on four gloo ranks,
``auto_parallel`` builds the ranks for that plan file, every stage module's ``forward``
and every checkpointed segment's body are replaced by the functions ``exec``'d from the
emitted ``stage_<i>.py`` of that rank, and three SGD steps must leave every parameter
where single-process training leaves it (the engine tests' model, batches and
reference, ``tests/runtime/test_engine.py``). The emitted functions are counted, so the
test knows they ran: each forward once per microbatch, each segment twice (the forward,
and its recomputation in the backward).

The same ranks run the tensor-parallel golden sources (``tests/codegen/golden/
gpt_pp2_tp2``, tensor-parallel rank 1 of ``tests/codegen/test_build.py``'s plan; rank 0
runs its freshly emitted source) through the pipeline: the loss is the unsharded
model's, and every gradient is the one the stage modules' own code gives.
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from tests._ranks import run_ranks
from tests.codegen.test_build import SPECS as BUILD_SPECS
from tests.codegen.test_build import _gpt, make_plan, run_pipeline
from tests.runtime.test_engine import GLOBAL_BATCH, MODELS, OPTIMIZERS, _model, batches, reference
from tripar import Pins, api
from tripar.cli import main
from tripar.codegen.build import build_pipeline, split_for_rank, stage_programs, write_rank
from tripar.codegen.emit import recomputed_segments, stage_source

GOLDEN = Path(__file__).parents[1] / "codegen" / "golden" / "gpt_pp2_tp2"


def _plan(path: Path) -> Any:
    """The planner's tp=2 x pp=2 1F1B plan for the engine tests' gpt, one sample per
    microbatch, with every stage checkpointing its transformer blocks (per block)."""
    from tripar.partitioner.hardware import Cluster

    _, captured = _model("gpt")
    pins = Pins(dp=1, tp=2, pp=2, num_microbatches=GLOBAL_BATCH, schedule="1f1b",
                recompute="none")
    plan = api.make_plan(captured, Cluster.builtin("cpu", gpus_per_node=4), GLOBAL_BATCH, pins,
                         model_spec=MODELS["gpt"])
    stages = tuple(dataclasses.replace(s, recompute=tuple(b for b in s.blocks
                                                          if b.startswith("blocks.")))
                   for s in plan.stages)
    plan = dataclasses.replace(plan, stages=stages, parallel=dataclasses.replace(
        plan.parallel, recompute="stage-aware"))
    plan.validate().save(path)
    return plan


def _bind(path: Path, module: torch.fx.GraphModule, calls: Counter) -> list[str]:
    """Replace ``module.forward`` and each checkpointed segment body's ``forward`` with the
    functions of the emitted file ``path``, counting their calls in ``calls``; returns the
    names of the functions bound."""
    scope: dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), scope)

    def counted(fn: Callable, owner: torch.nn.Module, key: str) -> Callable:
        def run(*args: Any) -> Any:
            calls[key] += 1
            return fn(owner, *args)
        return run

    bound = []
    targets = [("forward", module)] + [(name.lstrip("_"), wrapper.body)
                                       for name, wrapper in recomputed_segments(module)]
    for name, owner in targets:
        fn = scope[name]
        assert fn.__code__.co_filename == str(path), name
        owner.forward = counted(fn, owner, f"{path.stem}.{name}")
        bound.append(name)
    return bound


def _stage_module(module: torch.nn.Module) -> torch.fx.GraphModule:
    """The stage GraphModule a ParallelModel's program runs (inside any wrapper)."""
    return next(m for m in module.modules() if isinstance(m, torch.fx.GraphModule))


def _train_emitted(plan_path: str, out_dir: str, data: bytes) -> dict:
    """One rank: the plan's ParallelModel running the emitted sources, three SGD steps,
    every parameter compared with single-process training."""
    from tripar.plan.plan import Plan

    loaded, captured = _model("gpt")
    steps, ref = torch.load(io.BytesIO(data), weights_only=False)
    make_opt, rtol = OPTIMIZERS["sgd"]
    pm = api.auto_parallel(loaded.model, captured=captured, plan=Plan.load(plan_path),
                           optimizer=make_opt, timeout_s=30)
    coords = pm.mesh.coords
    folder = Path(out_dir) / f"rank_pp{coords.pp}_tp{coords.tp}"
    calls: Counter = Counter()
    bound, segments = {}, {}
    for prog in pm.programs:
        stage = _stage_module(prog.module)
        segments[prog.index] = [w.blocks for _, w in recomputed_segments(stage)]
        bound[prog.index] = _bind(folder / f"stage_{prog.index}.py", stage, calls)
    for batch in steps:
        pm.train_step(batch)
    full = pm.full_state_dict()
    pm.close()
    assert set(full) == set(ref), set(full) ^ set(ref)
    for key, value in ref.items():
        assert_close(full[key], value, rtol=rtol, atol=rtol, msg=lambda m, key=key: f"{key}: {m}")
    return {"coords": (coords.pp, coords.tp), "calls": dict(calls), "bound": bound,
            "segments": segments}


def _run_golden(group: Any, tp_rank: int) -> dict:
    """Rank ``tp_rank`` of a tensor-parallel pair: test_build's gpt plan (pp=2, tp=2) run
    through its pipeline, first by the stage modules' own code, then by the golden sources
    (tp rank 1) or the freshly emitted ones (tp rank 0)."""
    loaded, gm, flat = _gpt()
    plan = make_plan(gm, flat, BUILD_SPECS["gpt"], pp=2, tp=2)
    programs = build_pipeline(gm, plan, flat, tp_rank=tp_rank, tp_group=group,
                              source=loaded.model)
    modules = [s.module for p in programs for s in p.stages]

    def grads() -> list[torch.Tensor]:
        out = [p.grad.clone() for m in modules for p in m.parameters()]
        for m in modules:
            m.zero_grad(set_to_none=True)
        return out

    own_loss = run_pipeline(programs, flat)
    own = grads()
    calls: Counter = Counter()
    with tempfile.TemporaryDirectory() as emitted:
        for program in programs:
            folder = GOLDEN / f"rank_pp{program.pp_rank}_tp1"
            if tp_rank == 0:
                folder = Path(emitted) / f"rank_pp{program.pp_rank}_tp0"
                write_rank(program, folder)
            for stage in program.stages:
                _bind(folder / f"stage_{stage.index}.py", stage.module, calls)
    loss = run_pipeline(programs, flat)
    for got, want in zip(grads(), own, strict=True):
        assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        whole = loaded.model(*loaded.example_inputs)
    assert_close(loss, own_loss, rtol=0, atol=0)
    assert_close(loss, whole, rtol=1e-5, atol=0)
    return dict(calls)


def _rank_main(plan_path: str, out_dir: str, data: bytes) -> dict:
    import torch.distributed as dist

    out = _train_emitted(plan_path, out_dir, data)
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank makes every group
    out["golden"] = _run_golden(pairs[rank // 2], rank % 2)
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    """The plan, its file and the folder ``tripar codegen`` wrote for it."""
    tmp = tmp_path_factory.mktemp("codegen")
    plan_path, out = tmp / "plan.json", tmp / "out"
    plan = _plan(plan_path)
    assert main(["codegen", str(plan_path), "--out", str(out), "--batch", "1"]) == 0
    return plan, plan_path, out


@pytest.fixture(scope="module")
def ranks(written: tuple[Any, Path, Path]) -> tuple[Any, list[dict]]:
    """The plan, and what each of the four ranks reports; run once for the module."""
    plan, plan_path, out = written
    data = io.BytesIO()
    torch.save((batches("gpt"), reference("gpt", "sgd")), data)
    results = run_ranks(_rank_main, 4, str(plan_path), str(out), data.getvalue(),
                        timeout_s=120, pg_timeout_s=60)
    return plan, results


def test_codegen_writes_the_stages_auto_parallel_assembles(written: tuple[Any, Path, Path]
                                                           ) -> None:
    """Tier 1: each file is the source of the stage the runtime's assembly builds
    (``split_for_rank`` and ``stage_programs``, as ``tripar.runtime.assemble`` calls them)."""
    plan, _, out = written
    loaded, captured = _model("gpt")
    for tp_rank in range(plan.parallel.tp):
        made = split_for_rank(captured, plan, tp_rank)
        for pp_rank in range(plan.parallel.pp):
            for stage in stage_programs(made.split, plan, pp_rank, blocks=made.blocks,
                                        shards=made.shards, source=loaded.model):
                path = out / f"rank_pp{pp_rank}_tp{tp_rank}" / f"stage_{stage.index}.py"
                text = path.read_text()
                assert text.startswith(f"# tensor-parallel rank {tp_rank} of 2: ")
                assert text.endswith(stage_source(stage, pp=plan.parallel.pp)), path
                if plan.stages[stage.index].recompute:
                    assert "def recompute_0(self, " in text


def test_the_codegen_output_is_what_trains(ranks: tuple[Any, list[dict]]) -> None:
    plan, results = ranks
    par = plan.parallel
    assert (par.tp, par.pp, par.schedule, par.num_microbatches) == (2, 2, "1f1b", GLOBAL_BATCH)
    recomputed = {s.index: s.recompute for s in plan.stages}
    assert any(recomputed.values()), recomputed
    assert sorted(r["coords"] for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    forwards = GLOBAL_BATCH * len(batches("gpt"))
    for r in results:
        (index,) = r["bound"]  # one stage per pipeline rank
        assert r["segments"][index] == [(b,) for b in recomputed[index]]  # one per block
        assert r["bound"][index] == ["forward"] + [f"recompute_{k}" for k in
                                                   range(len(recomputed[index]))]
        expected = {f"stage_{index}.forward": forwards}
        # a checkpointed segment runs in the forward and again in the backward
        expected |= {f"stage_{index}.recompute_{k}": 2 * forwards
                     for k in range(len(recomputed[index]))}
        assert r["calls"] == expected, r


def test_the_tp2_golden_sources_run_like_their_stages(ranks: tuple[Any, list[dict]]
                                                      ) -> None:
    _, results = ranks
    for rank, r in enumerate(results):
        # each stage's golden (tp rank 1) or emitted (tp rank 0) forward, once
        assert r["golden"] == {"stage_0.forward": 1, "stage_1.forward": 1}, (rank, r["golden"])
