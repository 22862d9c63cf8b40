"""ZeRO-3 keeps one copy of fp32 weights, not two, when the model trains in fp32.

DeepSpeed's ZeRO-3 optimizer keeps "master" weights for the optimizer to update, a partition
of the model's weights in ``master_weights_and_grads_dtype`` (fp32). When the model's own
partition already is fp32 on the same device, DeepSpeed 0.19 means to use it as the master
copy (``stage3.py: _create_fp32_partitions``), but the test compares the tensor's
``torch.device`` with the accelerator's device *name*, a string, which is never equal
(``torch.device("cpu") == "cpu"`` is False). So every fp32 run holds a second fp32 copy of
its partition: 4 bytes a parameter over the 16 of weights, gradients and Adam's moments.

This runs that method with the device as a ``torch.device``, so the test means what it
says; the optimizer then updates the model's partition in place, and DeepSpeed's copy of
the master weights back into it copies a tensor onto itself. The arithmetic is unchanged
(the two copies were equal at every step). bf16 and fp16 models, and optimizer offload,
take the other branches, as before.
"""

from __future__ import annotations

import torch
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

_ORIGINAL = DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions


def _create_fp32_partitions(self) -> None:
    name = self.device
    if not self.offload_optimizer:
        self.device = torch.device(name)
    try:
        _ORIGINAL(self)
    finally:
        self.device = name


def install() -> None:
    DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = _create_fp32_partitions
