"""The load-time probe of the log-prob pass: on a model as loaded, two short segments
through ``packed_token_logps`` against the model's own ``log_softmax(logits)``, within a
tolerance by dtype. A model whose logits are more than ``lm_head(hidden)`` in a way the
pass does not know is refused before any row is scored or trained."""

from __future__ import annotations

import torch

from .logit_transforms import _text_config
from .logps import packed_token_logps
from .segments import device_layout, segment_layout


# The probe's row: two segments of 6 tokens, prompts of 2, positions restarting at 0.
_PROBE_LEN, _PROBE_PROMPT = 6, 2


# Max |log-prob difference| allowed by the probe, by dtype: fp32 is exact up to kernel
# order; bf16/fp16 logits carry a rounding of up to 2^-8 of their magnitude.
PROBE_ATOL = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 0.1, torch.float16: 0.02}


PROBE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-8, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}


def _probe_gap(ours: torch.Tensor, own: torch.Tensor) -> float:
    """Max |ours - own| where the model's own log-prob is finite (NaN where ours is not).

    Positions where the model's own forward is already NaN/inf say nothing about the
    packed pass: such weights are the score stage's NaN check to report, naming the rows.
    """
    ours, own = ours.cpu(), own.cpu()
    keep = own.isfinite()
    return (ours[keep] - own[keep]).abs().max().item() if keep.any() else 0.0


def probe_packed_logps(model, name: str | None = None) -> float:
    """Refuse ``model`` unless the packed log-prob pass reproduces its own forward.

    One row of two segments (6 tokens, prompt 2, ``position_ids`` restarting at 0) goes
    through ``packed_token_logps``; each segment alone through ``model(input_ids=...)``,
    whose ``logits.float().log_softmax(-1)`` is the reference. A difference beyond the
    dtype's tolerance raises NotImplementedError naming the likely reason: a transform of
    the logits the pass does not apply (the first segment alone already differs), or
    segments of a packed row that see each other (attention that ignores ``position_ids``,
    recurrent / state-space layers that carry state across the row). Returns the max
    difference.

    Deterministic token ids (no RNG), eval mode and no_grad for the probe, the train mode
    restored: nothing the caller computes afterwards changes. Needs a plain forward, so not
    under ZeRO-3 before the DeepSpeed engine exists (call it on ``engine.module`` then).
    """
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    text = _text_config(model.config)
    # the config's vocabulary: under ZeRO-3 the local weight is a partition
    vocab = getattr(text, "vocab_size", None) or model.get_output_embeddings().weight.shape[0]
    # two fixed, different token patterns spread over the vocabulary
    segs = [torch.tensor([(k * step + 7 * i + 3) % vocab for k in range(_PROBE_LEN)], dtype=torch.long, device=device)
            for i, step in enumerate((vocab // 7 + 1, vocab // 5 + 3))]
    lens = torch.tensor([_PROBE_LEN] * len(segs))
    prompts = torch.tensor([_PROBE_PROMPT] * len(segs))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            own, magnitude = [], 0.0
            for seg in segs:
                logits = model(input_ids=seg[None], use_cache=False).logits[0].float()
                finite = logits[logits.isfinite()]
                magnitude = max(magnitude, finite.abs().max().item() if finite.numel() else 0.0)
                logp = logits.log_softmax(-1)[:-1].gather(-1, seg[1:, None]).squeeze(-1)
                own.append(logp[_PROBE_PROMPT - 1:])
            alone = packed_token_logps(model, segs[0], torch.arange(_PROBE_LEN, device=device),
                                       device_layout(segment_layout(lens[:1], prompts[:1]), device), chunk=3).logps
            packed = packed_token_logps(model, torch.cat(segs), torch.arange(_PROBE_LEN, device=device).repeat(
                len(segs)), device_layout(segment_layout(lens, prompts), device), chunk=3).logps
    finally:
        model.train(was_training)
    alone_diff = _probe_gap(alone[_PROBE_PROMPT:], own[0])
    packed_diff = max(_probe_gap(packed[i * _PROBE_LEN + _PROBE_PROMPT:(i + 1) * _PROBE_LEN], own[i]) for i in range(len(segs)))
    tol = PROBE_ATOL.get(dtype, 0.1) + PROBE_RTOL.get(dtype, 2.0**-7) * magnitude
    diff = max(alone_diff, packed_diff)
    if not diff <= tol:  # NaN fails too
        what = f"model type {getattr(text, 'model_type', None) or type(model).__name__}" + (f" ({name})" if name else "")
        if not alone_diff <= tol:
            reason = ("its forward computes its logits as more than lm_head(hidden) (a logit scale, soft-capping, a "
                      "vocabulary cut or mask) in a way the log-prob pass does not apply")
        else:
            reason = ("the segments of a packed row see each other: its attention ignores position_ids (remote code "
                      "running causal attention over the whole row), or it has recurrent / state-space layers that "
                      "carry state from one segment into the next")
        raise NotImplementedError(
            f"{what}: the packed log-prob pass differs from the model's own log_softmax(logits) by {diff:.3g} "
            f"(one segment alone: {alone_diff:.3g}; tolerance {tol:.3g} in {str(dtype).removeprefix('torch.')}). "
            f"Likely reason: {reason}. Both the score and the train stage would compute wrong log-probs, so it is "
            "refused."
        )
    return diff
