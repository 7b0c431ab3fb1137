"""B / W split of a stage's backward: exact gradients, and W does only weight-gradient work."""

from __future__ import annotations

import copy
import functools
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

from tripar.models.spec import load_model
from tripar.runtime.backward_split import backward_input, backward_weight

GPT = "gpt:layers=2,hidden=32,heads=4,vocab=64,seq=8"


def _flops(fn) -> tuple[int, object]:
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


# ---- stages of the zoo gpt ---------------------------------------------------------------------

class _Middle(nn.Module):
    """Transformer blocks: receives the hidden state, sends it on."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.blocks = gpt.blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class _Last(_Middle):
    """Blocks, final norm, LM head and the loss."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__(gpt)
        self.ln_f = gpt.ln_f
        self.head = nn.Linear(gpt.config.hidden, gpt.config.vocab, bias=False)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.ln_f(super().forward(x)))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@functools.cache
def _gpt():
    return load_model(GPT, batch_size=2)


def _run(stage: nn.Module, last: bool, how: str) -> dict:
    """One backward of ``stage`` done ``how`` (plain, split, or the former split that W
    re-traversed the graph); FLOPs of each part, input and parameter gradients."""
    loaded = _gpt()
    torch.manual_seed(3)
    x = torch.randn(2, 8, 32, requires_grad=True)
    params = list(stage.parameters())
    for p in params:
        p.grad = None
    out = stage(x, loaded.example_inputs[1]) if last else stage(x)
    grad = None if last else torch.randn_like(out)
    res = {}
    if how == "plain":
        res["B"], _ = _flops(lambda: out.backward(grad))
        res["W"], dx = 0, x.grad
    elif how == "split":
        res["B"], ((dx,), work) = _flops(lambda: backward_input([out], [grad], [x], params))
        res["groups"], res["repeated"] = len(work.groups), work.repeated
        del out
        res["W"], _ = _flops(lambda: backward_weight(work))
    else:
        res["B"], (dx,) = _flops(lambda: torch.autograd.grad([out], [x], [grad],
                                                             retain_graph=True))
        res["W"], _ = _flops(lambda: torch.autograd.backward([out], [grad], inputs=params))
    res["dx"], res["grads"] = dx, [p.grad.clone() for p in params]
    return res


@pytest.mark.parametrize("last", [False, True], ids=["middle-stage", "last-stage"])
def test_b_plus_w_is_one_backward_and_w_is_weight_work_only(last):
    stage = (_Last if last else _Middle)(copy.deepcopy(_gpt().model))
    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls, so FLOPs count it
        plain, split, before = (_run(stage, last, how) for how in ("plain", "split", "before"))
    full = plain["B"]
    assert full > 0
    assert_close(split["dx"], plain["dx"], rtol=1e-5, atol=1e-6)
    assert_close(before["dx"], plain["dx"], rtol=1e-5, atol=1e-6)
    for g, ref in zip(split["grads"], plain["grads"], strict=True):
        assert_close(g, ref, rtol=1e-5, atol=1e-6)
    # B + W is exactly one backward; B is the activation half (attention makes it a bit more)
    assert abs(split["B"] + split["W"] - full) <= 0.01 * full, (split, full)
    assert 0.45 <= split["B"] / full <= 0.6, split["B"] / full
    # W is the weight gradients only: 2 * tokens * (in * out) per linear layer
    tokens = 2 * 8
    hidden, ffn, vocab = 32, 4 * 32, 64
    per_layer = 2 * tokens * (hidden * 3 * hidden + hidden * hidden + 2 * hidden * ffn)
    assert split["W"] == 2 * per_layer + (2 * tokens * hidden * vocab if last else 0)
    assert split["repeated"] == 0 and split["groups"] > 0
    # what W did before re-ran B's work: B + W was half a backward more
    assert (before["B"] + before["W"]) / full >= 1.4
    for g, ref in zip(before["grads"], plain["grads"], strict=True):
        assert_close(g, ref, rtol=1e-5, atol=1e-6)


# ---- graphs with a twist ----------------------------------------------------------------------

def _check_against_plain(build, n_inputs: int = 1, seed: int = 0) -> object:
    """Build the module twice from one seed, run the same inputs; plain backward vs B then W.
    Returns the split's WeightGradients (after W)."""
    torch.manual_seed(seed)
    module = build()
    torch.manual_seed(seed)
    twin = build()  # not a deepcopy, which drops the parameters' hooks
    xs = [torch.randn(4, 6) for _ in range(n_inputs)]

    def run(m, how):
        inputs = [x.clone().requires_grad_(True) for x in xs]
        outs = m(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.ones_like(o) * (i + 1) for i, o in enumerate(outs)]
        if how == "plain":
            torch.autograd.backward(list(outs), grads)
            return [x.grad for x in inputs], None
        params = [p for p in m.parameters() if p.requires_grad]
        dxs, work = backward_input(list(outs), grads, inputs, params)
        assert all(p.grad is None for p in params), "B must not touch parameter gradients"
        del outs
        backward_weight(work)
        return list(dxs), work

    dx_plain, _ = run(module, "plain")
    dx_split, work = run(twin, "split")
    for a, b in zip(dx_split, dx_plain, strict=True):
        if b is None:
            assert a is None
        else:
            assert_close(a, b)
    for (name, p), q in zip(twin.named_parameters(), module.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert_close(p.grad, q.grad, msg=lambda m, n=name: f"{n}: {m}")
    return work


class _Twice(nn.Module):
    """One linear layer applied at two depths: its weight gradient has two sources on the
    activation path."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.other = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.lin(torch.tanh(self.other(self.lin(x))))


def test_a_layer_used_twice_is_exact_and_reported():
    work = _check_against_plain(_Twice)
    assert work.done and not work.pending


class _Embedding(nn.Module):
    """A first stage: integer input, nothing on the activation path."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin = nn.Embedding(10, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.lin(self.emb((x.abs() * 3).long().clamp(max=9)).sum(1))


def test_a_first_stage_does_everything_in_w():
    torch.manual_seed(0)
    m = _Embedding()
    ids = torch.randn(4, 6)
    outs = [m(ids)]
    params = list(m.parameters())
    b, ((dx,), work) = _flops(lambda: backward_input(outs, [torch.ones_like(outs[0])], [ids],
                                                     params))
    assert dx is None and b == 0 and work.pending and work.frontier_nodes == 0
    outs.clear()
    w, _ = _flops(lambda: backward_weight(work))
    assert w == 2 * (2 * 4 * 6 * 6)  # the linear layer's dW and its dx, which the
    # embedding's gradient needs: here the whole backward is weight work
    assert all(p.grad is not None for p in params)


class _Mixed(nn.Module):
    """Two inputs, three outputs: one from both inputs, one from the parameters alone, one
    from the second input alone, with a skip and a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.bias = nn.Parameter(torch.randn(6))
        self.frozen = nn.Parameter(torch.randn(6), requires_grad=False)

    def forward(self, x, y):
        h = self.a(x) * self.b(y) + self.frozen
        return h + x, self.bias.exp().expand(4, 6) * 2, y * 3


def test_several_inputs_and_outputs_and_a_weight_only_output():
    _check_against_plain(_Mixed, n_inputs=2)


class _Hooked(nn.Module):
    """Hooks on an intermediate gradient (at a node B and W both start from) and on a
    parameter: each must apply once."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.a.weight.register_hook(lambda g: g * 10)

    def forward(self, x):
        h = torch.relu(self.a(x))
        y = self.b(h)
        y.register_hook(lambda g: g * 3)
        return y


def test_gradient_hooks_apply_once():
    _check_against_plain(_Hooked)


def test_each_parameter_accumulates_once_in_w():
    torch.manual_seed(0)
    m = _Twice()
    counts: dict[str, int] = {}
    for name, p in m.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda _p, n=name: counts.__setitem__(n, counts.get(n, 0) + 1))
    x = torch.randn(4, 6, requires_grad=True)
    out = m(x)
    _, work = backward_input([out], [torch.ones_like(out)], [x], list(m.parameters()))
    assert counts == {}
    assert work.repeated == 1  # lin's two uses are linked by the activation path
    backward_weight(work)
    assert counts == {name: 1 for name, _ in m.named_parameters()}
    with pytest.raises(RuntimeError, match="twice"):
        backward_weight(work)


def test_groups_run_from_the_output_down_in_a_fixed_order():
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(6, 6) for _ in range(4)])
    orders = []
    for _ in range(2):
        x = torch.randn(4, 6, requires_grad=True)
        out = m(x)
        _, work = backward_input([out], [torch.ones_like(out)], [x], list(m.parameters()))
        names = {id(p): n for n, p in m.named_parameters()}
        orders.append([[names[id(p)] for p in g.params] for g in work.groups])
        backward_weight(work)
    assert orders[0] == orders[1]
    assert [sorted(g) for g in orders[0]] == [[f"{i}.bias", f"{i}.weight"] for i in (3, 2, 1, 0)]


def test_w_frees_the_graph():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))

    def forward():
        x = torch.randn(4, 6, requires_grad=True)
        h = m[1](m[0](x))  # saved by the second layer for its weight gradient
        return x, m[2](h), weakref.ref(h)

    x, out, saved = forward()
    _, work = backward_input([out], [torch.ones_like(out)], [x], list(m.parameters()))
    del out
    assert saved() is not None  # W still needs it
    backward_weight(work)
    assert saved() is None and not work.groups and not work.captured
