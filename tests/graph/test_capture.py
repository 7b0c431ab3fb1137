"""tripar.graph.capture: FX first, export as fallback, one clear error when both fail."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tripar.errors import CaptureError, PlanError
from tripar.graph.blocks import node_module
from tripar.graph.capture import capture, flat_graph_inputs


class ShapeBranch(nn.Module):
    """Python control flow on a shape: FX cannot trace it, export can."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            return self.proj(x).relu()
        return self.proj(x)


class DataBranch(nn.Module):
    """Control flow on tensor data: neither tracer can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if y.sum() > 0:
            return y * 2
        return y


class Outer(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.pre(x))


def test_fx_keeps_leaf_modules_by_type_and_fqn() -> None:
    model = Outer(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    x = torch.randn(2, 4)
    plain = capture(model, (x,), method="fx")
    assert [n.target for n in plain.graph.nodes if n.op == "call_module"] == [
        "pre", "inner.0", "inner.1"]
    by_fqn = capture(model, (x,), leaf_modules=["inner"], method="fx")
    assert [n.target for n in by_fqn.graph.nodes if n.op == "call_module"] == ["pre", "inner"]
    by_type = capture(model, (x,), leaf_modules=[nn.Sequential], method="fx")
    assert [n.target for n in by_type.graph.nodes if n.op == "call_module"] == ["pre", "inner"]
    torch.testing.assert_close(by_type(x), model(x))


def test_nodes_know_their_module() -> None:
    model = Outer(ShapeBranch())
    gm = capture(model, (torch.randn(3, 4),), method="export")
    modules = {node_module(n) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"pre", "inner.proj"} <= modules


def test_auto_falls_back_to_export_and_says_why() -> None:
    model = Outer(ShapeBranch())
    x = torch.randn(3, 4)
    gm = capture(model, (x,))
    assert gm.meta["tripar_tracer"] == "export"
    reason = gm.meta["tripar_tracer_reason"]
    assert reason.startswith("fx: failed in module 'inner' (ShapeBranch)")
    assert reason.endswith("fell back to export")
    torch.testing.assert_close(gm(x), model(x))


def test_fx_when_it_works() -> None:
    gm = capture(nn.Sequential(nn.Linear(4, 2)), (torch.randn(1, 4),))
    assert gm.meta["tripar_tracer"] == "fx"
    assert gm.meta["tripar_tracer_reason"] == "fx: traced"


def test_both_tracers_failing_is_one_capture_error() -> None:
    model = Outer(DataBranch())
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(2, 4),))
    message = str(info.value)
    assert "could not capture Outer with fx and export" in message
    assert "fx: failed in module 'inner' (DataBranch) at test_capture.py:" in message
    assert "export: failed in module 'inner' (DataBranch) at test_capture.py:" in message
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert len(message.splitlines()) == 4


def test_meta_model_is_captured_without_weights() -> None:
    with torch.device("meta"):
        model = Outer(ShapeBranch())
    x = torch.empty(3, 4, device="meta")
    for method in ("fx", "export"):
        if method == "fx":
            with pytest.raises(CaptureError, match="fx: failed in module 'inner'"):
                capture(model, (x,), method=method)
            continue
        gm = capture(model, (x,), method=method)
        assert all(p.device.type == "meta" for p in gm.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())


def test_bad_arguments() -> None:
    with pytest.raises(CaptureError, match="method must be one of"):
        capture(nn.Linear(2, 2), (torch.randn(1, 2),), method="jit")
    with pytest.raises(CaptureError, match="leaf_modules entries"):
        capture(nn.Linear(2, 2), (torch.randn(1, 2),), leaf_modules=[3])


def test_flat_graph_inputs_take_defaults_and_raise_the_callers_error() -> None:
    class Masked(nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                    scale: float = 2.0) -> torch.Tensor:
            return x * scale if mask is None else x * mask * scale

    gm = capture(Masked(), (torch.ones(2),), method="fx")
    x = torch.ones(2)
    assert flat_graph_inputs(gm, (x,))[1:] == [None, 2.0]  # FX specialises the defaults
    with pytest.raises(PlanError, match="the inputs do not match the captured forward"):
        flat_graph_inputs(gm, (x,), {"bias": 1})
    with pytest.raises(CaptureError, match="the inputs do not match the captured forward"):
        flat_graph_inputs(gm, (), {}, error=CaptureError)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_functional_dropout_follows_the_modules_mode_after_capture(method):
    """transformers' attention calls ``F.dropout(..., training=self.training)``: traced in
    training mode, the graph must still drop nothing in ``eval()`` and drop in ``train()``."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            return torch.nn.functional.dropout(self.proj(x), p=0.5, training=self.training)

    model = Attention()
    x = torch.randn(4, 16)
    gm = capture(model, (x,), method=method)
    assert gm.meta["tripar_tracer"] == method
    # the flag itself: an exported module refuses eval() (the stages split from it do not)
    gm.training = False
    torch.testing.assert_close(gm(x), model.eval()(x), rtol=0, atol=0)
    gm.training = True
    dropped = gm(x)
    assert (dropped == 0).sum() > 8  # about half of 64
