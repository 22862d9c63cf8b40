"""The DeepSpeed engine a rank trains: process group, the policy sharded while it loads
(ZeRO-3), LoRA adapters, the optimizer (no decay on norms and biases) and the schedule."""

from __future__ import annotations

import contextlib
import math
import os

import torch

from pipeline.core.config import ModelConfig, TrainingSettings
from pipeline.core.logps_probe import probe_packed_logps
from pipeline.core.modeling import load_causal_lm

from .forward import install as install_forward
from .objective import Objective


def import_deepspeed():
    """DeepSpeed, imported without mlflow: its autotuner, which the pipeline never runs,
    imports mlflow at DeepSpeed's import where it is installed (the tracking extra), 0.9 s
    of a core in every rank's start-up. mlflow stays importable afterwards (``report_to:
    [mlflow]``), and one already imported is left as it is."""
    import sys

    hide = "deepspeed" not in sys.modules and "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # an ImportError for the autotuner, which then goes without
    try:
        import deepspeed
    finally:
        if hide:
            del sys.modules["mlflow"]
    return deepspeed


MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


@contextlib.contextmanager
def _without_muon():
    """A ZeRO-3 engine imports DeepSpeed's Muon optimizer while it is built, only to ask
    whether the optimizer is one (ZeRO's support check, ZeRO-3's set-up; never after), and
    with it Muon's compiled kernels: about 1 s of a core in every rank's start-up. The
    pipeline builds its optimizer itself and never a Muon one (``build_optimizer``): while
    the engine is built, the module's ``MuonWithAuxAdam`` is a class of its own, of which
    nothing is an instance, so every answer is the same. Importable afterwards; a module
    already imported is left as it is. (ZeRO-1/2 import it again at every gradient
    reduction: for them this would only move the import into the first step.)"""
    import sys
    import types

    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    hide = MUON not in sys.modules
    if hide:
        stand_in = types.ModuleType(MUON, "DeepSpeed's Muon optimizer, not imported (pipeline/training/engine.py)")
        stand_in.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
        sys.modules[MUON] = stand_in
    try:
        yield
    finally:
        if hide:
            del sys.modules[MUON]
            while stand_in.MuonWithAuxAdam in ZERO_SUPPORTED_OPTIMIZERS:  # the support check added it
                ZERO_SUPPORTED_OPTIMIZERS.remove(stand_in.MuonWithAuxAdam)


def init_distributed(backend: str) -> tuple[int, int]:
    """The process group, from torchrun's environment (RANK, WORLD_SIZE ...: the rank group's on Ray,
    cluster.rank_group), or one rank in this process."""
    deepspeed = import_deepspeed()

    # DeepSpeed's shared-memory comm op is a g++ JIT build (36 s, and it fails without a
    # compiler) that gloo and NCCL do not need.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    # One rank in this process (no Ray, no torchrun): any free port. A fixed one would clash
    # with the next run on the machine while this process holds it; and it is not left in
    # the environment, where the processes this one starts would inherit it.
    own_port = "MASTER_PORT" not in os.environ
    if own_port:
        os.environ["MASTER_PORT"] = str(free_port())
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=process_group_timeout())
    finally:
        if own_port:
            del os.environ["MASTER_PORT"]
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def process_group_timeout():
    """How long a collective waits for the slowest rank: 30 minutes (what Ray Train gave the
    pipeline's ranks; DeepSpeed's own default is 10), or ``DEEPSPEED_TIMEOUT`` minutes where
    the user sets it. A resume on another worker count has every node download and load its
    universal checkpoint before the ranks meet (docs/reliability.md): this bounds the spread."""
    from datetime import timedelta

    return timedelta(minutes=int(os.environ.get("DEEPSPEED_TIMEOUT", "30")))


def rank_device(use_gpu: bool) -> torch.device:
    """The device a rank trains on: ``cuda:LOCAL_RANK``, where DeepSpeed places the engine
    and ``zero.Init`` the partitions. On Ray the rank group made LOCAL_RANK the index of the
    GPU Ray assigned this rank among the node's CUDA_VISIBLE_DEVICES (``rank_group.rank_envs``:
    Ray's GPU ids are not handed out in rank order); in one process, torchrun's or 0."""
    if not use_gpu:
        return torch.device("cpu")
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lr_lambda(kind: str, warmup: int, total: int, min_ratio: float):
    """LR multiplier per optimizer step, as transformers' schedules (lr 0 at step 0 of a
    warmup); cosine decays to ``min_ratio`` (seed minimind's floor) instead of 0."""

    def fn(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 placeholders keep the real shape here
        is_1d = len(shape) < 2 or name.endswith(".bias") or "norm" in name.lower()
        (no_decay if is_1d else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, train_cfg: TrainingSettings, on_cpu: bool = False) -> torch.optim.Optimizer:
    """``on_cpu``: ZeRO-Offload keeps the optimizer state in host memory and steps it there,
    with DeepSpeed's vectorised CPU Adam (a C++ op, JIT-built on first use; ``make install``
    builds it ahead)."""
    groups = param_groups(model, train_cfg.weight_decay)
    if train_cfg.optimizer == "rmsprop":  # the DPO paper's optimizer
        return torch.optim.RMSprop(groups, lr=train_cfg.learning_rate, eps=train_cfg.adam_epsilon)
    if on_cpu:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=train_cfg.learning_rate, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                                eps=train_cfg.adam_epsilon, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=train_cfg.learning_rate, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                             eps=train_cfg.adam_epsilon)


def add_lora(model, lora):
    """LoRA adapters (peft) on the loaded policy; B starts at 0, so policy == base model
    (the reference) at step 0. Under ZeRO-3, DeepSpeed partitions the new parameters."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def hidden_size(model_cfg: ModelConfig) -> int | None:
    """The policy's width (its text model's, for a multimodal config), which sizes ZeRO-3's buffers."""
    from transformers import AutoConfig

    from pipeline.core.models import local_dir

    config = AutoConfig.from_pretrained(local_dir(model_cfg.path, model_cfg), trust_remote_code=model_cfg.trust_remote_code)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "hidden_size", None)


def build_engine(train_cfg: TrainingSettings, model_cfg: ModelConfig, world: int, total_steps: int,
                 objective: Objective, device: torch.device):
    """The policy, sharded while it loads (ZeRO-3), wrapped with optimizer and schedule;
    ``engine(row)`` runs ``objective`` on a packed row (``forward.py``)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from cluster.deepspeed_config import build_ds_config, check_nvme, offload_device

    ds_config = build_ds_config(train_cfg, model_cfg.dtype, world, hidden_size(model_cfg))
    check_nvme(ds_config)  # on this node, before the model is loaded
    if train_cfg.zero_stage == 3:
        from cluster import zero3_linear, zero3_master_weights

        zero3_linear.install()  # ZeRO-3's memory-saving linear with torch's forward bits
        zero3_master_weights.install()  # no second fp32 copy of an fp32 model's partition
    # zero.Init is on while this object lives, so from_pretrained partitions the weights.
    hf_ds = HfDeepSpeedConfig(ds_config) if train_cfg.zero_stage == 3 else None
    model = load_causal_lm(model_cfg.path, model_cfg)
    if hf_ds is not None and not hasattr(next(model.parameters()), "ds_id"):
        raise RuntimeError("ZeRO-3: the policy was not partitioned while loading "
                           "(HfDeepSpeedConfig was not active during from_pretrained)")
    if train_cfg.peft is not None:
        model = add_lora(model, train_cfg.peft)
    if train_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    warmup = train_cfg.warmup_steps or math.ceil(train_cfg.warmup_ratio * total_steps)
    schedule = lr_lambda(train_cfg.lr_scheduler_type, warmup, total_steps, train_cfg.min_lr_ratio)
    with _without_muon() if train_cfg.zero_stage == 3 else contextlib.nullcontext():
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(model, train_cfg, on_cpu=offload_device(ds_config, "offload_optimizer") is not None),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=ds_config,
        )
    from .safe_load import install

    install(engine)  # checkpoints are loaded with weights_only=True (pipeline/training/safe_load.py)
    if hf_ds is not None:
        # The load-time probe of the log-prob pass (pipeline.core.logps_probe.probe_packed_logps) needs a
        # forward, which a partitioned model runs only inside its engine; every rank runs it
        # (the forward gathers parameters collectively), and all refuse alike.
        probe_packed_logps(engine.module, model_cfg.path)
    install_forward(engine.module, objective, device)
    engine.train()
    return engine
