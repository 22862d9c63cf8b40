"""cluster/zero3_linear.py: torch's forward bits, DeepSpeed's ZeRO-3 backward."""

import torch
from deepspeed.runtime.zero.linear import zero3_linear_wrap

from cluster.zero3_linear import TORCH_LINEAR, exact_zero3_linear


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 64, generator=g).to(dtype)
    w = torch.randn(48, 64, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    return x, w, b


def test_forward_is_torch_linear_bit_for_bit_in_bf16():
    x, w, b = _inputs(torch.bfloat16)
    expected = TORCH_LINEAR(x, w, b)
    assert torch.equal(exact_zero3_linear(x, w, b), expected)
    assert torch.equal(exact_zero3_linear(x, w), TORCH_LINEAR(x, w))
    # DeepSpeed's own replacement rounds twice (matmul, then += bias): not the same bits
    assert not torch.equal(zero3_linear_wrap(x, w, b), expected)


def test_gradients_match_torch_linear():
    x, w, b = _inputs(torch.float64)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    grad = torch.randn(2, 37, 48, dtype=torch.float64)
    exact_zero3_linear(*ours).backward(grad)
    TORCH_LINEAR(*ref).backward(grad)
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-12, atol=1e-12)
