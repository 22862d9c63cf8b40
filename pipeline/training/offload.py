"""Activation offloading (TRL's ``activation_offloading``): during the training forward,
the tensors autograd saves for backward are copied to pinned host memory and copied back
when backward needs them, so the accelerator holds only the activations in flight.

What moves: tensors on an accelerator of at least ``min_bytes``. What stays: host tensors,
small ones (the copy would cost more than it frees; buffers such as rotary tables are
among them), and parameters. Under
ZeRO-3 a saved parameter is the gathered weight: copying it out would move the whole model
over PCIe every step, and DeepSpeed gathers it again for backward anyway.

The copies are exact, so losses and gradients are bit for bit those without offloading.
Each copy to the host completes before the forward goes on (as ``torch.autograd.graph.
save_on_cpu`` does); the copy back is asynchronous from pinned memory. Composes with
gradient checkpointing (then only the checkpoints' inputs are saved, and those move).
"""

from __future__ import annotations

import contextlib

import torch

MIN_BYTES = 1 << 20


def moves(tensor: torch.Tensor, min_bytes: int = MIN_BYTES) -> bool:
    """Whether a saved tensor is offloaded: off the host, not a parameter, not small."""
    return (tensor.device.type != "cpu" and not isinstance(tensor, torch.nn.Parameter)
            and tensor.numel() * tensor.element_size() >= min_bytes)


def offload_activations(enabled: bool = True, min_bytes: int = MIN_BYTES):
    """A context for the forward pass whose saved tensors go to host memory."""
    if not enabled:
        return contextlib.nullcontext()

    def pack(tensor: torch.Tensor):
        if not moves(tensor, min_bytes):
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        host.copy_(tensor)
        return _Offloaded(tensor.device, host)

    def unpack(packed):
        if isinstance(packed, _Offloaded):
            return packed.host.to(packed.device, non_blocking=True)
        return packed

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class _Offloaded:
    """A saved tensor's host copy and the device it returns to."""

    __slots__ = ("device", "host")

    def __init__(self, device: torch.device, host: torch.Tensor):
        self.device, self.host = device, host
