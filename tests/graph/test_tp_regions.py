"""Tensor-parallel regions found in captured graphs, proven by sharded shape propagation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from tripar.graph.capture import capture
from tripar.graph.tp_ops import find_linears
from tripar.graph.tp_prove import prove, region_program, take_shard, vocab_parallel_embedding
from tripar.graph.tp_regions import find_tp_regions
from tripar.graph.values import meta_values
from tripar.models import load_model


def _node_block(gm: torch.fx.GraphModule) -> dict[str, str]:
    out = {}
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if stack:
            out[n.name] = list(stack.values())[-1][0]
        elif n.op == "call_module":
            out[n.name] = n.target
    return out


def _find(spec: str, degrees=(2, 4), device: str = "meta", by_layer: bool = False):
    """Regions of a zoo model, in blocks of the innermost module (or of whole layers)."""
    lm = load_model(spec, batch_size=2, device=device)
    gm = capture(lm.model, lm.example_inputs, lm.example_kwargs)
    inputs = list(lm.example_inputs) + list((lm.example_kwargs or {}).values())
    example = inputs if gm.meta["tripar_tracer"] == "fx" else None
    if by_layer:
        from tripar.codegen.split import block_nodes

        node_block = {n: b for b, nodes in block_nodes(gm).items() for n in nodes}
    else:
        node_block = _node_block(gm)
    regions, unproven = find_tp_regions(gm, node_block, degrees=degrees, example_inputs=example)
    return gm, regions, unproven


def _check_complete(gm, regions, unproven, *, layers, attn_per_layer=1, head=True, allowed_left=()):
    """Every linear is in a proven region at t=2 and 4 except the ones named in allowed_left."""
    kinds = [r.kind for r in regions]
    assert kinds.count("attention") == layers * attn_per_layer
    assert kinds.count("mlp") == layers
    assert kinds.count("lm_head") == (1 if head else 0)
    for r in regions:
        assert set(r.degrees) >= {2, 4}, (r.kind, r.nodes[:3], r.degrees)
        assert r.comm_bytes > 0 and r.block
        if r.kind in ("mlp", "attention"):
            assert r.forward_collective == "all_reduce" and r.backward_collective == "all_reduce"
            assert r.column and r.row
        if r.kind == "attention":
            assert r.heads > 0 and r.heads % 4 == 0 and r.kv_heads % 4 == 0
    linears = {n for n, lin in find_linears(gm, dict(gm.named_modules())).items() if not lin.embedding}
    covered = {n for r in regions for n in r.column + r.row}
    left = linears - covered
    structural = {n for u in unproven if u.degree == 0 for n in u.nodes}
    assert left <= structural
    assert len(left) == len(allowed_left)
    for u in unproven:
        if u.degree == 0:
            assert any(word in u.reason for word in allowed_left), u.reason


# ------------------------------------------------------------------ zoo models
def test_zoo_gpt_fused_qkv_and_tied_head():
    gm, regions, unproven = _find("gpt:layers=2,hidden=64,heads=4,vocab=128,seq=16", degrees=(2, 3, 4))
    _check_complete(gm, regions, unproven, layers=2)
    attn = [r for r in regions if r.kind == "attention"]
    assert all(r.heads == 4 and r.kv_heads == 4 for r in attn)
    # the fused c_attn is sharded per part (q, k and v each), its split sizes rewritten
    assert all(dict(r.parts)[r.shards[0][0]] == (64, 64, 64) for r in attn)
    assert all(r.rewrites for r in attn)
    emb = next(r for r in regions if r.kind == "embedding")
    head = next(r for r in regions if r.kind == "lm_head")
    assert emb.tied and set(emb.tied) == set(head.tied)
    assert emb.forward_collective == "all_reduce" and emb.backward_collective == "none"
    assert head.loss and head.comm_bytes == 3 * 2 * 16 * 4
    # t=3 does not divide 4 heads: unproven, with the reason
    bad = [u for u in unproven if u.kind == "attention" and u.degree == 3]
    assert len(bad) == 2 and all("4 attention heads are not divisible by 3" in u.reason for u in bad)
    assert all(3 not in r.degrees for r in regions)


def test_zoo_llama_gqa():
    gm, regions, unproven = _find("llama:layers=2,hidden=64,heads=8,kv_heads=4,vocab=128,seq=16",
                                  degrees=(2, 4, 8))
    _check_complete(gm, regions, unproven, layers=2)
    attn = [r for r in regions if r.kind == "attention"]
    assert all((r.heads, r.kv_heads) == (8, 4) and len(r.column) == 3 for r in attn)
    assert all(8 not in r.degrees for r in attn)  # t must divide the 4 kv heads
    assert any(u.degree == 8 and "4 key/value heads" in u.reason for u in unproven)
    mlp = [r for r in regions if r.kind == "mlp"]
    assert all(len(r.column) == 2 and len(r.row) == 1 for r in mlp)  # SwiGLU: gate and up


def test_zoo_bert():
    gm, regions, unproven = _find("bert:layers=2,hidden=64,heads=4,vocab=128,seq=16")
    # the MLM transform (dense -> gelu -> LayerNorm) cannot be split: stays replicated
    _check_complete(gm, regions, unproven, layers=2, allowed_left=("layer_norm",))


def test_zoo_vit():
    gm, regions, unproven = _find("vit:layers=2,hidden=64,heads=4,classes=16")
    _check_complete(gm, regions, unproven, layers=2)
    assert not [r for r in regions if r.kind == "embedding"]  # patches, not token ids


def test_zoo_t5_encoder_decoder():
    gm, regions, unproven = _find("t5:layers=1,hidden=64,heads=4,vocab=128,seq=16")
    kinds = [r.kind for r in regions]
    assert kinds.count("attention") == 3 and kinds.count("mlp") == 2  # enc self, dec self + cross
    assert all(set(r.degrees) >= {2, 4} for r in regions)
    # the relative position bias, shared by every layer, is sliced per rank (no comm)
    assert any(r.narrows for r in regions if r.kind == "attention")
    linears = {n for n, lin in find_linears(gm, dict(gm.named_modules())).items() if not lin.embedding}
    assert linears <= {n for r in regions for n in r.column + r.row}
    # one decoder layer, two attention regions: told apart by their index (self first)
    _, regions, _ = _find("t5:layers=1,hidden=64,heads=4,vocab=128,seq=16", by_layer=True)
    names = [r.name for r in regions]
    assert len(set(names)) == len(names) == 8  # 2 embeddings, 3 attentions, 2 mlps, head
    decoder = [r for r in regions if r.block == "decoder.layers.0" and r.kind == "attention"]
    assert [r.name for r in decoder] == ["decoder.layers.0:attention:0",
                                         "decoder.layers.0:attention:1"]
    assert [r.column[0] for r in decoder] == ["decoder_layers_0_self_attn_q",
                                              "decoder_layers_0_cross_attn_q"]
    assert all(r.index == 0 for r in regions if r not in decoder[1:])


class _TwoMLPs(nn.Module):
    """Two MLPs in one block: the first (hidden 6) shards 2 ways only, the second 2 and 4."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(8, 6), nn.Linear(6, 8)
        self.b1, self.b2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        x = x + self.a2(F.relu(self.a1(x)))
        return x + self.b2(F.relu(self.b1(x)))


def test_region_names_do_not_depend_on_the_degrees_proven():
    gm = torch.fx.symbolic_trace(_TwoMLPs())
    x = torch.ones(2, 8)
    block = {n.name: "layer" for n in gm.graph.nodes}
    both, _ = find_tp_regions(gm, block, degrees=(2, 4), example_inputs=[x])
    assert [(r.name, r.degrees) for r in both] == [("layer:mlp:0", (2,)), ("layer:mlp:1", (2, 4))]
    # codegen proves only the plan's degree: the region unproven there keeps its number
    four, unproven = find_tp_regions(gm, block, degrees=(4,), example_inputs=[x])
    assert [r.name for r in four] == ["layer:mlp:1"] and four[0].nodes == both[1].nodes
    assert [(u.nodes, u.degree) for u in unproven if u.kind == "mlp"] == [(both[0].nodes, 4)]


# -------------------------------------------------------------- transformers
HF = {
    "gpt2": "hf:GPT2LMHeadModel:n_layer=2,n_embd=64,n_head=4,vocab_size=128,n_positions=32",
    "llama": "hf:LlamaForCausalLM:num_hidden_layers=2,hidden_size=64,num_attention_heads=8,"
             "num_key_value_heads=4,intermediate_size=128,vocab_size=128",
    "bert": "hf:BertForMaskedLM:num_hidden_layers=2,hidden_size=64,num_attention_heads=4,"
            "intermediate_size=128,vocab_size=128",
}


@pytest.mark.parametrize("name", sorted(HF))
def test_transformers_models(name):
    pytest.importorskip("transformers")
    gm, regions, unproven = _find(HF[name])
    assert gm.meta["tripar_tracer"] == "export"
    left = ("layer_norm",) if name == "bert" else ()
    _check_complete(gm, regions, unproven, layers=2, allowed_left=left)
    attn = [r for r in regions if r.kind == "attention"]
    if name == "gpt2":  # Conv1D: addmm with a [in, out] weight, sharded on dim 1, fused qkv
        assert all(r.shards[0][1] == 1 and len(dict(r.parts)) == 2 for r in attn)
    if name == "llama":
        assert all((r.heads, r.kv_heads) == (8, 4) for r in attn)
        # repeat_kv's expand and reshape carry kv-head and head counts: rewritten
        assert all(len(r.rewrites) == 4 for r in attn)
    assert any(r.kind == "embedding" for r in regions)


# ------------------------------------------------------------ hand-made models
class _LNBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 16)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.ln(self.fc1(x))))


def test_layernorm_between_linears_is_unproven():
    gm = torch.fx.symbolic_trace(_LNBetween())
    regions, unproven = find_tp_regions(gm, {}, degrees=(2, 4), example_inputs=[torch.ones(2, 8, 16)])
    assert not regions
    u = next(u for u in unproven if u.nodes[0] == "fc1")
    assert u.nodes == ("fc1",) and u.degree == 0 and u.block == ""
    assert "ln" in u.reason and "normalizes over the sharded dim" in u.reason


class _Attn(nn.Module):
    """nanoGPT-style attention: the head count is a constant in the view."""

    def __init__(self, c: int = 32, h: int = 4) -> None:
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x):
        b, t, c = x.size()
        q = self.q(x).view(b, t, self.h, c // self.h).transpose(1, 2)
        k = self.k(x).view(b, t, self.h, c // self.h).transpose(1, 2)
        v = self.v(x).view(b, t, self.h, c // self.h).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / (c // self.h) ** 0.5)
        y = att.softmax(dim=-1) @ v
        return self.o(y.transpose(1, 2).contiguous().view(b, t, c))


def test_proof_fails_without_the_shape_rewrites():
    gm = torch.fx.symbolic_trace(_Attn())
    x = torch.randn(2, 8, 32)
    regions, _ = find_tp_regions(gm, {}, degrees=(2,), example_inputs=[x])
    (r,) = regions
    assert r.kind == "attention" and r.heads == 4 and r.degrees == (2,)
    # the constant 4 (heads) in three views, and c in the final view, must shrink
    assert len(r.rewrites) == 4
    vals = meta_values(gm, [x])
    params = {n: torch.empty_like(p, device="meta") for n, p in gm.named_parameters()}
    assert prove(gm, r, 2, vals, params) is None
    broken = dataclasses.replace(r, rewrites=r.rewrites[1:])
    reason = prove(gm, broken, 2, vals, params)
    assert reason is not None and "t=2" in reason and "shape" in reason
    # a partial output that is not of the unsharded shape is caught too
    wrong = dataclasses.replace(r, rewrites=())
    assert prove(gm, wrong, 2, vals, params) is not None


# ---------------------------------------------------------------- numerics
def _values(gm: torch.fx.GraphModule, *inputs) -> dict:
    env = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            env[n.name] = super().run_node(n)
            return env[n.name]

    Rec(gm).run(*inputs)
    return env


def _emulate(gm, region, env, t=2):
    params = dict(gm.named_parameters())
    sums = None
    for rank in range(t):
        prog = region_program(gm, region, t=t, rank=rank)
        outs = prog.module(*prog.make_inputs(env, params))
        sums = list(outs) if sums is None else [a + b for a, b in zip(sums, outs)]
    return dict(zip(prog.outputs, sums))


@pytest.mark.parametrize("spec", [
    "gpt:layers=1,hidden=32,heads=4,vocab=64,seq=8",  # fused QKV split per part, tied embedding
    "llama:layers=1,hidden=32,heads=4,kv_heads=2,vocab=64,seq=8",  # GQA, RoPE, SwiGLU
])
def test_numerics_emulated_t2_matches_unsharded(spec):
    """Slice real weights per shards/parts/rewrites, run each rank, sum = all-reduce."""
    torch.manual_seed(0)
    lm = load_model(spec, batch_size=2, device="cpu")
    lm.model.eval()
    gm = capture(lm.model, lm.example_inputs, lm.example_kwargs)
    regions, _ = find_tp_regions(gm, {}, degrees=(2,), example_inputs=list(lm.example_inputs))
    env = _values(gm, *lm.example_inputs)
    checked = set()
    for r in regions:
        if r.kind == "lm_head":
            continue
        for name, value in _emulate(gm, r, env).items():
            torch.testing.assert_close(value, env[name])
            checked.add(r.kind)
    assert checked == {"attention", "mlp", "embedding"}


def test_numerics_hf_gpt2_conv1d_fused_qkv():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    lm = load_model(HF["gpt2"].replace("n_layer=2", "n_layer=1"), batch_size=2, device="cpu")
    lm.model.eval()
    gm = capture(lm.model, lm.example_inputs, lm.example_kwargs)
    regions, _ = find_tp_regions(gm, {}, degrees=(2,))
    inputs = list(lm.example_inputs) + list((lm.example_kwargs or {}).values())
    env = _values(gm, *inputs)
    kinds = set()
    for r in regions:
        if r.kind in ("attention", "mlp"):
            for name, value in _emulate(gm, r, env).items():
                torch.testing.assert_close(value, env[name])
                kinds.add(r.kind)
    assert kinds == {"attention", "mlp"}


def test_take_shard_and_vocab_parallel_embedding():
    w = torch.randn(8, 3)
    ids = torch.tensor([[0, 7, 3, 4]])
    total = sum(vocab_parallel_embedding(ids, take_shard(w, 0, (), 2, r), 4 * r) for r in range(2))
    torch.testing.assert_close(total, F.embedding(ids, w))
    qkv = torch.arange(12)
    assert take_shard(qkv, 0, (4, 4, 4), 2, 1).tolist() == [2, 3, 6, 7, 10, 11]
