"""ZeRO-3's memory-saving linear, with torch's own forward arithmetic.

Under ZeRO-3 DeepSpeed swaps ``torch.nn.functional.linear`` for its own autograd function
(``memory_efficient_linear``, on by default), whose backward saves the weight parameter
itself and gathers it again if it was released (DeepSpeed's reason for it is memory; we keep
that backward as it is, unmeasured here). But its forward computes ``matmul``, then
``+= bias``: two roundings in bf16 where torch's fused ``addmm`` has one, so a policy with
biased linears (Qwen's q/k/v) stops reproducing the score stage's reference log-probs at
step 0 (up to 2e-3 per token on a tiny Qwen2).

This keeps DeepSpeed's backward and memory behaviour and takes the forward from torch
itself, so train and score compute every linear with the same kernels. The train stage
installs it for ZeRO-3 runs, with DeepSpeed's own replacement turned off in the config.
"""

from __future__ import annotations

import torch
from deepspeed.runtime.zero.linear import LinearFunctionForZeroStage3

TORCH_LINEAR = torch._C._nn.linear  # what F.linear is, whatever has patched F.linear since


class ExactLinearForZeroStage3(LinearFunctionForZeroStage3):
    @staticmethod
    def forward(input, weight, bias=None):
        return TORCH_LINEAR(input, weight, bias)


def exact_zero3_linear(input, weight, bias=None):
    return ExactLinearForZeroStage3.apply(input, weight, bias)


def install() -> None:
    """``F.linear`` becomes the function above in this process (as DeepSpeed's own patch is)."""
    torch.nn.functional.linear = exact_zero3_linear
