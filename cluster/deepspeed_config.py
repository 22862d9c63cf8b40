"""The DeepSpeed config, built from the train settings in one place, and the user's own
DeepSpeed JSON (``train.deepspeed``) merged over it.

The optimizer and LR scheduler are client objects (``pipeline/training/engine.py``) so that weight
decay can skip norms and biases and the schedules match TRL's; DeepSpeed owns gradient
accumulation, clipping, mixed precision and ZeRO partitioning.

A user's JSON is deep-merged over the built config, as the HF Trainer takes one: it can set
anything the pipeline leaves to DeepSpeed (offload, bucket sizes, communication ...). The
keys the pipeline sets from its own settings (``OWNED``) may be repeated or written
``"auto"`` but not changed, and the sections it builds itself (``BUILT_SECTIONS``) may not
appear: either would train with other settings than the config and the fingerprint say.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.config import ConfigError, TrainingSettings

OWNED = {
    "train_micro_batch_size_per_gpu": "the pipeline (one packed row is one micro-batch)",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "train_batch_size": "train.gradient_accumulation_steps x train.num_workers",
    "gradient_clipping": "train.max_grad_norm",
    "bf16.enabled": "model.dtype",
    "fp16.enabled": "model.dtype (float16 is refused)",
    "zero_optimization.stage": "train.zero_stage",
}
BUILT_SECTIONS = {
    "optimizer": "train.optimizer, learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay",
    "scheduler": "train.lr_scheduler_type, warmup_ratio, warmup_steps, min_lr_ratio",
    "amp": "model.dtype",
}
OFFLOADS = ("offload_optimizer", "offload_param")


# Parameters one optimizer call updates under ZeRO-3. DeepSpeed steps each rank's partition
# in sub-groups of this many parameters, and each call holds the sub-group's gradients
# flattened into a new buffer and the optimizer's temporaries (torch's AdamW: two tensors
# the size of its input): DeepSpeed's default, 1e9, is a transient 12 bytes a parameter of
# the whole partition of any model under a billion parameters a rank. A sub-group closes once it
# reaches this size and holds whole per-rank partitions, so the transient is at most 12 bytes x
# (5e7 + the largest parameter's partition on a rank): 0.6 GB plus, for Llama-3.1-8B's 525M-element
# embedding, 6.3 GB on one rank or 0.2 GB on 32 (docs/design.md, "ZeRO-3 memory").
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


def build_ds_config(train_cfg: TrainingSettings, dtype: str, world_size: int, hidden_size: int | None = None) -> dict:
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
    if train_cfg.deepspeed:
        ds = merge_user_config(ds, train_cfg.deepspeed)
        check_offload(ds, train_cfg)
        check_refused(ds)
    return ds


def merge_user_config(built: dict, user: dict) -> dict:
    """``user`` deep-merged over ``built``; "auto" keeps the built value (or DeepSpeed's
    default where the pipeline sets none). A conflict is a ConfigError naming the key."""
    for section, settings in BUILT_SECTIONS.items():
        if section in user:
            raise ConfigError(f"train.deepspeed: {section}: the pipeline builds it from {settings}; "
                              f"remove it from the DeepSpeed JSON")
    return _merge(built, user, "")


def _merge(base: dict, over: dict, prefix: str) -> dict:
    out = dict(base)
    for key, value in over.items():
        path = prefix + key
        if value == "auto":
            continue  # the built value, or DeepSpeed's default
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value, path + ".")
            continue
        if isinstance(base.get(key), dict):
            raise ConfigError(f"train.deepspeed: {path} is {value!r}, and DeepSpeed expects a section (a mapping) "
                              f"there: write its keys, e.g. {{\"{path.rsplit('.', 1)[-1]}\": {{\"enabled\": ...}}}}")
        if path in OWNED and base.get(key) != value:
            raise ConfigError(f"train.deepspeed: {path} is {value!r}, and the pipeline sets {base.get(key)!r} from "
                              f"{OWNED[path]}: change that setting instead (or leave the key out, or write \"auto\")")
        out[key] = _resolve_auto(value)
    return out


def _resolve_auto(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _resolve_auto(v) for k, v in value.items() if v != "auto"}
    return value


def offload_device(ds: dict, which: str) -> str | None:
    """"cpu", "nvme" or None: where ``zero_optimization.<which>`` puts its tensors."""
    device = (ds.get("zero_optimization", {}).get(which) or {}).get("device", "none")
    return None if device in (None, "none") else device


def check_offload(ds: dict, train_cfg: TrainingSettings) -> None:
    """What ZeRO-Offload needs that the pipeline would otherwise fail on deep in DeepSpeed."""
    if offload_device(ds, "offload_optimizer") and train_cfg.zero_stage == 0:
        raise ConfigError("train.deepspeed: zero_optimization.offload_optimizer needs train.zero_stage 1, 2 or 3 "
                          "(it is 0: no ZeRO optimizer to offload)")
    if offload_device(ds, "offload_param") and train_cfg.zero_stage != 3:
        raise ConfigError(f"train.deepspeed: zero_optimization.offload_param needs train.zero_stage 3 "
                          f"(it is {train_cfg.zero_stage})")
    if offload_device(ds, "offload_optimizer") and train_cfg.optimizer != "adamw":
        raise ConfigError(f"train.deepspeed: zero_optimization.offload_optimizer steps the optimizer on the CPU with "
                          f"DeepSpeedCPUAdam, and train.optimizer is {train_cfg.optimizer!r}: use adamw, or no offload")


def check_refused(ds: dict) -> None:
    """Settings the ranks would refuse only once the model has loaded, or that would change
    the log-prob pass: every checkpoint is read through DeepSpeed's torch engine with
    ``weights_only=True`` (``pipeline/training/safe_load.py``), a universal checkpoint is
    converted and loaded by the pipeline when the worker count changes
    (``pipeline/training/universal.py``), and ``engine(row)`` runs the pass under
    ``torch_autocast`` when it is on."""
    if (ds.get("torch_autocast") or {}).get("enabled"):
        raise ConfigError("train.deepspeed: torch_autocast.enabled would run the policy's log-prob pass under autocast, "
                          "and the reference columns were scored in model.dtype without it (step 0 would no longer be "
                          "policy == reference): set model.dtype instead, and remove the key")
    checkpoint = ds.get("checkpoint") or {}
    if checkpoint.get("load_universal"):
        raise ConfigError("train.deepspeed: checkpoint.load_universal: the pipeline converts a checkpoint to DeepSpeed's "
                          "universal format and loads it itself when a run resumes on another worker count; remove "
                          "the key")
    if checkpoint.get("writer") is not None:
        raise ConfigError("train.deepspeed: checkpoint.writer selects DeepSpeed's fast or decoupled checkpoint engine; "
                          "checkpoints are written and read by its torch engine (read with weights_only=True): remove "
                          "the key")
    if ds.get("datastates_ckpt", False) is not False:
        raise ConfigError("train.deepspeed: datastates_ckpt selects DataStates' checkpoint engine; checkpoints are "
                          "written and read by DeepSpeed's torch engine (read with weights_only=True): remove the key")


def check_with_deepspeed(ds: dict) -> None:
    """DeepSpeed's own validation of the merged config (removed sections such as ``nebula``,
    unknown ``zero_optimization`` keys, invalid values), on the driver, where a refusal
    costs nothing; the ranks would meet it only after the model has loaded. The batch size
    is left to DeepSpeed to derive: the driver has no process group of the run's size."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig({k: v for k, v in ds.items() if k != "train_batch_size"})
    except Exception as e:  # DeepSpeedConfigError, pydantic's ValidationError, assertions
        detail = " ".join(str(e).split())
        raise ConfigError(f"train.deepspeed: DeepSpeed refuses the merged config: {detail[:400]}") from None


def check_nvme(ds: dict) -> None:
    """NVMe offload needs DeepSpeed's async_io op (libaio): refused with the reason on a
    node that cannot build it, before anything is loaded."""
    import socket

    wanted = [w for w in OFFLOADS if offload_device(ds, w) == "nvme"]
    if not wanted:
        return
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise ConfigError(f"train.deepspeed: zero_optimization.{wanted[0]}.device nvme needs DeepSpeed's async_io op, "
                          f"which cannot be built on {socket.gethostname()}: libaio (its headers and .so, Debian's "
                          f"libaio-dev) is not installed. Install it on every node, or offload to cpu")
