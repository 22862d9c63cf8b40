"""``segment_sdpa``: attention over a packed row, one causal SDPA call per segment.

A packed row holds several sequences back to back, with ``position_ids`` restarting at 0
at each one. transformers' ``sdpa`` isolates them with a dense (tokens x tokens) boolean
mask, so attention costs tokens² per row and the fused causal kernels cannot run. Here the
segments are cut out of q/k/v and each goes through ``scaled_dot_product_attention`` with
``is_causal=True``: the cost is the sum of segment length², nothing tokens x tokens is
built, and the backward works on every device (flex_attention has no CPU backward). A
rejected segment that shares its chosen segment's prompt (``tokenize.share_prompt``) is
one call over the prompt's keys and its own, causal aligned to the last key.

Registered with transformers' ``AttentionInterface`` under this name and absent from the
mask interface, so transformers builds no mask for it. Anything that is not one packed
row (a batch, a padding mask) goes to transformers' own ``sdpa``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "segment_sdpa"


def find_blocks(position_ids: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """One causal block per segment, from positions that restart at 0 (no shared prompts)."""
    starts = torch.nonzero(position_ids == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [position_ids.numel()]
    return [(a, b, a, a) for a, b in zip(bounds, bounds[1:])]


def _block(query, key, value, a, b, pa, pb, dropout, scaling, gqa):
    """Queries [a, b) over keys [pa, pb) + [a, b), causal within [a, b)."""
    if pb == pa:
        return F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
                                              is_causal=True, scale=scaling, enable_gqa=gqa)
    q = query[:, :, a:b]
    k = torch.cat([key[:, :, pa:pb], key[:, :, a:b]], dim=2)
    v = torch.cat([value[:, :, pa:pb], value[:, :, a:b]], dim=2)
    if q.device.type == "cuda":  # causal aligned to the last key: the fused kernels take it without a mask
        from torch.nn.attention.bias import causal_lower_right

        if gqa:  # the lower-right bias dispatches to kernels that expect as many key as query heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(b - a, k.shape[2]),
                                              dropout_p=dropout, scale=scaling)
    mask = torch.ones(b - a, k.shape[2], dtype=torch.bool, device=q.device).tril(pb - pa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa)


def segment_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, position_ids=None, segment_blocks=None, **kwargs):
    """``segment_blocks``: (start, end, prefix_start, prefix_end) per segment as Python
    ints (``SegmentLayout.blocks``), passed once per forward by
    ``pipeline.logps.packed_token_logps`` (no per-layer device sync); otherwise one causal
    block per segment is found from ``position_ids``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    unsupported = [k for k in ("softcap", "s_aux", "position_bias") if kwargs.get(k) is not None]
    if unsupported:  # an architecture whose attention is more than causal softmax(q k^T) v
        raise NotImplementedError(f"segment_sdpa: this model's attention uses {', '.join(unsupported)}, which "
                                  "SDPA cannot compute; use model.attn_implementation eager or flex_attention")
    blocks = segment_blocks if segment_blocks is not None else find_blocks(position_ids[0])
    if blocks[-1][1] != query.shape[2]:
        raise ValueError(f"segment_sdpa: segment blocks end at {blocks[-1][1]}, the row has {query.shape[2]} tokens")
    window = kwargs.get("sliding_window")
    if window is not None and max(b - a + pb - pa for a, b, pa, pb in blocks) > window:
        raise NotImplementedError(f"segment_sdpa: a segment is longer than the model's sliding window ({window}); "
                                  "use model.attn_implementation sdpa or flash_attention_2")
    gqa = query.shape[1] != key.shape[1]
    outs = [_block(query, key, value, a, b, pa, pb, dropout, scaling, gqa) for a, b, pa, pb in blocks]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, segment_sdpa_forward)
