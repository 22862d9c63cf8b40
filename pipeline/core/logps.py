"""The one log-prob function, shared by the score and train stages.

A packed row is a 1-D token stream of segments (chosen, rejected, chosen, rejected, ...);
each segment is prompt + completion and its ``position_ids`` restart at 0, or, with a
shared prompt, a rejected segment is its completion only and attends to its chosen
segment's prompt (``segments.segment_layout``). The loss mask is derived from the stored segment
and prompt lengths, never from ``input_ids != pad`` (pad is often EOS, and EOS is a
completion token we must score).

Numerics: the decoder runs once over the row (``use_cache=False``; ``segment_sdpa`` gets
the segments' blocks, and on a GPU their variable-length attention plan; ``sdpa``/``eager`` get no ``attention_mask``, so transformers
isolates the segments from ``position_ids`` (docs/design.md, "Packed rows and attention"), or, for rows with
shared prompts, the blocks as a dense mask). Then only the completion positions go
through the LM head, ``chunk`` tokens at a time, and each chunk's target logit minus
logsumexp is taken in fp32. fp32 logits for the whole row are never materialised. An
architecture's own transform of the LM head's output (a logit scale, final-logit
soft-capping: ``logit_transforms.logit_transform``) is applied inside that pass, and ``logps_probe.probe_packed_logps``
checks at load time that the pass equals the model's own ``log_softmax(logits)``.

Imports torch only; the model is duck-typed through transformers' public accessors
(``get_decoder`` / ``get_output_embeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .logit_transforms import IDENTITY, LogitTransform, _transform_, logit_transform
from .segments import SegmentLayout, dense_attention_mask, segment_token_counts


class _ChunkedTargetLogps(torch.autograd.Function):
    """log softmax(T(h W^T + b))[target] chunk by chunk, T a ``LogitTransform``; backward
    recomputes each chunk's logits.

    Saved for backward: the inputs and one fp32 logsumexp per token, never the logits, so
    the extra memory is O(chunk x vocab) in forward and backward alike (two such buffers
    in the backward with soft-capping, for its derivative). Optionally also returns, without
    gradient, log(sum_v p_v^2) per token (WPO's weights) and whether the target is the
    most likely token (SFT's token accuracy: its logit is the chunk row's max, which the
    logsumexp computes anyway).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, want_sq, transform=IDENTITY, want_correct=False):
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        sq = torch.empty_like(logps) if want_sq else None
        correct = torch.empty(n, dtype=torch.bool, device=hidden.device) if want_correct else None
        for s in range(0, n, chunk):
            z = _transform_(F.linear(hidden[s : s + chunk], weight, bias).float(), transform)
            target_z = z.gather(-1, targets[s : s + chunk, None]).squeeze(-1)
            if want_sq:  # log sum_v p_v^2 = logsumexp(2 z) - 2 lse
                sq_z = torch.logsumexp(2 * z, dim=-1)
            # logsumexp in place: one chunk-sized buffer, no second temporary
            m = z.max(dim=-1).values
            if want_correct:
                correct[s : s + chunk] = target_z >= m
            lse[s : s + chunk] = z.sub_(m[:, None]).exp_().sum(-1).log_().add_(m)
            logps[s : s + chunk] = target_z - lse[s : s + chunk]
            if want_sq:
                sq[s : s + chunk] = sq_z - 2 * lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        ctx.transform = transform
        ctx.mark_non_differentiable(*[t for t in (sq, correct) if t is not None])
        return logps, sq, correct

    @staticmethod
    def backward(ctx, grad_logps, _grad_sq, _grad_correct):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        transform = ctx.transform
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if (
            need_b and bias is not None) else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk]
            g = grad_logps[s : s + ctx.chunk].float()
            z = F.linear(h, weight, bias).float()
            dz = None  # d T(z0) / d z0, where it is not a constant
            if transform.softcap is not None:  # T = cap tanh(scale z0 / cap): T' = scale (1 - tanh^2)
                t = z.mul_(transform.scale / transform.softcap).tanh_()
                dz = t.square().neg_().add_(1).mul_(transform.scale)
                z = t.mul_(transform.softcap)
            elif transform.scale != 1.0:
                z = z.mul_(transform.scale)
            # d logp / d T = onehot(target) - softmax(T), built in place in one chunk-sized buffer
            grad_z = z.sub_(lse[s : s + ctx.chunk, None]).exp_().mul_(-g[:, None])
            grad_z = grad_z.scatter_add_(-1, targets[s : s + ctx.chunk, None], g[:, None])
            if dz is not None:
                grad_z = grad_z.mul_(dz)
                del dz
            elif transform.scale != 1.0:
                grad_z = grad_z.mul_(transform.scale)
            grad_z = grad_z.to(weight.dtype)
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
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def lm_head_target_logps(
    lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int,
    log_sum_sq: bool = False, transform: LogitTransform = IDENTITY, correct: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(N, H) hidden states -> ((N,) fp32 target log-probs, (N,) log sum p^2 or None, (N,)
    bool "the target is the argmax" or None), the logits being ``transform`` of
    ``lm_head(hidden)`` (see ``logit_transform``).

    The chunked function runs *as the LM head module's forward* (its forward is swapped for
    the call), so whatever wraps that module still sees a module call: DeepSpeed ZeRO-3
    gathers the partitioned (possibly tied) weight before it and again before its backward,
    exactly as for an ``nn.Linear``.
    """

    def fused(h):
        return _ChunkedTargetLogps.apply(h, lm_head.weight, lm_head.bias, targets, chunk, log_sum_sq, transform,
                                         correct)

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
    correct: torch.Tensor | None = None  # (T,) bool: the token is the model's argmax (completion positions), when asked


def packed_token_logps(
    model,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    layout: SegmentLayout,
    chunk: int = 1024,
    log_sum_sq: bool = False,
    router_logits: bool = False,
    correct: bool = False,
) -> TokenLogps:
    """Per-token log-probs of one packed row, aligned with ``input_ids``: (T,) fp32.

    Completion tokens hold log p(token | its own segment's prefix); prompt tokens hold 0.
    ``router_logits``: also return an MoE decoder's router logits (for the aux loss);
    ``correct``: also whether each completion token is the model's most likely one. The
    model's transform of its LM head's output (``logit_transform``) is applied.
    """
    decoder = model.get_decoder()
    extra = {"output_router_logits": True} if router_logits else {}
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "segment_sdpa":
        extra["segment_blocks"] = layout.blocks  # every layer's attention cuts the row here
        if input_ids.is_cuda:  # one variable-length flash call per layer (bf16/fp16; see pipeline.core.attention)
            from pipeline.core.attention import varlen_plan

            extra["segment_varlen"] = varlen_plan(layout.blocks, input_ids.device)
    elif layout.shares_prompts:  # transformers' packing detection (positions restarting at 0) cannot see these
        if impl not in ("sdpa", "eager"):
            raise NotImplementedError(f"rows with shared prompts (tokenize.share_prompt) need attention "
                                      f"segment_sdpa, sdpa or eager; this model runs {impl}")
        # the model's sliding windows included: its own masks are not built when it is given one
        extra["attention_mask"] = dense_attention_mask(model, layout, input_ids.shape[0], input_ids.device)
    out = decoder(
        input_ids=input_ids.unsqueeze(0), position_ids=position_ids.unsqueeze(0), use_cache=False, **extra
    )
    hidden = out.last_hidden_state[0]
    # Token t is predicted by the hidden state at t - 1, or for the first token of a
    # shared-prompt segment by the prompt's last token (``layout.sources``).
    logps, sq, hits = lm_head_target_logps(
        model.get_output_embeddings(), hidden[layout.sources], input_ids[layout.targets], chunk,
        log_sum_sq, logit_transform(model), correct,
    )
    zeros = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    return TokenLogps(zeros.index_put((layout.targets,), logps),
                      None if sq is None else zeros.index_put((layout.targets,), sq),
                      tuple(out.router_logits) if router_logits else None,
                      None if hits is None else torch.zeros_like(zeros, dtype=torch.bool).index_put((layout.targets,), hits))


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
