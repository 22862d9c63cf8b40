"""The DeepSpeed config, built from the train settings in one place.

The optimizer and LR scheduler are client objects (``stages/train/engine.py``) so that weight
decay can skip norms and biases and the schedules match TRL's; DeepSpeed owns gradient
accumulation, clipping, mixed precision and ZeRO partitioning.
"""

from __future__ import annotations

from pipeline.config import TrainConfig


def build_ds_config(train_cfg: TrainConfig, dtype: str, world_size: int) -> dict:
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
