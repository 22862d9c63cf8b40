"""Where each segment of a packed row lies (``SegmentLayout``): a row is a 1-D token
stream of segments (chosen, rejected, chosen, rejected, ...), each prompt + completion with
``position_ids`` restarting at 0, or, with a shared prompt, a rejected segment that is its
completion only and attends to its chosen segment's prompt. From the layout: the
attention masks (block-causal, sliding windows), per-segment sums and token counts. The
loss mask comes from the stored segment and prompt lengths, never from
``input_ids != pad`` (pad is often EOS, and EOS is a completion token we must score)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SegmentLayout:
    seg_ids: torch.Tensor  # (T,) segment index of every token
    targets: torch.Tensor  # (N,) positions of completion tokens (the ones scored)
    target_seg: torch.Tensor  # (N,) segment index of each target
    sources: torch.Tensor  # (N,) positions whose hidden state predicts each target
    num_segments: int
    # Attention, once per row, as Python ints: (start, end, prefix_start, prefix_end) per
    # segment: tokens [start, end) attend causally to themselves and to all of
    # [prefix_start, prefix_end) (a shared prompt; empty when prefix_start == prefix_end).
    blocks: list[tuple[int, int, int, int]]

    @property
    def shares_prompts(self) -> bool:
        return any(pb > pa for _, _, pa, pb in self.blocks)


def segment_layout(seq_lens: torch.Tensor, prompt_lens: torch.Tensor) -> SegmentLayout:
    """Completion-token positions of a packed row.

    seq_lens, prompt_lens: (S,) int, the tokens each segment stores and how many of them
    are its prompt. Segment s spans [o_s, o_s + L_s) with o_s the running offset; its
    completion tokens are [o_s + P_s, o_s + L_s). P_s >= 1: the first completion token is
    predicted from the last prompt token of the same segment.

    Shared prompt (``tokenize.share_prompt``): a rejected segment (odd s) with P_s = 0
    stores only its completion; its prompt is the first P_{s-1} tokens of its chosen
    segment, which it attends to (its ``position_ids`` continue from P_{s-1}), and its
    first token is predicted from that prompt's last token.
    """
    seq_lens = seq_lens.long()
    prompt_lens = prompt_lens.long()
    num_segments = int(seq_lens.numel())
    index = torch.arange(num_segments, device=seq_lens.device)
    shared = prompt_lens == 0
    if bool((prompt_lens < 0).any()) or bool((prompt_lens >= seq_lens).any()):
        raise ValueError("every segment needs 0 <= prompt_len < seq_len")
    if bool((shared & (index % 2 == 0)).any()):
        raise ValueError("prompt_len 0 (a shared prompt) is only valid for a rejected segment (odd index); "
                         "a chosen segment needs 1 <= prompt_len < seq_len")
    seg_ids = torch.repeat_interleave(index, seq_lens)
    offsets = torch.cumsum(seq_lens, 0) - seq_lens
    pos_in_seg = torch.arange(seg_ids.numel(), device=seq_lens.device) - offsets[seg_ids]
    is_target = pos_in_seg >= prompt_lens[seg_ids]
    targets = torch.nonzero(is_target, as_tuple=False).squeeze(-1)
    target_seg = seg_ids[targets]
    sources = targets - 1
    if bool(shared.any()):
        # the last prompt token of the chosen segment before: o_{s-1} + P_{s-1} - 1
        prompt_end = torch.roll(offsets + prompt_lens, 1) - 1
        first = shared[target_seg] & (pos_in_seg[targets] == 0)
        sources = torch.where(first, prompt_end[target_seg], sources)
    starts, lens, prompts = offsets.tolist(), seq_lens.tolist(), prompt_lens.tolist()
    blocks = [(a, a + n, starts[s - 1], starts[s - 1] + prompts[s - 1]) if p == 0 else (a, a + n, a, a)
              for s, (a, n, p) in enumerate(zip(starts, lens, prompts))]
    return SegmentLayout(seg_ids, targets, target_seg, sources, num_segments, blocks)


def attention_mask(layout: SegmentLayout, num_tokens: int, window: int | None = None) -> torch.Tensor:
    """The (T, T) boolean mask of ``layout.blocks`` (True: query row may attend to key
    column): the dense form of what ``segment_sdpa`` computes block by block, for the
    attention implementations that take a mask (``sdpa``, ``eager``).

    ``window``: a sliding window as transformers defines it (``masking_utils``: key j is
    seen from query i when i - window < j <= i), counted in the segment's own positions: a
    shared-prompt rejected segment's tokens sit at positions P, P+1, ... after its prompt's
    0 .. P-1, exactly as in the row that stores the prompt on both sides."""
    mask = torch.zeros(num_tokens, num_tokens, dtype=torch.bool)
    for a, b, pa, pb in layout.blocks:
        n, p = b - a, pb - pa
        q_pos = torch.arange(p, p + n)[:, None]
        keep_own = torch.ones(n, n, dtype=torch.bool).tril()
        keep_prefix = torch.ones(n, p, dtype=torch.bool)
        if window is not None:
            keep_own &= torch.arange(p, p + n)[None, :] > q_pos - window
            keep_prefix &= torch.arange(p)[None, :] > q_pos - window
        mask[a:b, a:b] = keep_own
        mask[a:b, pa:pb] = keep_prefix
    return mask


def mask_windows(config) -> dict[str | None, int | None]:
    """The sliding window of each kind of attention layer, as transformers' masks apply it
    for ``sdpa`` and ``eager`` (their only carrier of a window): with ``config.layer_types``,
    ``{layer type: window}`` (``sliding_attention`` layers get ``config.sliding_window``,
    ``full_attention`` none); without, ``{None: config.sliding_window}`` for every layer
    (Mistral, Phi-3, Mixtral: ``create_sliding_window_causal_mask`` when it is set). Other
    layer types (chunked, indexed, linear attention) are refused: their masks are not
    block-causal."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return {None: window}
    other = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if other:
        raise NotImplementedError(f"rows with shared prompts (tokenize.share_prompt) on sdpa/eager: this model has "
                                  f"{', '.join(other)} layers, whose masks the dense block mask cannot replace; "
                                  "use model.attn_implementation segment_sdpa or tokenize.share_prompt false")
    return {t: (window if t == "sliding_attention" else None) for t in dict.fromkeys(layer_types)}


def dense_attention_mask(model, layout: SegmentLayout, num_tokens: int, device) -> torch.Tensor | dict:
    """The ``attention_mask`` argument for a row with shared prompts on ``sdpa``/``eager``:
    one (1, 1, T, T) mask (boolean for sdpa, additive for eager), or, where layers differ in
    their sliding window (Gemma-2/3, Qwen2 with ``max_window_layers``), one per layer type,
    as the dict the model's forward takes instead of building its own masks."""
    windows = mask_windows(model.get_decoder().config)
    eager = getattr(model.config, "_attn_implementation", None) == "eager"
    dtype = next(model.parameters()).dtype

    def build(window):
        mask = attention_mask(layout, num_tokens, window).to(device)
        if eager:  # additive
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
        return mask[None, None]

    if len(set(windows.values())) == 1:
        return build(next(iter(windows.values())))
    return {kind: build(window) for kind, window in windows.items()}


def segment_sums(per_token: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """Sum of per-token values over each segment's completion: (T,) -> (S,)."""
    sums = torch.zeros(layout.num_segments, dtype=per_token.dtype, device=per_token.device)
    return sums.index_add(0, layout.target_seg, per_token[layout.targets])


def segment_token_counts(layout: SegmentLayout) -> torch.Tensor:
    """Completion tokens per segment: (S,)."""
    return torch.bincount(layout.target_seg, minlength=layout.num_segments)


def device_layout(layout: SegmentLayout, device) -> SegmentLayout:
    return SegmentLayout(*(x.to(device) for x in (layout.seg_ids, layout.targets, layout.target_seg, layout.sources)),
                         layout.num_segments, layout.blocks)
