"""Activation offloading (pipeline.training.offload): which saved tensors move, and that the
training forward and backward are unchanged under it. The copies themselves need an
accelerator: tests/test_gpu.py runs them (exact gradients, lower peak memory)."""

import torch

from pipeline.training.offload import MIN_BYTES, moves, offload_activations


def test_what_moves_off_the_accelerator():
    big = torch.empty(MIN_BYTES // 4, dtype=torch.float32, device="meta")  # exactly MIN_BYTES
    assert moves(big)
    assert not moves(torch.empty(MIN_BYTES // 4 - 1, device="meta"))  # under the threshold
    assert moves(torch.empty(8, device="meta"), min_bytes=0)
    assert not moves(torch.nn.Parameter(torch.empty(MIN_BYTES, device="meta")))  # weights stay
    assert not moves(torch.empty(MIN_BYTES))  # already on the host


def test_saved_tensors_pass_through_the_hooks_with_the_same_gradients():
    """Every tensor autograd saves goes through the context's hooks; on the host they are
    returned as they are, so the gradients are bit for bit those without the context."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    x = torch.randn(32, 64)

    def grads(enabled):
        layer.zero_grad()
        with offload_activations(enabled, min_bytes=0):
            loss = layer(x).square().sum()
        loss.backward()
        return [p.grad.clone() for p in layer.parameters()]

    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        with offload_activations(True, min_bytes=0):
            layer(x).sum()
    assert seen == []  # the inner (offload) hooks took every saved tensor, not the outer ones
    off, on = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(off, on))
