"""Loading causal LMs with the pipeline's numerics policy (one place for score and train).

Dropout is off in every model the pipeline runs (as TRL's ``disable_dropout=True``): the
reference is scored once, so policy and reference must be deterministic functions of the
weights, or the step-0 invariant (policy == reference => loss ln 2) cannot hold.
"""

from __future__ import annotations

import torch

from pipeline.core.config import ModelConfig
from pipeline.core.segments import SegmentLayout, segment_layout
from pipeline.core.logit_transforms import check_model_supported
from pipeline.core.logps_probe import probe_packed_logps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def disable_dropout_in_config(config) -> None:
    for name, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
            setattr(config, name, 0.0)


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_causal_lm(path: str, mcfg: ModelConfig, device: torch.device | str | None = None) -> torch.nn.Module:
    """``from_pretrained`` with the configured dtype and attention, dropout disabled.

    ``device``: load the weights straight onto it (a score actor's GPU), never staging a
    full copy in host memory (eight 8B-model actors on one node would hold 128 GB there).
    Under ZeRO-3 the caller passes none and keeps an ``HfDeepSpeedConfig`` alive instead,
    so the weights are partitioned while they load instead of materialising on every rank.

    The model is refused (NotImplementedError) where the log-prob pass cannot reproduce it:
    a logit transform it does not know (``check_model_supported``), or, run on a tiny packed
    row, log-probs that differ from the model's own forward (``probe_packed_logps``; not
    here when ZeRO-3 partitioned the weights).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.core.attention import register
    from pipeline.core.models import local_dir

    path = local_dir(path, mcfg)  # a Hub id or a bucket URI: this node's copy
    register()  # segment_sdpa, in every process that loads a model (Ray workers included)
    config = AutoConfig.from_pretrained(path, trust_remote_code=mcfg.trust_remote_code)
    disable_dropout_in_config(config)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        dtype=DTYPES[mcfg.dtype],
        attn_implementation=mcfg.attn_implementation,
        trust_remote_code=mcfg.trust_remote_code,
        **({} if device is None else {"device_map": {"": str(device)}}),
    )
    disable_dropout(model)
    check_model_supported(model)
    if not is_partitioned(model):
        # Under ZeRO-3 no plain forward runs before the DeepSpeed engine exists: the train
        # stage probes engine.module after deepspeed.initialize instead.
        probe_packed_logps(model, path)
    return model


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitioned the parameters while they loaded."""
    return hasattr(next(model.parameters()), "ds_id")


def row_tensors(row: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A packed row (dict of lists) as tensors on ``device``."""
    return {
        "input_ids": torch.tensor(row["input_ids"], dtype=torch.long, device=device),
        "position_ids": torch.tensor(row["position_ids"], dtype=torch.long, device=device),
        "seq_lens": torch.tensor(row["seq_lens"], dtype=torch.long, device=device),
        "prompt_lens": torch.tensor(row["prompt_lens"], dtype=torch.long, device=device),
    }


def row_inputs(row: dict, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, SegmentLayout]:
    """A packed row's ``input_ids``, ``position_ids`` and segment layout, on ``device``.

    The layout is worked out on the host, where the segment lengths already are (its blocks
    are Python ints for ``segment_sdpa``), and everything goes to a GPU from pinned memory
    without blocking: preparing row k+1 never waits for row k's kernels, so the host runs
    ahead and the GPU's queue stays full.
    """
    t = row_tensors(row)
    layout = segment_layout(t["seq_lens"], t["prompt_lens"])
    return (to_device(t["input_ids"], device), to_device(t["position_ids"], device),
            SegmentLayout(*(to_device(x, device) for x in (layout.seg_ids, layout.targets, layout.target_seg,
                                                            layout.sources)),
                          layout.num_segments, layout.blocks))


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, without blocking the host."""
    if torch.device(device).type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def moe_router(model, coef_override: float | None) -> tuple[float, int, int] | None:
    """(aux coefficient, experts, top-k) when the router load-balancing loss is on, else None.

    As TRL: on when the model config sets ``output_router_logits``, weighted by its
    ``router_aux_loss_coef``; ``train.router_aux_loss_coef`` (a number) turns it on with that
    weight, 0 turns it off.
    """
    config = model.config
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not experts or not top_k:
        return None
    if coef_override is None:
        if not getattr(config, "output_router_logits", False):
            return None
        coef = float(getattr(config, "router_aux_loss_coef", 0.0))
    else:
        coef = coef_override
    return (coef, int(experts), int(top_k)) if coef > 0 else None
