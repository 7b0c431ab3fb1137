"""The tensor-parallel rewrite: whole models on t gloo ranks reproduce the loss and every
gradient of the unsharded model; dropout streams; regions that are refused."""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import io
from typing import Any

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from tests._ranks import run_ranks
from tripar.codegen.tensor_parallel import RewriteError, rewrite_with_values, tp_rewrite
from tripar.codegen.tp_rng import ForkedRNG, tp_rng_tracker
from tripar.codegen.tp_shard import shard_map, shard_parameters
from tripar.graph.capture import capture, flat_graph_inputs
from tripar.graph.tp_ops import fetch_attr
from tripar.graph.tp_regions import find_tp_regions
from tripar.models import load_model

SPECS = {
    "gpt": "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8",
    "gpt_square": "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=32",  # seq == hidden
    "llama": "llama:layers=2,hidden=64,heads=8,kv_heads=4,vocab=64,seq=8",
    "bert": "bert:layers=2,hidden=32,heads=4,vocab=64,seq=8",
    "vit": "vit:image=16,patch=8,layers=2,hidden=32,heads=4,classes=8",
    "t5": "t5:layers=1,hidden=32,heads=4,vocab=64,seq=8",
    "hf_gpt2": "hf:GPT2LMHeadModel:n_layer=2,n_embd=32,n_head=4,vocab_size=64,n_positions=16",
    "hf_llama": "hf:LlamaForCausalLM:num_hidden_layers=2,hidden_size=64,num_attention_heads=8,"
                "num_key_value_heads=4,intermediate_size=64,vocab_size=64",
    "hf_bert": "hf:BertForMaskedLM:num_hidden_layers=2,hidden_size=32,num_attention_heads=4,"
               "intermediate_size=64,vocab_size=64",
}


SEQUENCE = ("gpt", "gpt_square", "llama", "bert", "hf_gpt2", "hf_llama", "hf_bert")
"""The models rewritten with sequence parallelism too (at t=2): those with a sequence
(``gpt_square``'s as long as its hidden size: its sequence dims are told apart all the same)."""

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
FAMILIES = {
    "native": tuple(name for name in SPECS if not SPECS[name].startswith("hf:")),
    "hf": tuple(name for name in SPECS if SPECS[name].startswith("hf:")),
}
"""The models of each family, rewritten on one spawn of ranks; hf needs transformers."""


def _pack(value: Any) -> bytes:
    """Values as bytes for run_ranks: tensors pickled by multiprocessing travel as shared
    memory file descriptors (too many for whole models; gone when a rank exits at once)."""
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


@dataclasses.dataclass(frozen=True)
class _Ref:
    name: str


@dataclasses.dataclass(frozen=True)
class _Op:
    """An aten OpOverload by name (they do not pickle)."""

    namespace: str
    op: str
    overload: str

    def resolve(self) -> Any:
        return getattr(getattr(getattr(torch.ops, self.namespace), self.op), self.overload)


def _op(target: Any) -> Any:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target._schema.name.split("::")
        return _Op(ns, name, target._overloadname)
    return target


def _portable(gm: torch.fx.GraphModule) -> tuple:
    """The graph as plain records plus its weights and modules (tied weights stay one
    object), keeping node names: a pickled GraphModule is re-traced from its code on load,
    which renames nodes, and an exported one does not pickle at all."""
    nodes = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and not n.users and n.target == "_guards_fn":
            continue  # export's input guard, an unpicklable closure
        args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: _Ref(a.name))
        nodes.append((n.op, n.name, _op(n.target), args, kwargs))
    attrs = {n.target: fetch_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    mods = {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and n.target != "_guards_fn"}
    return nodes, {**attrs, **mods}, gm.meta.get("tripar_tracer")


def _rebuild(portable: tuple) -> torch.fx.GraphModule:
    nodes, root, tracer = portable
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}

    def deref(a: Any) -> Any:
        if isinstance(a, _Ref):
            return env[a.name]
        if isinstance(a, tuple | list):
            return type(a)(deref(x) for x in a)
        if isinstance(a, dict):
            return {k: deref(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(deref(a.start), deref(a.stop), deref(a.step))
        return a

    for op, name, target, args, kwargs in nodes:
        target = target.resolve() if isinstance(target, _Op) else target
        env[name] = graph.create_node(op, target, deref(args), deref(kwargs), name=name)
        assert env[name].name == name
    gm = torch.fx.GraphModule(root, graph)
    gm.meta["tripar_tracer"] = tracer
    return gm


@functools.cache
def _case(name: str) -> dict[str, Any]:
    """Captured graph, regions, flat inputs, reference loss and gradients of one model."""
    spec = SPECS[name]
    torch.manual_seed(0)
    loaded = load_model(spec, batch_size=2, seq_len=8 if spec.startswith("hf:") else None)
    gm = capture(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    flat = flat_graph_inputs(gm, loaded.example_inputs, loaded.example_kwargs)
    regions, _ = find_tp_regions(gm, {}, degrees=(2, 4),
                                 example_inputs=flat if gm.meta["tripar_tracer"] == "fx" else None)
    model = copy.deepcopy(loaded.model)
    loss = model(*loaded.example_inputs, **loaded.example_kwargs)
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    return {"name": name, "gm": gm, "portable": _portable(gm), "regions": regions, "flat": flat,
            "loss": loss.detach(), "grads": grads}


def _loss_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _rank_models(packed: bytes, t: int) -> bytes:
    """On each rank: rewrite every model, one forward and backward; this rank's loss,
    gradients (by local name) and slice map."""
    import torch.distributed as dist

    rank = dist.get_rank()
    cases = _unpack(packed)
    for case in cases:
        case["gm"] = _rebuild(case.pop("portable"))
    out = []
    for case in cases:
        runs = {}
        for sp in (False, True) if t == 2 and case["name"] in SEQUENCE else (False,):
            local, _ = rewrite_with_values(case["gm"], case["regions"], t=t, rank=rank,
                                           example_inputs=case["flat"], sequence_parallel=sp)
            assert local.meta["tripar_tp"]["sequence"] > 0 or not sp, case["name"]
            loss = _loss_of(local(*case["flat"]))
            loss.backward()
            runs[sp] = {
                "loss": loss.detach(),
                "grads": {k: p.grad for k, p in local.named_parameters(remove_duplicate=False)},
                "shapes": {k: tuple(p.shape)
                           for k, p in local.named_parameters(remove_duplicate=False)},
                "map": shard_map(case["gm"], case["regions"], t=t, rank=rank),
            }
        out.append(runs)
    return _pack(out)


def _assemble(per_rank: list[torch.Tensor], shards: list, shape: tuple[int, ...]) -> torch.Tensor:
    full = torch.zeros(shape, dtype=per_rank[0].dtype)
    for local, shard in zip(per_rank, shards):
        offset = 0
        for start, stop in shard.ranges:
            full.narrow(shard.dim, start, stop - start).copy_(local.narrow(shard.dim, offset, stop - start))
            offset += stop - start
    return full


def _compare(case: dict, results: list[dict], t: int) -> int:
    """Assert every rank's loss and every (gathered) gradient match the reference."""
    for r in results:
        torch.testing.assert_close(r["loss"], case["loss"], rtol=1e-5, atol=1e-6)
    assert set(results[0]["grads"]) >= set(case["grads"]), case["name"]
    sharded = 0
    for name, want in case["grads"].items():
        if name in results[0]["map"]:
            shards = [r["map"][name] for r in results]
            assert results[0]["shapes"][name] != tuple(want.shape)  # really sliced
            got = _assemble([r["grads"][name] for r in results], shards, tuple(want.shape))
            sharded += 1
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{case['name']}: {name}")
        else:
            for r in results:
                torch.testing.assert_close(r["grads"][name], want, rtol=1e-5, atol=1e-6,
                                           msg=f"{case['name']}: {name}")
    return sharded


@pytest.mark.parametrize("t", [2, 4])
@pytest.mark.parametrize("family", [
    "native",
    pytest.param("hf", marks=pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")),
])
def test_whole_models_match_unsharded(family, t):
    cases = [_case(name) for name in FAMILIES[family]]
    for case in cases:
        assert all(t in r.degrees for r in case["regions"]), case["name"]
    packed = _pack([{k: v for k, v in c.items() if k != "gm"} for c in cases])
    results = [_unpack(r) for r in run_ranks(_rank_models, t, packed, t, timeout_s=240.0)]
    for i, case in enumerate(cases):
        kinds = {r.kind for r in case["regions"]}
        assert {"attention", "mlp", "lm_head"} <= kinds, (case["name"], kinds)
        for sp in results[0][i]:  # with sequence parallelism too, at t=2
            sharded = _compare(case, [results[rank][i][sp] for rank in range(t)], t)
            assert sharded >= 6, (case["name"], sharded)
        assert (True in results[0][i]) == (t == 2 and case["name"] in SEQUENCE)


# ------------------------------------------------------------------------ dropout
class _DropMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)
        self.inner, self.outer = nn.Dropout(0.5), nn.Dropout(0.5)

    def forward(self, x):
        return self.outer(self.fc2(self.inner(F.gelu(self.fc1(x)))))


def _rank_dropout(gm: torch.fx.GraphModule, regions: list, x: torch.Tensor) -> dict:
    import torch.distributed as dist

    rank = dist.get_rank()
    torch.manual_seed(1234)  # the same default stream on every tp rank
    local = tp_rewrite(gm, regions, t=2, rank=rank, example_inputs=[x],
                       rng=tp_rng_tracker(1234, rank))
    seen: dict[str, torch.Tensor] = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            seen[n.name] = super().run_node(n)
            return seen[n.name]

    with torch.no_grad():
        Rec(local).run(x)
    return _pack({"inner_in": seen["gelu"], "inner_out": seen["inner"], "outer_in": seen["add"],
                  "outer_out": seen["outer"]})


def test_dropout_masks_differ_in_sharded_regions_and_agree_outside():
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_DropMLP())
    x = torch.randn(4, 16)
    regions, _ = find_tp_regions(gm, {}, degrees=(2,), example_inputs=[x])
    (r,) = regions
    assert "inner" in r.nodes and "outer" not in r.nodes
    local = tp_rewrite(gm, regions, t=2, rank=0, example_inputs=[x])
    assert isinstance(local.get_submodule("tp_rng_inner"), ForkedRNG)
    res = [_unpack(r) for r in run_ranks(_rank_dropout, 2, gm, regions, x)]
    inner = [(o == 0) & (i != 0) for o, i in ((q["inner_out"], q["inner_in"]) for q in res)]
    outer = [(q["outer_out"] == 0) & (q["outer_in"] != 0) for q in res]
    assert 0.3 < inner[0].float().mean() < 0.7 and 0.3 < outer[0].float().mean() < 0.7
    assert not torch.equal(inner[0], inner[1])  # independent masks for different features
    assert torch.equal(outer[0], outer[1])  # the replicated dropout draws one mask
    torch.testing.assert_close(res[0]["outer_out"], res[1]["outer_out"])


def test_attention_dropout_draws_from_the_tp_stream():
    lm = load_model("gpt:layers=1,hidden=32,heads=4,vocab=64,seq=8,dropout=0.1", batch_size=2,
                    device="meta")
    gm = capture(lm.model, lm.example_inputs)
    regions, _ = find_tp_regions(gm, {}, degrees=(2,), example_inputs=list(lm.example_inputs))
    local = tp_rewrite(gm, regions, t=2, rank=1, example_inputs=list(lm.example_inputs))
    forked = {n.name for n in local.graph.nodes
              if n.op == "call_module" and isinstance(local.get_submodule(n.target), ForkedRNG)}
    assert forked == {"scaled_dot_product_attention"}  # resid/embedding dropouts stay replicated
    code = local.code
    assert "tp_rng_scaled_dot_product_attention" in code and "tp_reduce" in code


# ------------------------------------------------------------------------ weights
def test_shard_parameters_fused_and_tied():
    case = _case("gpt")
    gm, regions = case["gm"], case["regions"]
    local = tp_rewrite(gm, regions, t=2, rank=1, example_inputs=case["flat"])
    state = shard_parameters(gm, regions, t=2, rank=1)
    for k, v in local.state_dict().items():
        torch.testing.assert_close(state[k], v, msg=k)
    assert state["wte.weight"] is state["lm_head.weight"]  # tied: one slice
    m = shard_map(gm, regions, t=2, rank=1)
    assert m["lm_head.weight"].fqn == "wte.weight" and m["wte.weight"].ranges == ((32, 64),)
    assert m["blocks.0.attn.c_attn.weight"].ranges == ((16, 32), (48, 64), (80, 96))
    assert m["blocks.0.attn.c_proj.weight"].dim == 1
    assert m["blocks.0.attn.c_attn.weight"].to_json()["parts"] == [32, 32, 32]


# ------------------------------------------------------------------------ refusals
def test_refusals_name_the_node_and_the_reason():
    case = _case("gpt")
    gm, regions, flat = case["gm"], case["regions"], case["flat"]
    # the LM head shares its weight with the embedding: sharding one and not the other is wrong
    head_only = [r for r in regions if r.kind != "embedding"]
    with pytest.raises(RewriteError, match=r"node wte reads the sharded parameter wte.weight"):
        tp_rewrite(gm, head_only, t=2, rank=0, example_inputs=flat)
    # a degree the region was not proven at
    with pytest.raises(RewriteError, match=r"t=3 was not proven.*proven degrees: \[2, 4\]"):
        tp_rewrite(gm, regions, t=3, rank=0, example_inputs=flat)
    # a record missing a shape rewrite is caught by shape propagation, not run wrong
    attn = next(r for r in regions if r.kind == "attention")
    broken = [dataclasses.replace(r, rewrites=r.rewrites[1:]) if r is attn else r for r in regions]
    with pytest.raises(RewriteError, match=r"node (split|getitem_\d|view\w*)"):
        tp_rewrite(gm, broken, t=2, rank=0, example_inputs=flat)
    assert gm.get_parameter("wte.weight").shape == (64, 32)  # the input graph is untouched


class _NLLHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 32)

    def forward(self, x, y):
        return F.nll_loss(F.log_softmax(self.head(x), dim=-1), y)


def test_nll_over_vocab_parallel_log_probs_is_refused():
    gm = torch.fx.symbolic_trace(_NLLHead())
    x, y = torch.randn(4, 16), torch.randint(0, 32, (4,))
    regions, _ = find_tp_regions(gm, {}, degrees=(2,), example_inputs=[x, y])
    (r,) = regions
    assert r.kind == "lm_head" and r.loss == "nll_loss"
    with pytest.raises(RewriteError, match=r"lm_head region at node head: loss node nll_loss: an NLL"):
        tp_rewrite(gm, regions, t=2, rank=0, example_inputs=[x, y])
