"""The DeepSpeed config, built from the train settings in one place.

The optimizer and LR scheduler are client objects (``stages/train/engine.py``) so that weight
decay can skip norms and biases and the schedules match TRL's; DeepSpeed owns gradient
accumulation, clipping, mixed precision and ZeRO partitioning.
"""

from __future__ import annotations

from pipeline.config import TrainConfig


# Parameters one optimizer call updates under ZeRO-3. DeepSpeed steps each rank's partition
# in sub-groups of this many parameters, and each call holds the sub-group's gradients
# flattened into a new buffer and the optimizer's temporaries (torch's AdamW: two tensors
# the size of its input): DeepSpeed's default, 1e9, is a transient 12 bytes a parameter of
# the whole partition of any model under a billion parameters a rank. 5e7 caps it at 600 MB.
SUB_GROUP_SIZE = 50_000_000


def zero3_sizes(hidden_size: int | None) -> dict:
    """ZeRO-3's buffer sizes. The gradient reduce bucket follows the model's width as the
    HF Trainer's ``auto`` value does (hidden²), with a floor of 2^20 elements under which a
    collective costs its latency: DeepSpeed's default, 5e8 elements, is a 2 GB fp32
    buffer, which a model under 500M parameters fills with its whole gradient before
    reducing it. The prefetch bucket keeps DeepSpeed's 5e7 (HF's 0.9·hidden² would
    prefetch about one matrix ahead, less overlap for little memory)."""
    sizes = {"sub_group_size": SUB_GROUP_SIZE}
    if hidden_size:
        sizes["reduce_bucket_size"] = max(hidden_size * hidden_size, 1 << 20)
    return sizes


def build_ds_config(train_cfg: TrainConfig, dtype: str, world_size: int, hidden_size: int | None = None) -> dict:
    ds: dict = {
        "train_micro_batch_size_per_gpu": 1,  # one packed row per micro-batch
        "gradient_accumulation_steps": train_cfg.gradient_accumulation_steps,
        "train_batch_size": train_cfg.gradient_accumulation_steps * world_size,
        "gradient_clipping": train_cfg.max_grad_norm,
        "zero_optimization": {
            "stage": train_cfg.zero_stage,
            # On GPUs the gradient reduce-scatter runs on its own stream beside the
            # backward (DeepSpeed's and HF's recommended ZeRO-3 setting); gloo on CPU has
            # no streams to overlap on.
            "overlap_comm": bool(train_cfg.use_gpu),
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": True,
            # DeepSpeed's F.linear replacement rounds twice in bf16 (matmul, += bias); the
            # train stage installs cluster/zero3_linear.py instead: the same memory saving,
            # torch's forward arithmetic, so step 0 reproduces the scored reference.
            "memory_efficient_linear": False,
            **(zero3_sizes(hidden_size) if train_cfg.zero_stage == 3 else {}),
        },
        # ZeRO wraps any torch optimizer; DeepSpeed only whitelists Adam-family ones, so
        # RMSprop (the DPO paper's) needs this flag.
        "zero_allow_untested_optimizer": train_cfg.optimizer != "adamw",
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # the pipeline logs its own metrics
        "wall_clock_breakdown": False,
    }
    return ds
