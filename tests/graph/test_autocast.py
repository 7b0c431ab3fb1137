import torch
from torch import nn

from tripar.graph.annotate import annotate
from tripar.graph.autocast import CudaAutocast


def test_cuda_policy_on_cpu_tensors():
    x = torch.ones(2, 4, requires_grad=True)
    with CudaAutocast(torch.bfloat16):
        h = nn.functional.linear(x, torch.ones(4, 4))
        n = nn.functional.layer_norm(h, (4,))
        loss = nn.functional.cross_entropy(h, torch.zeros(2, dtype=torch.long))
        r = x + h  # fp32 + bf16 promotes: the residual stream stays fp32
    assert (h.dtype, n.dtype, loss.dtype, r.dtype) == (
        torch.bfloat16, torch.float32, torch.float32, torch.float32)


def test_saved_bytes_amp_counts_bf16_matmul_inputs_and_fp32_norms():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    gm = torch.fx.symbolic_trace(model)
    annotate(gm, (torch.empty(32, 8),))
    info = {n.target: n.meta["tripar"] for n in gm.graph.nodes if n.op == "call_module"}
    # the first linear saves its input for the weight gradient: fp32, or its bf16 cast
    assert (info["0"].saved_bytes, info["0"].saved_bytes_amp) == (32 * 8 * 4, 32 * 8 * 2)
    # layer_norm runs in fp32 on CUDA: the fp32 upcast of its bf16 input and fp32 mean/rstd,
    # as much as in fp32 training
    assert info["1"].saved_bytes_amp == info["1"].saved_bytes == 32 * 16 * 4 + 2 * 32 * 4
    # the second linear: the bf16 cast of its fp32 input, and the bf16 copy of its weight
    # (the input's gradient needs it; an fp32 parameter itself is not an activation)
    assert (info["2"].saved_bytes, info["2"].saved_bytes_amp) == (
        32 * 16 * 4, 32 * 16 * 2 + 4 * 16 * 2)
