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
logsumexp is taken in fp32. fp32 logits for the whole row are never materialised. An
architecture's own transform of the LM head's output (a logit scale, final-logit
soft-capping: ``logit_transform``) is applied inside that pass, and ``probe_packed_logps``
checks at load time that the pass equals the model's own ``log_softmax(logits)``.

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


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to ``lm_head(hidden)``: logits = softcap(scale * z), with
    softcap(u) = cap * tanh(u / cap) when ``softcap`` is set (``logit_transform``)."""

    scale: float = 1.0
    softcap: float | None = None


IDENTITY = LogitTransform()


def _transform_(z: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    """``transform`` applied to fp32 logits in place."""
    if transform.softcap is not None:
        return z.mul_(transform.scale / transform.softcap).tanh_().mul_(transform.softcap)
    if transform.scale != 1.0:
        return z.mul_(transform.scale)
    return z


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


# How a causal LM's forward transforms lm_head(hidden) before its loss (transformers 5.23,
# models/*/modeling_*.py): logits = softcap(scale * lm_head(hidden)).
# A scale read from the config, by model type: divided by, or multiplied by, the attribute.
_DIVIDE_BY = {t: "logits_scaling" for t in (
    "granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa",
    "minicpm3",  # divides the hidden state before a bias-free lm_head: the same
)}
_MULTIPLY_BY = {"hyperclovax": "logits_scaling", "falcon_h1": "lm_head_multiplier", "cohere": "logit_scale",
                "cohere2": "logit_scale", "cohere2_moe": "logit_scale", "cohere_compass": "logit_scale"}
# Final-logit soft-capping: ``final_logit_softcapping`` (Gemma 2/3/3n/4, VaultGemma, nanochat, ...) unless named here.
_SOFTCAP_ATTR = {"recurrent_gemma": "logits_soft_cap", "xlstm": "output_logit_soft_cap"}
# Config attributes that name such a transform: with a model type not above, refused.
_TRANSFORM_ATTRS = ("logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier",
                    "output_multiplier_scale", "logits_soft_cap", "output_logit_soft_cap")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _trivial(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and float(value) in (0.0, 1.0))


def logit_transform(model) -> LogitTransform:
    """The transform ``model``'s forward applies to its LM head's output, which the chunked
    log-prob pass applies too. Raises NotImplementedError where the config names a
    transform this does not know (``probe_packed_logps`` checks the rest by running it)."""
    config = model.config
    text = _text_config(config)
    types = {getattr(config, "model_type", None), getattr(text, "model_type", None)}
    scale, known = 1.0, set()
    for table, invert in ((_DIVIDE_BY, True), (_MULTIPLY_BY, False)):
        for model_type in types & table.keys():
            attr = table[model_type]
            value = getattr(text, attr, None)
            known.add(attr)
            if value is not None and float(value) != 1.0:
                scale = 1.0 / float(value) if invert else float(value)
    if "minicpm3" in types and scale != 1.0 and getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise NotImplementedError("minicpm3 with an lm_head bias: its hidden-state scaling is not a logit scale")
    softcap_attr = next((_SOFTCAP_ATTR[t] for t in types if t in _SOFTCAP_ATTR), "final_logit_softcapping")
    known.add(softcap_attr)
    softcap = getattr(text, softcap_attr, None)
    softcap = None if softcap in (None, 0) else float(softcap)
    for attr in _TRANSFORM_ATTRS + ("final_logit_softcapping",):
        value = getattr(text, attr, None)
        if attr not in known and not _trivial(value):
            raise NotImplementedError(
                f"model type {'/'.join(sorted(t for t in types if t))} has {attr}={value}: a transform of its logits "
                "that the chunked log-prob pass does not know; it computes softcap(scale * lm_head(hidden)) only"
            )
    return LogitTransform(scale, softcap)


def check_model_supported(model) -> None:
    """Refuse architectures whose logits are a transform of ``lm_head(last_hidden_state)``
    the log-prob pass does not apply (``logit_transform``)."""
    logit_transform(model)


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
                                       _device_layout(segment_layout(lens[:1], prompts[:1]), device), chunk=3).logps
            packed = packed_token_logps(model, torch.cat(segs), torch.arange(_PROBE_LEN, device=device).repeat(
                len(segs)), _device_layout(segment_layout(lens, prompts), device), chunk=3).logps
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


def _device_layout(layout: SegmentLayout, device) -> SegmentLayout:
    return SegmentLayout(*(x.to(device) for x in (layout.seg_ids, layout.targets, layout.target_seg, layout.sources)),
                         layout.num_segments, layout.blocks)
