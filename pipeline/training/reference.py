"""A reference model held by the ranks, partitioned like the policy: TR-DPO's reference,
which the ranks refresh themselves (docs/design.md, "TR-DPO offline: the design chosen").

``build_reference`` loads it under ZeRO-3 without an optimizer (as TRL prepares its
reference), so each rank holds 2N/R bytes of it in bf16; ``mix_policy_into`` makes it
α·π_θ + (1 − α)·π_ref, each rank on its own partition with the policy's fp32 weights,
nothing gathered or moved; ``score_row`` runs a packed row through its engine's front door
and returns what the score stage stores for the row (per-token log-probs aligned with
``input_ids``, and per-segment sums).

The pieces of the refresh; ``refresh.py`` is the step hook that uses them.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.core.config import ModelConfig, TrainingSettings
from pipeline.core.logps import packed_token_logps
from pipeline.core.modeling import load_causal_lm, row_inputs
from pipeline.core.segments import segment_sums


class ScoreForward:
    """The reference's forward: one packed row's reference log-probs, per token and per
    segment, as the score stage computes them (``stages/score/``)."""

    def __init__(self, model: torch.nn.Module, chunk: int, device: torch.device):
        self.model, self.chunk, self.device = model, chunk, device

    def __call__(self, row: dict) -> dict:
        input_ids, position_ids, layout = row_inputs(row, self.device)
        per_token = packed_token_logps(self.model, input_ids, position_ids, layout, self.chunk).logps
        return {"logps": per_token, "sums": segment_sums(per_token, layout)}


def build_reference(train_cfg: TrainingSettings, model_cfg: ModelConfig, path: str, world: int, device: torch.device):
    """The model at ``path`` as a ZeRO-3 engine without an optimizer, partitioned over the
    ``world`` ranks while it loads, in eval mode; ``engine(row=row)`` scores a packed row."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from cluster.deepspeed_config import build_ds_config

    from .engine import hidden_size

    if train_cfg.zero_stage != 3:
        raise ValueError("a reference held by the ranks is partitioned like the policy: it needs train.zero_stage 3")
    ds_config = build_ds_config(train_cfg, model_cfg.dtype, world, hidden_size(model_cfg))
    for key in ("offload_optimizer", "offload_param"):  # no optimizer; its weights stay on the device
        ds_config["zero_optimization"].pop(key, None)
    # Every parameter partitioned, none kept whole between forwards: ZeRO-3 keeps small ones
    # (norms, biases) whole once gathered, and only an optimizer's step refreshes those copies,
    # so a mixed partition would never reach the forward (the second mix scored with old weights).
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    # Nor a second copy a forward gathers from: ZeRO++'s hpZ keeps one per node
    # (ds_secondary_tensor), which only an optimizer's step refreshes; MiCS shards otherwise.
    for key in ("zero_hpz_partition_size", "mics_shard_size", "mics_hierarchical_params_gather"):
        ds_config["zero_optimization"].pop(key, None)
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 - zero.Init is on while it lives: the load partitions
    model = load_causal_lm(path, model_cfg)
    if not hasattr(next(model.parameters()), "ds_id"):
        raise RuntimeError("the reference was not partitioned while loading (HfDeepSpeedConfig was not active)")
    for p in model.parameters():
        p.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    model.forward = ScoreForward(model, model_cfg.logp_chunk_tokens, device)
    engine.eval()
    return engine


PEFT_PREFIX = "base_model.model."  # a PEFT model's parameter names: its base model's, under this


@torch.no_grad()
def mix_policy_into(reference, policy, alpha: float) -> int:
    """π_ref ← α·π_θ + (1 − α)·π_ref, TRL's ``SyncRefModelCallback`` update, on this rank's
    partition of every parameter (``policy_partitions``: the policy's weights as a plain
    model of the reference's architecture holds them, merged with LoRA), mixed in fp32 into
    the reference's partition, in the reference's dtype. The two are partitioned alike (the
    same shapes over the same ranks). Returns the elements mixed on this rank."""
    ours = dict(reference.module.named_parameters())
    mixed, seen = 0, set()
    for name, local in policy_partitions(policy):
        seen.add(name)
        ref = ours.get(name)
        if ref is None:
            raise ValueError(f"the policy's parameter {name} is not the reference's: a reference is mixed with a "
                             f"policy of its architecture")
        part = ref.ds_tensor.data.view(-1)
        if local.numel() != part.numel():
            raise ValueError(f"{name}: the policy's partition holds {local.numel()} elements and the reference's "
                             f"{part.numel()}; they are partitioned alike only over the same ranks")
        # in fp32: a small alpha is not lost to bf16's rounding
        part.copy_(part.float().mul_(1.0 - alpha).add_(local.to(part.device, torch.float32), alpha=alpha))
        mixed += part.numel()
    if set(ours) - seen:  # e.g. a reference with an lm_head of its own, and a policy whose is tied to its embeddings
        raise ValueError(f"the reference's parameters {sorted(set(ours) - seen)[:5]} have no counterpart in the "
                         f"policy: a reference is mixed with a policy of its architecture")
    return mixed


def policy_partitions(policy):
    """(the reference's name, this rank's partition as fp32) of every weight of the policy,
    in the same order on every rank (the adapters' gathers are collective): a trained
    parameter's fp32 master partition (from the host under ZeRO-Offload); a frozen one's
    own partition; with LoRA, a wrapped layer's base weight plus its adapter's update
    (scaling · B @ A from the fp32 masters), the merged weight peft's ``merge_and_unload``
    makes, and the adapters themselves not at all."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

    model = policy.module
    adapted = {n for n, m in model.named_modules() if getattr(m, "lora_A", None)}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        if not p.requires_grad:
            local = p.ds_tensor.data.view(-1).float()
        else:
            local = safe_get_local_fp32_param(p).view(-1).float()
        if name.endswith(".base_layer.weight"):
            adapted.discard(name[:-len(".base_layer.weight")])
            layer = model.get_submodule(name[:-len(".base_layer.weight")])
            (adapter,) = layer.active_adapters
            if adapter not in getattr(layer, "lora_A", {}):
                raise ValueError(f"{name}: TR-DPO mixes the merged weights of LoRA's linear layers, and this one is a "
                                 f"{type(layer).__name__}; leave it out of train.peft.target_modules")
            a = safe_get_full_fp32_param(layer.lora_A[adapter].weight).float()
            b = safe_get_full_fp32_param(layer.lora_B[adapter].weight).float()
            delta = (b @ a).T if layer.fan_in_fan_out else b @ a
            flat = (delta * layer.scaling[adapter]).reshape(-1).to(local.device)
            lo = int(torch.distributed.get_rank()) * local.numel() if torch.distributed.is_initialized() else 0
            piece = flat[lo:lo + local.numel()]
            local = local.clone()
            local[:piece.numel()] += piece  # past the weight's end: ZeRO-3's padding
        yield name.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."), local
    if adapted:  # a base weight met under another name first: tied (lm_head to the embeddings)
        raise ValueError(f"LoRA adapts {sorted(adapted)}, whose weight is tied to another parameter: its merged "
                         f"weight is not one tensor; leave it out of train.peft.target_modules")


@torch.no_grad()
def score_row(reference, row: dict) -> tuple[np.ndarray, np.ndarray]:
    """A packed row's reference log-probs (float32 per token, aligned with ``input_ids``, 0
    outside completions) and per-segment sums, through the engine's front door. Every rank
    calls it for the same number of rows: the forward gathers parameters collectively."""
    out = reference(row=row)
    return out["logps"].float().cpu().numpy(), out["sums"].float().cpu().numpy()
