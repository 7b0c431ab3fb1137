"""codegen.build: a plan into each rank's programs.

Tier 2: for every model and (pp, tp), the stage programs of all ranks, run in pipeline
order with the tensor-parallel ranks on gloo processes, reproduce the unsharded model's
loss and every parameter's gradient (TP slices gathered, tied replicas summed). Tier 1:
plans made for another graph are refused, weights initialised on the meta device equal
the real model's slices, the parameter map and the sources, golden files.

Plans are written by hand (STYLE.md rule 6): stages of whole blocks, and the graph's own
tensor-parallel regions as the plan's ``TPShard`` records.

Regenerate the golden files after an intended codegen change with

    TRIPAR_UPDATE_GOLDEN=1 python -m pytest tests/codegen/test_build.py -p no:xdist
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib.util
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._ranks import run_ranks
from tripar.codegen.build import build, build_pipeline, check_plan, plan_regions, write_rank
from tripar.codegen.split import block_nodes, even_stage_blocks, propagate_values
from tripar.codegen.tensor_parallel import RewriteError
from tripar.errors import PlanError
from tripar.graph.capture import capture, flat_graph_inputs
from tripar.graph.tp_regions import find_tp_regions
from tripar.models import load_model

SPECS = {
    "gpt": "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8",
    "llama": "llama:layers=2,hidden=64,heads=8,kv_heads=4,vocab=64,seq=8",
    "bert": "bert:layers=2,hidden=32,heads=4,vocab=64,seq=8",
    "vit": "vit:image=16,patch=8,layers=2,hidden=32,heads=4,classes=8",
    "hf_gpt2": "hf:GPT2LMHeadModel:n_layer=2,n_embd=32,n_head=4,vocab_size=64,n_positions=16",
    "hf_llama": "hf:LlamaForCausalLM:num_hidden_layers=2,hidden_size=64,num_attention_heads=8,"
                "num_key_value_heads=4,intermediate_size=64,vocab_size=64",
    "hf_bert": "hf:BertForMaskedLM:num_hidden_layers=2,hidden_size=32,num_attention_heads=4,"
               "intermediate_size=64,vocab_size=64",
    # two attention regions per decoder layer (self and cross), told apart by their index
    "t5": "t5:layers=2,hidden=32,heads=4,vocab=64,seq=8,buckets=8,max_distance=16",
}
CONFIGS = {2: ((2, 2), (4, 2)), 4: ((2, 4),)}
"""World size (= tp) -> the (pp, tp) configurations one spawn of that many ranks runs."""
MORE_CONFIGS = {"t5": {2: ((1, 2),), 4: ((1, 4), (4, 4))}}
"""Models that also run these configurations (t5: every pp in 1, 2, 4 at tp 2 and 4)."""
WEIGHTS = {(2, 2): "source", (4, 2): "meta", (2, 4): "graph",
           (1, 2): "meta", (1, 4): "source", (4, 4): "meta"}
"""Where each configuration's weights come from: a real model, a meta-built model
initialised locally, or the captured graph's own tensors."""


def configs(name: str, world: int) -> tuple[tuple[int, int], ...]:
    """The (pp, tp) configurations ``name`` runs on ``world`` ranks."""
    return CONFIGS[world] + MORE_CONFIGS.get(name, {}).get(world, ())


HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
RUNNABLE = tuple(name for name in SPECS if HAS_TRANSFORMERS or not SPECS[name].startswith("hf:"))
"""The models the ranks build: without transformers, the native ones (the hf: cases skip)."""
_NEEDS_TRANSFORMERS = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
MATRIX = [pytest.param(name, pp, tp, marks=(
              # one launch of `world` ranks serves every case of that world: keep its cases
              # on one xdist worker (--dist loadgroup), or each worker launches it again
              pytest.mark.xdist_group(f"codegen-world{world}"),
              *(() if name in RUNNABLE else (_NEEDS_TRANSFORMERS,))))
          for world in CONFIGS for name in SPECS for pp, tp in configs(name, world)]
GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("TRIPAR_UPDATE_GOLDEN") == "1"


# ---- hand-written plans ---------------------------------------------------------------


def make_plan(gm: torch.fx.GraphModule, flat: Sequence[Any], spec: str, *, pp: int, tp: int,
              vpp: int = 1, regions: Sequence[Any] | None = None):
    """A plan splitting ``gm``'s blocks evenly over pp*vpp stages and sharding every region
    of the graph proven at ``tp`` (or ``regions``)."""
    from tripar.plan.config import ParallelConfig
    from tripar.plan.plan import (
        ClusterInfo,
        Estimate,
        Inputs,
        ModelInfo,
        Plan,
        StagePlan,
        TPShard,
    )

    table = block_nodes(gm)
    if regions is None and tp > 1:
        node_block = {n: b for b, nodes in table.items() for n in nodes}
        exported = gm.meta.get("tripar_tracer") == "export"
        regions, _ = find_tp_regions(gm, node_block, degrees=(tp,),
                                     example_inputs=None if exported else flat)
    stage_blocks = even_stage_blocks(list(table), pp * vpp)
    stages = tuple(StagePlan(i, i % pp, i // pp, tuple(b), (), 0.01, 10**9)
                   for i, b in enumerate(stage_blocks))
    return Plan(
        model=ModelInfo(spec, "0" * 16, tuple(table), sum(p.numel() for p in gm.parameters())),
        cluster=ClusterInfo("cpu", 1, pp * tp, 10**10, 1e11, 1e10, 1e9),
        inputs=Inputs(global_batch_size=4, seq_len=8),
        parallel=ParallelConfig(dp=1, tp=tp, pp=pp, micro_batch_size=2, num_microbatches=2,
                                vpp=vpp, schedule="interleaved-1f1b" if vpp > 1 else "1f1b"),
        stages=stages,
        estimate=Estimate(0.05, 4 * 8 / 0.05, 10**9, 0.2, (10**9,) * pp),
        tp_regions=tuple(TPShard(r.block, r.kind, r.nodes, r.shards, index=r.index)
                         for r in regions or ()),
    )


def _load(spec: str, device: str = "cpu"):
    return load_model(spec, batch_size=2, seq_len=8 if spec.startswith("hf:") else None,
                      device=device)


def _capture(loaded) -> tuple[torch.fx.GraphModule, list[Any]]:
    gm = capture(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    return gm, flat_graph_inputs(gm, loaded.example_inputs, loaded.example_kwargs)


def _loss_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def run_pipeline(programs: Sequence[Any], flat: Sequence[Any]) -> torch.Tensor:
    """Every stage of ``programs`` (one per pipeline rank) in pipeline order: forward with
    detached activations between stages, then backward stage by stage with the received
    gradients, as the runtime does. Returns the loss."""
    stages = sorted((s for p in programs for s in p.stages), key=lambda s: s.index)
    assert [s.index for s in stages] == list(range(len(stages)))
    received, outputs, acts = [], [], ()
    for stage in stages:
        recv = [a.detach().requires_grad_(a.is_floating_point()) for a in acts]
        out = stage.module(*stage.split_inputs(recv, flat))
        if not stage.is_last:
            assert [tuple(v.shape) for v in out] == [s.shape for s in stage.sent]
        received.append(recv)
        outputs.append(out)
        acts = out if not stage.is_last else ()
    loss = _loss_of(outputs[-1])
    loss.backward()
    for s in range(len(stages) - 2, -1, -1):
        pairs = [(o, r.grad) for o, r in zip(outputs[s], received[s + 1])
                 if o.requires_grad and r.grad is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return loss.detach()


# ---- tier 2: every rank on gloo ---------------------------------------------------------


def _rank_programs(name: str, pp: int, tp: int, rank: int, loaded: Any,
                   gm: torch.fx.GraphModule, flat: list[Any],
                   values: dict[str, Any]) -> tuple[torch.Tensor, dict, dict]:
    spec = SPECS[name]
    plan = make_plan(gm, flat, spec, pp=pp, tp=tp)
    how = WEIGHTS[(pp, tp)]
    if how == "source":  # weights copied from the real model
        programs = list(build_pipeline(gm, plan, flat, tp_rank=rank, source=loaded.model,
                                       values=values))
    elif how == "meta" and not spec.startswith("hf:"):
        meta = _load(spec, "meta").model
        programs = list(build_pipeline(gm, plan, flat, tp_rank=rank, meta_model=meta, seed=0,
                                       values=values))
    else:
        programs = list(build_pipeline(gm, plan, flat, tp_rank=rank, values=values))
    held = {fqn for p in programs for s in p.stages for _, fqn in s.params}
    loss = run_pipeline(programs, flat)
    grads: dict[str, torch.Tensor] = {}
    for program in programs:
        for stage in program.stages:
            fqn = dict(stage.params)
            for local, param in stage.module.named_parameters():
                assert param.grad is not None, (name, stage.index, local)
                grads.setdefault(fqn[local], []).append(param.grad)
    assert set(grads) == held
    return loss, grads, dict(programs[0].shards)


def _rank_main(world: int, names: Sequence[str]) -> bytes:
    import torch.distributed as dist

    rank = dist.get_rank()
    out = {}
    for name in names:
        loaded = _load(SPECS[name])
        gm, flat = _capture(loaded)  # captured here: graphs do not pickle, capture is deterministic
        values = propagate_values(gm, flat)  # shared by the builds, as auto_parallel's are
        for pp, tp in configs(name, world):
            out[(name, pp, tp)] = _rank_programs(name, pp, tp, rank, loaded, gm, flat, values)
    buf = io.BytesIO()
    torch.save(out, buf)  # bytes: tensors pickled by multiprocessing travel as shared memory
    return buf.getvalue()


@functools.cache
def _ranks(world: int) -> list[dict]:
    """One spawn of ``world`` gloo ranks running every model and configuration."""
    results = run_ranks(_rank_main, world, world, RUNNABLE, timeout_s=240.0,
                        pg_timeout_s=120.0)
    return [torch.load(io.BytesIO(r), weights_only=False) for r in results]


@functools.cache
def _reference(name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, str]]:
    """Loss, {FQN: grad} of the unsharded model and {every FQN: its canonical FQN}."""
    torch.set_num_threads(1)
    loaded = _load(SPECS[name])
    model = copy.deepcopy(loaded.model)
    loss = _loss_of(model(*loaded.example_inputs, **loaded.example_kwargs))
    loss.backward()
    canonical: dict[int, str] = {}
    names = {}
    for fqn, param in model.named_parameters(remove_duplicate=False):
        names[fqn] = canonical.setdefault(id(param), fqn)
    grads = {fqn: p.grad for fqn, p in model.named_parameters()}
    return loss.detach(), grads, names


def _gather(pieces: Sequence[torch.Tensor], shards: Sequence[Any],
            like: torch.Tensor) -> torch.Tensor:
    full = torch.full_like(like, float("nan"))
    for piece, shard in zip(pieces, shards):
        offset = 0
        for start, stop in shard.ranges:
            full.narrow(shard.dim, start, stop - start).copy_(
                piece.narrow(shard.dim, offset, stop - start))
            offset += stop - start
    return full


@pytest.mark.parametrize(("name", "pp", "tp"), MATRIX)
def test_ranks_reproduce_loss_and_grads(name: str, pp: int, tp: int) -> None:
    results = [r[(name, pp, tp)] for r in _ranks(tp)]
    ref_loss, ref_grads, canonical = _reference(name)
    for loss, _, _ in results:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    # per rank: canonical FQN -> gradient summed over the stages holding a replica
    summed = []
    for _, grads, shards in results:
        mine: dict[str, tuple[torch.Tensor, Any]] = {}
        for fqn, pieces in grads.items():
            key = canonical[fqn]
            total = sum(pieces[1:], pieces[0].clone())
            if key in mine:
                assert (shards.get(fqn) is None) == (mine[key][1] is None)
                total = total + mine[key][0]
            mine[key] = (total, shards.get(fqn))
        summed.append(mine)
    assert set(summed[0]) == set(ref_grads), f"{name}: gradients missing or extra"
    sliced = 0
    for fqn, want in ref_grads.items():
        got = [s[fqn] for s in summed]
        if got[0][1] is not None:
            sliced += 1
            assert tuple(got[0][0].shape) != tuple(want.shape)
            full = _gather([g for g, _ in got], [s for _, s in got], want)
        else:
            full = got[0][0]
            for other, _ in got[1:]:  # replicated: every tensor-parallel rank agrees
                torch.testing.assert_close(other, full, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, f=fqn: f"{name} pp={pp} tp={tp} {f}: {m}")
    assert sliced >= 6, f"{name}: only {sliced} parameters were sharded"
    if name == "t5":  # both decoder attentions sharded, each by its own region
        for part in ("self_attn", "cross_attn"):
            for w in "qkvo":
                assert summed[0][f"decoder.layers.1.{part}.{w}.weight"][1] is not None


# ---- tier 1: no process group -----------------------------------------------------------


@functools.cache
def _gpt() -> tuple[Any, torch.fx.GraphModule, list[Any]]:
    loaded = _load(SPECS["gpt"])
    gm, flat = _capture(loaded)
    return loaded, gm, flat


def test_plan_for_another_model_is_refused() -> None:
    _, gm, flat = _gpt()
    plan = make_plan(gm, flat, SPECS["gpt"], pp=2, tp=2)
    model = dataclasses.replace(plan.model, blocks=(*plan.model.blocks[:-1], "head"))
    stages = list(plan.stages)
    stages[-1] = dataclasses.replace(stages[-1], blocks=(*stages[-1].blocks[:-1], "head"))
    with pytest.raises(PlanError, match=r"graph has blocks .*re-plan for this model"):
        check_plan(gm, dataclasses.replace(plan, model=model, stages=tuple(stages)))
    bigger = dataclasses.replace(plan.model, params=plan.model.params + 1)
    with pytest.raises(PlanError, match=r"parameters, but the graph has"):
        build(gm, dataclasses.replace(plan, model=bigger), flat, pp_rank=0)
    with pytest.raises(PlanError, match="fingerprint"):
        check_plan(gm, plan, fingerprint="f" * 16)
    with pytest.raises(PlanError, match=r"pp_rank=2 is outside 0\.\.1"):
        build(gm, plan, flat, pp_rank=2)
    with pytest.raises(PlanError, match=r"tp_rank=5 is outside 0\.\.1"):
        build(gm, plan, flat, pp_rank=0, tp_rank=5)
    broken = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, pp=4))
    with pytest.raises(PlanError, match="invalid plan"):
        build(gm, broken, flat, pp_rank=0)


def test_regions_the_graph_does_not_have_are_refused() -> None:
    _, gm, flat = _gpt()
    plan = make_plan(gm, flat, SPECS["gpt"], pp=2, tp=2)
    assert [r.name for r in plan.tp_regions][:2] == ["wte+wpe+drop:embedding:0",
                                                    "blocks.0:attention:0"]
    shards = list(plan.tp_regions)
    shards[1] = dataclasses.replace(shards[1], block="blocks.7")
    with pytest.raises(PlanError, match=r"no attention region in block 'blocks.7'"):
        plan_regions(gm, dataclasses.replace(plan, tp_regions=tuple(shards)), flat)
    shards[1] = dataclasses.replace(plan.tp_regions[1], nodes=plan.tp_regions[1].nodes[:-1])
    with pytest.raises(PlanError, match="blocks.0:attention:0: the plan lists"):
        plan_regions(gm, dataclasses.replace(plan, tp_regions=tuple(shards)), flat)
    shards[1] = dataclasses.replace(plan.tp_regions[1], shards=plan.tp_regions[1].shards[1:])
    with pytest.raises(PlanError, match="blocks.0:attention:0: the plan shards"):
        plan_regions(gm, dataclasses.replace(plan, tp_regions=tuple(shards)), flat)
    # tp=3 divides neither the 4 heads nor the vocabulary: the plan's region is unprovable
    three = make_plan(gm, flat, SPECS["gpt"], pp=1, tp=2)
    three = dataclasses.replace(
        three, parallel=dataclasses.replace(three.parallel, tp=3),
        cluster=dataclasses.replace(three.cluster, devices_per_node=3))
    with pytest.raises(PlanError, match=r"provable at tp=3 \(t=3: "):
        build(gm, three, flat, pp_rank=0)


def test_t5_self_and_cross_attention_are_two_regions_of_one_block() -> None:
    loaded = _load(SPECS["t5"])
    gm, flat = _capture(loaded)
    plan = make_plan(gm, flat, SPECS["t5"], pp=2, tp=2).validate()
    names = [r.name for r in plan.tp_regions]
    assert len(set(names)) == len(names) == 13
    for layer in range(2):
        block = f"decoder.layers.{layer}"
        assert [n for n in names if n.startswith(block + ":")] == [
            f"{block}:attention:0", f"{block}:attention:1", f"{block}:mlp:0"]
    regions = plan_regions(gm, plan, flat)
    assert [r.name for r in regions] == names
    self_attn, cross = (r for r in regions if r.block == "decoder.layers.0"
                        and r.kind == "attention")
    assert {f for f, _ in self_attn.shards} == {
        f"decoder.layers.0.self_attn.{w}.weight" for w in "qkvo"}
    assert {f for f, _ in cross.shards} == {
        f"decoder.layers.0.cross_attn.{w}.weight" for w in "qkvo"}
    # the plan round-trips with both regions; the same plan with one index lost does not
    assert type(plan).from_json(plan.to_json()) == plan
    shards = list(plan.tp_regions)
    i = names.index("decoder.layers.0:attention:1")
    shards[i] = dataclasses.replace(shards[i], index=0)
    with pytest.raises(PlanError, match=r"listed twice: \['decoder.layers.0:attention:0'\]"):
        dataclasses.replace(plan, tp_regions=tuple(shards)).validate()
    shards[i] = dataclasses.replace(shards[i], index=2)
    with pytest.raises(PlanError, match=r"no attention region number 2 in block "
                                        r"'decoder.layers.0' \(only decoder.layers.0:"
                                        r"attention:0, decoder.layers.0:attention:1\)"):
        plan_regions(gm, dataclasses.replace(plan, tp_regions=tuple(shards)), flat)
    # swapped indices: each name finds the other region, whose nodes differ
    shards[i] = dataclasses.replace(shards[i], index=0)
    shards[i - 1] = dataclasses.replace(shards[i - 1], index=1)
    with pytest.raises(PlanError, match="decoder.layers.0:attention:1: the plan lists"):
        plan_regions(gm, dataclasses.replace(plan, tp_regions=tuple(shards)), flat)


def test_a_tied_weight_sharded_by_one_region_only_is_refused() -> None:
    _, gm, flat = _gpt()
    plan = make_plan(gm, flat, SPECS["gpt"], pp=2, tp=2)
    without_embedding = tuple(r for r in plan.tp_regions if r.kind != "embedding")
    with pytest.raises(PlanError, match=r"shards region lm_head:lm_head:0, whose weight "
                                        r"(wte|lm_head)\.weight region wte\+wpe\+drop:embedding:0"):
        build(gm, dataclasses.replace(plan, tp_regions=without_embedding), flat, pp_rank=0)
    # the rewrite itself refuses too, naming the node that reads the sliced weight
    from tripar.codegen.tensor_parallel import tp_rewrite

    regions = [r for r in plan_regions(gm, plan, flat) if r.kind != "embedding"]
    with pytest.raises(RewriteError, match="node wte reads the sharded parameter"):
        tp_rewrite(gm, regions, t=2, rank=0, example_inputs=flat)


def test_tp1_build_is_the_plain_split_with_own_weights() -> None:
    loaded, gm, flat = _gpt()
    plan = make_plan(gm, flat, SPECS["gpt"], pp=2, tp=1, vpp=2)
    program = build(gm, plan, flat, pp_rank=1, source=loaded.model)
    assert [s.index for s in program.stages] == [1, 3]
    assert program.regions == () and program.shards == {}
    real = dict(loaded.model.named_parameters(remove_duplicate=False))
    for stage in program.stages:
        for local, fqn in stage.params:
            tensor = stage.module.get_parameter(local)
            assert torch.equal(tensor, real[fqn]) and tensor is not real[fqn]
    held = {fqn for s in program.stages for _, fqn in s.params}
    # stages 1 and 3 hold blocks.1 and ln_f, and the loss: their weights only
    assert held == {f for f in real if f.startswith(("blocks.1.", "ln_f."))}


def test_meta_init_equals_the_real_models_slices() -> None:
    spec = SPECS["llama"]
    real = _load(spec)
    gm, flat = _capture(real)
    meta = _load(spec, "meta")
    meta_gm, meta_flat = _capture(meta)
    plan = make_plan(gm, flat, spec, pp=2, tp=2)
    for pp_rank in range(2):
        want = build(gm, plan, flat, pp_rank=pp_rank, tp_rank=1)
        # the rewrite and the split hold no real weight: only the rank's stages do
        assert all(p.device.type == "meta" for s in want.split.stages
                   for p in s.module.parameters())
        got = build(meta_gm, plan, meta_flat, pp_rank=pp_rank, tp_rank=1,
                    meta_model=meta.model, seed=0)
        assert [s.params for s in got.stages] == [s.params for s in want.stages]
        for a, b in zip(got.stages, want.stages):
            mine = dict(a.module.named_parameters())
            theirs = dict(b.module.named_parameters())
            assert mine.keys() == theirs.keys()
            for local, tensor in mine.items():
                assert tensor.device.type == "cpu"
                torch.testing.assert_close(tensor, theirs[local], rtol=0, atol=0)
            sliced = [local for local, fqn in a.params if fqn in got.shards]
            assert sliced, "a llama stage holds sharded weights"
    with pytest.raises(PlanError, match="meta_model="):
        build(meta_gm, plan, meta_flat, pp_rank=0)
    bare = build(meta_gm, plan, meta_flat, pp_rank=0, materialize=False)
    assert all(p.device.type == "meta" for s in bare.stages for p in s.module.parameters())


def test_a_graph_exported_from_a_meta_model_builds(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    spec = SPECS["hf_gpt2"]
    meta = _load(spec, "meta")
    gm, flat = _capture(meta)  # torch.export bakes device=meta into the graph
    assert gm.meta["tripar_tracer"] == "export"
    plan = make_plan(gm, flat, spec, pp=2, tp=2)
    assert len(plan.tp_regions) == 6
    for program in build_pipeline(gm, plan, flat, tp_rank=0, materialize=False):
        for path in write_rank(program, tmp_path / f"pp{program.pp_rank}"):
            if path.suffix == ".py":
                source = path.read_text()
                compile(source, str(path), "exec")
                assert "device(type='meta')" not in source
        last = program.stages[-1]
        if last.is_last:
            assert "tp_cross_entropy" in dict(last.module.named_modules())


def test_param_map_names_each_slice_of_every_parameter_once() -> None:
    loaded, gm, flat = _gpt()
    plan = make_plan(gm, flat, SPECS["gpt"], pp=2, tp=2)
    held: dict[int, dict[str, Any]] = {0: {}, 1: {}}  # tp rank -> FQN -> its slice or None
    for tp_rank in range(2):
        for program in build_pipeline(gm, plan, flat, tp_rank=tp_rank, materialize=False):
            data = json.loads(program.param_map_json())
            assert (data["pp_rank"], data["tp_rank"], data["pp"], data["tp"]) == (
                program.pp_rank, tp_rank, 2, 2)
            for stage in data["stages"]:
                for entry in stage["params"].values():
                    assert entry["fqn"] not in held[tp_rank], f"{entry['fqn']} named twice"
                    cut = entry["slice"]
                    held[tp_rank][entry["fqn"]] = cut
                    if cut:
                        assert (cut["rank"], cut["t"]) == (tp_rank, 2)
                        # a tied weight's slice names the tensor's canonical FQN
                        assert cut["fqn"] == entry["fqn"] or entry["replica"]
                        assert entry["shape"][cut["dim"]] == sum(b - a for a, b in cut["ranges"])
                    assert entry["replica"] == (entry["fqn"] in ("wte.weight", "lm_head.weight"))
    model = dict(loaded.model.named_parameters(remove_duplicate=False))
    # the tied head is held, as a replica, under its own name by the last stage
    assert set(held[0]) == set(held[1]) == set(model)
    sliced = 0
    for fqn, tensor in model.items():
        cuts = [held[r][fqn] for r in range(2)]
        if cuts[0] is None:
            assert cuts[1] is None, f"{fqn}: replicated on one rank, sliced on the other"
            continue
        sliced += 1
        dim = cuts[0]["dim"]
        covered = sorted(i for c in cuts for a, b in c["ranges"] for i in range(a, b))
        assert covered == list(range(tensor.shape[dim])), f"{fqn}: slices do not tile dim {dim}"
    # wte.weight and its tied lm_head.weight, and per layer: the fused QKV's weight and
    # bias, the attention projection's weight, the MLP's fc weight and bias and projection
    assert sliced == 2 + 2 * 6


def test_written_sources_compile_and_match_golden(tmp_path: Path) -> None:
    _, gm, flat = _gpt()
    plan = make_plan(gm, flat, SPECS["gpt"], pp=2, tp=2)
    folder = GOLDEN / "gpt_pp2_tp2"
    for program in build_pipeline(gm, plan, flat, tp_rank=1, materialize=False):
        rank_dir = f"rank_pp{program.pp_rank}_tp1"
        written = write_rank(program, tmp_path / rank_dir)
        assert [p.name for p in written] == [f"stage_{program.pp_rank}.py", "param_map.json"]
        for path in written:
            text = path.read_text()
            if path.suffix == ".py":
                compile(text, str(path), "exec")
                assert text.startswith("# tensor-parallel rank 1 of 2: 6 regions sharded\n")
            golden = folder / rank_dir / path.name
            if UPDATE:
                golden.parent.mkdir(parents=True, exist_ok=True)
                golden.write_text(text)
            assert golden.exists(), f"{golden} is missing: run with TRIPAR_UPDATE_GOLDEN=1"
            expected = golden.read_text()
            diff = "".join(difflib.unified_diff(expected.splitlines(True),
                                                text.splitlines(True), str(golden), "generated"))
            assert text == expected, f"generated source changed:\n{diff}"
    stage0 = (folder / "rank_pp0_tp1" / "stage_0.py").read_text()
    assert "self.tp_copy(" in stage0 and "self.tp_reduce(" in stage0
    assert "vocab_parallel_embedding(" in stage0
    stage1 = (folder / "rank_pp1_tp1" / "stage_1.py").read_text()
    assert "self.tp_cross_entropy(" in stage1
