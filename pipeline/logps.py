"""The one log-prob function, shared by the score and train stages.

A packed row is a 1-D token stream of segments (chosen, rejected, chosen, rejected, ...);
each segment is prompt + completion and its ``position_ids`` restart at 0, or, with a
shared prompt, a rejected segment is its completion only and attends to its chosen
segment's prompt (``segment_layout``). The loss mask is derived from the stored segment
and prompt lengths, never from ``input_ids != pad`` (pad is often EOS, and EOS is a
completion token we must score).

Numerics: the decoder runs once over the row (``use_cache=False``; ``segment_sdpa`` gets
the segments' blocks, and on a GPU their variable-length attention plan; ``sdpa``/``eager`` get no ``attention_mask``, so transformers
isolates the segments from ``position_ids`` (docs/design.md, "Packed rows and attention"), or, for rows with
shared prompts, the blocks as a dense mask). Then only the completion positions go
through the LM head, ``chunk`` tokens at a time, and each chunk's target logit minus
logsumexp is taken in fp32. fp32 logits for the whole row are never materialised.

Imports torch only; the model is duck-typed through transformers' public accessors
(``get_decoder`` / ``get_output_embeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def attention_mask(layout: SegmentLayout, num_tokens: int) -> torch.Tensor:
    """The (T, T) boolean mask of ``layout.blocks`` (True: query row may attend to key
    column): the dense form of what ``segment_sdpa`` computes block by block, for the
    attention implementations that take a mask (``sdpa``, ``eager``)."""
    mask = torch.zeros(num_tokens, num_tokens, dtype=torch.bool)
    for a, b, pa, pb in layout.blocks:
        mask[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        mask[a:b, pa:pb] = True
    return mask


class _ChunkedTargetLogps(torch.autograd.Function):
    """log softmax(h W^T + b)[target] chunk by chunk; backward recomputes each chunk's logits.

    Saved for backward: the inputs and one fp32 logsumexp per token, never the logits, so
    the extra memory is O(chunk x vocab) in forward and backward alike. Optionally also
    returns log(sum_v p_v^2) per token (WPO's weights), without gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, want_sq):
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        sq = torch.empty_like(logps) if want_sq else None
        for s in range(0, n, chunk):
            z = F.linear(hidden[s : s + chunk], weight, bias).float()
            target_z = z.gather(-1, targets[s : s + chunk, None]).squeeze(-1)
            if want_sq:  # log sum_v p_v^2 = logsumexp(2 z) - 2 lse
                sq_z = torch.logsumexp(2 * z, dim=-1)
            # logsumexp in place: one chunk-sized buffer, no second temporary
            m = z.max(dim=-1).values
            lse[s : s + chunk] = z.sub_(m[:, None]).exp_().sum(-1).log_().add_(m)
            logps[s : s + chunk] = target_z - lse[s : s + chunk]
            if want_sq:
                sq[s : s + chunk] = sq_z - 2 * lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        if sq is None:
            return logps, None
        ctx.mark_non_differentiable(sq)
        return logps, sq

    @staticmethod
    def backward(ctx, grad_logps, _grad_sq):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if (
            need_b and bias is not None) else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk]
            g = grad_logps[s : s + ctx.chunk].float()
            # d logp / d z = onehot(target) - softmax(z), built in place in one chunk-sized buffer
            z = F.linear(h, weight, bias).float()
            grad_z = z.sub_(lse[s : s + ctx.chunk, None]).exp_().mul_(-g[:, None])
            grad_z = grad_z.scatter_add_(-1, targets[s : s + ctx.chunk, None], g[:, None]).to(weight.dtype)
            if need_h:
                grad_h[s : s + ctx.chunk] = grad_z @ weight
            if need_w:
                if h.dtype == grad_w.dtype:
                    grad_w.addmm_(grad_z.t(), h)  # no weight-sized temporary
                else:
                    grad_w += (grad_z.t() @ h).float()
            if grad_b is not None:
                grad_b += grad_z.float().sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def lm_head_target_logps(
    lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int,
    log_sum_sq: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, H) hidden states -> ((N,) fp32 target log-probs, (N,) log sum p^2 or None).

    The chunked function runs *as the LM head module's forward* (its forward is swapped for
    the call), so whatever wraps that module still sees a module call: DeepSpeed ZeRO-3
    gathers the partitioned (possibly tied) weight before it and again before its backward,
    exactly as for an ``nn.Linear``.
    """

    def fused(h):
        return _ChunkedTargetLogps.apply(h, lm_head.weight, lm_head.bias, targets, chunk, log_sum_sq)

    lm_head.forward = fused
    try:
        return lm_head(hidden)
    finally:
        del lm_head.forward


@dataclass
class TokenLogps:
    logps: torch.Tensor  # (T,) fp32, completion positions only, 0 elsewhere
    log_sum_sq: torch.Tensor | None  # (T,) log sum_v p_v^2 at completion positions (WPO)
    router_logits: tuple | None = None  # MoE: one (T, experts) tensor per layer, when asked


def packed_token_logps(
    model,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    layout: SegmentLayout,
    chunk: int = 1024,
    log_sum_sq: bool = False,
    router_logits: bool = False,
) -> TokenLogps:
    """Per-token log-probs of one packed row, aligned with ``input_ids``: (T,) fp32.

    Completion tokens hold log p(token | its own segment's prefix); prompt tokens hold 0.
    ``router_logits``: also return an MoE decoder's router logits (for the aux loss).
    """
    decoder = model.get_decoder()
    extra = {"output_router_logits": True} if router_logits else {}
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "segment_sdpa":
        extra["segment_blocks"] = layout.blocks  # every layer's attention cuts the row here
        if input_ids.is_cuda:  # one variable-length flash call per layer (bf16/fp16; see pipeline.attention)
            from pipeline.attention import varlen_plan

            extra["segment_varlen"] = varlen_plan(layout.blocks, input_ids.device)
    elif layout.shares_prompts:  # transformers' packing detection (positions restarting at 0) cannot see these
        if impl not in ("sdpa", "eager"):
            raise NotImplementedError(f"rows with shared prompts (tokenize.share_prompt) need attention "
                                      f"segment_sdpa, sdpa or eager; this model runs {impl}")
        mask = attention_mask(layout, input_ids.shape[0]).to(input_ids.device)
        if impl == "eager":  # additive
            dtype = next(model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(dtype).min)
        extra["attention_mask"] = mask[None, None]
    out = decoder(
        input_ids=input_ids.unsqueeze(0), position_ids=position_ids.unsqueeze(0), use_cache=False, **extra
    )
    hidden = out.last_hidden_state[0]
    # Token t is predicted by the hidden state at t - 1, or for the first token of a
    # shared-prompt segment by the prompt's last token (``layout.sources``).
    logps, sq = lm_head_target_logps(
        model.get_output_embeddings(), hidden[layout.sources], input_ids[layout.targets], chunk,
        log_sum_sq,
    )
    zeros = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    return TokenLogps(zeros.index_put((layout.targets,), logps),
                      None if sq is None else zeros.index_put((layout.targets,), sq),
                      tuple(out.router_logits) if router_logits else None)


def segment_sums(per_token: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """Sum of per-token values over each segment's completion: (T,) -> (S,)."""
    sums = torch.zeros(layout.num_segments, dtype=per_token.dtype, device=per_token.device)
    return sums.index_add(0, layout.target_seg, per_token[layout.targets])


def sequence_logps(
    per_token: torch.Tensor, layout: SegmentLayout, aggregation: str = "sum",
    ld_alpha: float | None = None,
) -> torch.Tensor:
    """Per-segment log-probs from per-token values: (T,) -> (S,).

    ``sum`` is DPO's sequence log-prob; ``mean`` divides by the completion length. With
    ``ld_alpha`` (LD-DPO) the tokens of a pair's longer side past the shorter side's length
    weigh ``ld_alpha``. Segments 2i and 2i+1 are a pair's chosen and rejected sides.
    """
    values = per_token[layout.targets]
    lengths = segment_token_counts(layout)
    if ld_alpha is not None:
        shared = torch.minimum(lengths[0::2], lengths[1::2]).repeat_interleave(2)
        values = values * ld_token_weights(lengths, shared, ld_alpha).to(values.dtype)
    sums = torch.zeros(layout.num_segments, dtype=per_token.dtype, device=per_token.device)
    sums = sums.index_add(0, layout.target_seg, values)
    return sums / lengths.to(sums.dtype) if aggregation == "mean" else sums


def segment_token_counts(layout: SegmentLayout) -> torch.Tensor:
    """Completion tokens per segment: (S,)."""
    return torch.bincount(layout.target_seg, minlength=layout.num_segments)


def wpo_pair_weights(aligned_sum: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """WPO (Zhou et al. 2024, arXiv:2406.11827, eq. 2) per-sequence weight
    exp(mean over completion tokens of (log p - log sum_v p_v^2)), detached; (S,) -> (S,).
    A pair's weight is its chosen weight times its rejected weight."""
    return torch.exp(aligned_sum / lengths.clamp(min=1)).detach()


def ld_token_weights(lengths: torch.Tensor, shared: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO (Liu et al. 2024, arXiv:2409.06411) weights of the completion tokens of
    segments with ``lengths`` (S,), in order: 1 for the first ``shared`` (S,) tokens (the
    shorter side's length of the pair), ``alpha`` after; (S,) -> (sum lengths,)."""
    lengths = lengths.long()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    offsets = torch.cumsum(lengths, 0) - lengths
    k = torch.arange(seg.numel(), device=lengths.device) - offsets[seg] + 1
    one = torch.ones((), dtype=torch.float64, device=lengths.device)
    return torch.where(k <= shared[seg], one, one * alpha)


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
