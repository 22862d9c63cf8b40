"""``segment_sdpa``: attention over a packed row, one causal SDPA call per segment.

A packed row holds several sequences back to back, with ``position_ids`` restarting at 0
at each one. transformers' ``sdpa`` isolates them with a dense (tokens x tokens) boolean
mask, so attention costs tokens² per row and the fused causal kernels cannot run. Here the
segments are cut out of q/k/v and each goes through ``scaled_dot_product_attention`` with
``is_causal=True``: the cost is the sum of segment length², nothing tokens x tokens is
built, and the backward works on every device (flex_attention has no CPU backward). A
rejected segment that shares its chosen segment's prompt (``tokenize.share_prompt``) is
one call over the prompt's keys and its own, causal aligned to the last key.

On a GPU in bf16/fp16 the whole row is instead one call to torch's variable-length flash
attention (``torch.nn.attention.varlen``), given a ``VarlenPlan`` built once per row:
one kernel per layer however many segments the row holds, where the per-segment loop
launches one (small, under-occupied) kernel per segment. A shared prompt's keys are
gathered in front of its rejected segment's own, and flash attention's causal mask is
aligned to the last key, which is exactly the shared-prompt block.

Registered with transformers' ``AttentionInterface`` under this name and absent from the
mask interface, so transformers builds no mask for it. Anything that is not one packed
row (a batch, a padding mask) goes to transformers' own ``sdpa``.

A layer's sliding window (``layer_window``: Mistral, Phi-3, the sliding layers of
Gemma-2/3 and Qwen2) is applied as transformers defines it, query i seeing keys
i - window < j <= i in the segment's own positions. Only a segment longer than the window
needs it: such a segment gets an explicit boolean mask, and its row runs the per-segment
loop instead of the one variable-length call.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "segment_sdpa"
VARLEN_DTYPES = (torch.bfloat16, torch.float16)  # flash attention has no fp32 kernel
use_varlen = True  # False: always the per-segment loop (bench/vs_trl.py's -persegment variants)


@dataclass(frozen=True)
class VarlenPlan:
    """A packed row for one variable-length attention call: query segment s is rows
    [cu_q[s], cu_q[s+1]) of the row, its keys are rows ``key_index[cu_k[s]:cu_k[s+1]]``
    (a shared prompt, then the segment itself), causal aligned to the last key."""

    cu_q: torch.Tensor  # (S + 1,) int32
    cu_k: torch.Tensor  # (S + 1,) int32
    max_q: int
    max_k: int
    key_index: torch.Tensor | None  # (sum of key lengths,) int64; None: the keys are the queries' own rows


def varlen_plan(blocks: list[tuple[int, int, int, int]], device: torch.device | str = "cpu") -> VarlenPlan:
    """The plan of ``SegmentLayout.blocks``, built on the host and sent to ``device``
    without blocking (once per row, not per layer)."""
    q_lens = [b - a for a, b, _, _ in blocks]
    k_lens = [b - a + pb - pa for a, b, pa, pb in blocks]
    cu_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + k_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    index = None
    if any(pb > pa for _, _, pa, pb in blocks):
        index = torch.cat([torch.cat([torch.arange(pa, pb), torch.arange(a, b)]) for a, b, pa, pb in blocks])

    def send(t):
        if t is None or torch.device(device).type == "cpu":
            return t
        return t.pin_memory().to(device, non_blocking=True)

    return VarlenPlan(send(cu_q), send(cu_k), max(q_lens), max(k_lens), send(index))


@functools.cache
def _varlen_kernel():
    """(torch's ``varlen_attn``, its causal keyword arguments, whether it takes
    ``enable_gqa``), or None where this torch has no usable one. Its keywords changed
    between releases (``is_causal`` before ``window_size``)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    if "scale" not in params:
        return None
    return varlen_attn, causal, "enable_gqa" in params


@functools.cache
def _flash_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 8  # flash attention 2: Ampere and newer


def varlen_usable(query: torch.Tensor, dropout: float = 0.0) -> bool:
    """Whether ``segment_sdpa`` runs this query through torch's varlen flash attention."""
    return (use_varlen and query.is_cuda and query.dtype in VARLEN_DTYPES and not dropout
            and query.shape[-1] <= 256 and query.shape[-1] % 8 == 0
            and _varlen_kernel() is not None and _flash_capable(query.device.index or 0))


def varlen_forward(query, key, value, plan: VarlenPlan, scaling, kernel=None):
    """(1, H, T, D) q and (1, Hkv, T, D) k/v of one packed row -> (1, T, H, D), in one
    call. ``kernel``: a function with ``varlen_attn``'s signature, causal aligned to the
    last key (the default is torch's flash kernel)."""
    fn, causal, takes_gqa = _varlen_kernel() if kernel is None else (kernel, {}, True)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, heads, D)
    if plan.key_index is not None:
        k, v = k.index_select(0, plan.key_index), v.index_select(0, plan.key_index)
    gqa = q.shape[1] != k.shape[1]
    if gqa and not takes_gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    extra = {"enable_gqa": True} if gqa and takes_gqa else {}
    out = fn(q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, scale=scaling, **causal, **extra)
    return out.unsqueeze(0)


def find_blocks(position_ids: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """One causal block per segment, from positions that restart at 0 (no shared prompts)."""
    starts = torch.nonzero(position_ids == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [position_ids.numel()]
    return [(a, b, a, a) for a, b in zip(bounds, bounds[1:])]


# Layer types (transformers' ``config.layer_types``) whose masks are more than causal with
# an optional sliding window: segment_sdpa cannot compute them.
MASK_ONLY_LAYER_TYPES = ("chunked_attention", "window_attention", "indexed_attention", "compressed_sparse_attention",
                         "heavily_compressed_attention", "minimax_m3_sparse", "reference_sliding_attention")


def layer_window(module, kwargs: dict) -> int | None:
    """The sliding window of the attention layer ``module`` (keys i - window < j <= i), or
    None, read as transformers 5 models carry it: the ``sliding_window`` keyword the layer
    passes to its attention function (Mistral, Phi-3: ``config.sliding_window``; Gemma-2/3,
    Qwen2/3: the layer's own, None on full-attention layers); else the module's
    ``sliding_window`` attribute (Qwen2-MoE sets it on sliding layers only); else the
    config, as transformers' masks read it (``layer_types[layer_idx]``, or
    ``sliding_window`` for every layer). Layers whose masks are not causal (chunked,
    indexed attention) are refused."""
    config = getattr(module, "config", None)
    layer_types, idx = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    kind = layer_types[idx] if layer_types and isinstance(idx, int) and 0 <= idx < len(layer_types) else None
    if kind in MASK_ONLY_LAYER_TYPES:
        raise NotImplementedError(f"segment_sdpa: layer {idx} is {kind}, whose mask SDPA per segment cannot compute; "
                                  "use model.attn_implementation sdpa, eager or flex_attention")
    if kwargs.get("sliding_window") is not None:
        return int(kwargs["sliding_window"])
    if "sliding_window" in kwargs or "sliding_window" in vars(module):
        window = getattr(module, "sliding_window", None)
        return None if window is None else int(window)
    window = getattr(config, "sliding_window", None)
    if kind is not None:
        return window if kind == "sliding_attention" else None
    return window


def _block(query, key, value, a, b, pa, pb, dropout, scaling, gqa, window=None):
    """Queries [a, b) over keys [pa, pb) + [a, b), causal within [a, b). ``window``: also
    a sliding window over the block's positions (the prefix's 0 .. P-1, then the segment's
    P .. P + n - 1), given only where it cuts something."""
    if window is not None:
        p, n = pb - pa, b - a
        q = query[:, :, a:b]
        k = torch.cat([key[:, :, pa:pb], key[:, :, a:b]], dim=2) if p else key[:, :, a:b]
        v = torch.cat([value[:, :, pa:pb], value[:, :, a:b]], dim=2) if p else value[:, :, a:b]
        q_pos = torch.arange(p, p + n, device=q.device)[:, None]
        k_pos = torch.arange(p + n, device=q.device)[None, :]
        mask = (k_pos <= q_pos) & (k_pos > q_pos - window)
        if gqa and q.device.type == "cuda":  # the masked fused kernels expect as many key as query heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            gqa = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                              enable_gqa=gqa)
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
                         is_causal=None, position_ids=None, segment_blocks=None, segment_varlen=None, **kwargs):
    """``segment_blocks``: (start, end, prefix_start, prefix_end) per segment as Python
    ints (``SegmentLayout.blocks``), passed once per forward by
    ``pipeline.core.logps.packed_token_logps`` (no per-layer device sync); otherwise one causal
    block per segment is found from ``position_ids``. ``segment_varlen``: the same
    blocks as a ``VarlenPlan`` on the query's device, used where ``varlen_usable`` and no
    segment is longer than the layer's sliding window (``layer_window``): torch's
    ``varlen_attn`` takes a ``window_size``, but its cuDNN backend refuses one and it is
    not verified against transformers' window here, so such rows take the loop."""
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
    window = layer_window(module, kwargs)
    # the window cuts a block only where its last position (prefix + own tokens - 1) reaches it
    windows = [window if window is not None and b - a + pb - pa > window else None for a, b, pa, pb in blocks]
    if segment_varlen is not None and all(w is None for w in windows) and varlen_usable(query, dropout):
        return varlen_forward(query, key, value, segment_varlen, scaling), None
    gqa = query.shape[1] != key.shape[1]
    outs = [_block(query, key, value, a, b, pa, pb, dropout, scaling, gqa, w)
            for (a, b, pa, pb), w in zip(blocks, windows)]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, segment_sdpa_forward)
