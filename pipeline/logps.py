"""The one log-prob function, shared by the score and train stages.

A packed row is a 1-D token stream of segments (chosen, rejected, chosen, rejected, ...);
each segment is prompt + completion and its ``position_ids`` restart at 0. The loss mask is
derived from the stored segment and prompt lengths, never from ``input_ids != pad`` (pad is
often EOS, and EOS is a completion token we must score).

Numerics: the decoder runs once over the row (``use_cache=False`` and no
``attention_mask``, so transformers isolates the segments from ``position_ids``; see
ENVIRONMENT.md), then only the completion positions go through the LM head, ``chunk``
tokens at a time, and each chunk's target logit minus logsumexp is taken in fp32. fp32
logits for the whole row are never materialised.

Imports torch only; the model is duck-typed through transformers' public accessors
(``get_decoder`` / ``get_output_embeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SegmentLayout:
    seg_ids: torch.Tensor  # (T,) segment index of every token
    targets: torch.Tensor  # (N,) positions of completion tokens (the ones scored)
    target_seg: torch.Tensor  # (N,) segment index of each target
    num_segments: int


def segment_layout(seq_lens: torch.Tensor, prompt_lens: torch.Tensor) -> SegmentLayout:
    """Completion-token positions of a packed row.

    seq_lens, prompt_lens: (S,) int. Segment s spans [o_s, o_s + L_s) with o_s the running
    offset; its completion tokens are [o_s + P_s, o_s + L_s). P_s >= 1 is required: the
    first completion token is predicted from the last prompt token of the same segment.
    """
    seq_lens = seq_lens.long()
    prompt_lens = prompt_lens.long()
    if bool((prompt_lens < 1).any()) or bool((prompt_lens >= seq_lens).any()):
        raise ValueError("every segment needs 1 <= prompt_len < seq_len")
    num_segments = int(seq_lens.numel())
    seg_ids = torch.repeat_interleave(torch.arange(num_segments, device=seq_lens.device), seq_lens)
    offsets = torch.cumsum(seq_lens, 0) - seq_lens
    pos_in_seg = torch.arange(seg_ids.numel(), device=seq_lens.device) - offsets[seg_ids]
    is_target = pos_in_seg >= prompt_lens[seg_ids]
    targets = torch.nonzero(is_target, as_tuple=False).squeeze(-1)
    return SegmentLayout(seg_ids, targets, seg_ids[targets], num_segments)


def chunked_target_logps(
    hidden: torch.Tensor, lm_head, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """log p(target_i | hidden_i) for each row of ``hidden``; (N, H) -> (N,) fp32.

    ``lm_head`` maps (n, H) hidden states to (n, V) logits in the model's dtype; each chunk
    is upcast to fp32 before logsumexp, so bf16 models still accumulate in fp32.
    """
    out = []
    for start in range(0, hidden.shape[0], chunk):
        logits = lm_head(hidden[start : start + chunk]).float()
        tgt = targets[start : start + chunk].unsqueeze(-1)
        out.append(logits.gather(-1, tgt).squeeze(-1) - torch.logsumexp(logits, dim=-1))
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def packed_token_logps(
    model,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    layout: SegmentLayout,
    chunk: int = 1024,
) -> torch.Tensor:
    """Per-token log-probs of one packed row, aligned with ``input_ids``: (T,) fp32.

    Completion tokens hold log p(token | its own segment's prefix); prompt tokens hold 0.
    """
    decoder = model.get_decoder()
    hidden = decoder(
        input_ids=input_ids.unsqueeze(0), position_ids=position_ids.unsqueeze(0), use_cache=False
    ).last_hidden_state[0]
    # Token t is predicted by the hidden state at t - 1 (same segment since P_s >= 1).
    target_logps = chunked_target_logps(
        hidden[layout.targets - 1], model.get_output_embeddings(), input_ids[layout.targets], chunk
    )
    per_token = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    return per_token.index_put((layout.targets,), target_logps)


def segment_sums(per_token: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """Sum of per-token values over each segment's completion: (T,) -> (S,)."""
    sums = torch.zeros(layout.num_segments, dtype=per_token.dtype, device=per_token.device)
    return sums.index_add(0, layout.target_seg, per_token[layout.targets])


def segment_token_counts(layout: SegmentLayout) -> torch.Tensor:
    """Completion tokens per segment: (S,)."""
    return torch.bincount(layout.target_seg, minlength=layout.num_segments)


def check_model_supported(model) -> None:
    """Refuse architectures whose logits are not ``lm_head(last_hidden_state)``."""
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 0, 1, 1.0):
            raise NotImplementedError(
                f"model config has {attr}={value}: the chunked log-prob pass computes "
                "lm_head(hidden) only; this architecture's logits need that transform too"
            )
