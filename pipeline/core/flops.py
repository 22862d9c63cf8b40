"""The arithmetic of the log-prob pass: FLOPs of a packed row, for ``mfu`` and ``pipeline plan``.

Model FLOPs, as PaLM's MFU counts them (not the hardware's: gradient checkpointing's
recomputation is not counted), of the pass this pipeline runs:

- a matmul weight of k x m elements costs 2·k·m FLOPs per token forward. The decoder's
  weights (``body``: every parameter but the embedding table and the LM head; its norm
  weights, under 0.1% of it, are counted as if they were matmul weights) run on every
  token of the row; the LM head (vocab x hidden) only on the scored tokens (the
  completions), as ``logps.packed_token_logps`` computes it; the embedding is a lookup.
- attention: q·kᵀ and p·v cost 2·d each per (query, key) pair the query sees, per layer,
  d = heads x head_dim. A segment of n tokens after p keys of a shared prompt, causal,
  has n·p + n(n+1)/2 pairs (``attention_pairs``).
- backward: twice the forward for a trained weight (the gradients of its input and of
  itself), once for a frozen one (LoRA's base: the input's only), twice for attention.
  A train step is forward + backward; score is one forward.

Pure Python on ints; the shape comes from a model config (``ModelShape.of``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class ModelShape:
    params: int  # every parameter, a tied embedding/LM head table once
    vocab: int
    hidden: int
    layers: int
    attn_dim: int  # query heads x head_dim
    tied: bool

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def body_params(self) -> int:
        """The decoder's parameters: all but the embedding table and the LM head."""
        return self.params - self.head_params * (1 if self.tied else 2)

    @classmethod
    def of(cls, config, params: int) -> "ModelShape":
        """From a transformers config (its text config for a multimodal one) and the
        parameter count."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(params=params, vocab=config.vocab_size, hidden=config.hidden_size,
                   layers=config.num_hidden_layers, attn_dim=heads * head_dim,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))


EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def experts(config) -> int | None:
    """A mixture of experts' expert count (its text config's), or None for a dense model."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return next((int(n) for n in (getattr(config, k, None) for k in EXPERT_KEYS) if isinstance(n, int) and n > 1), None)


def dense_shape(config, params: int) -> ModelShape | None:
    """The shape the FLOPs count reads, or None for a mixture of experts, whose tokens pass
    through top-k of its experts' weights, not all of them (no mfu is counted for it)."""
    return None if experts(config) else ModelShape.of(config, params)


def attention_pairs(blocks: Iterable[tuple[int, int, int, int]]) -> int:
    """(query, key) pairs of a packed row's causal attention: ``blocks`` as
    ``SegmentLayout.blocks``, (start, end, prefix_start, prefix_end) per segment."""
    total = 0
    for a, b, pa, pb in blocks:
        n, p = b - a, pb - pa
        total += n * p + n * (n + 1) // 2
    return total


@dataclass(frozen=True)
class RowWork:
    """What a packed row asks of the model: its tokens, the tokens the LM head scores and
    its attention's (query, key) pairs."""

    tokens: int
    scored: int
    pairs: int


def row_work(seq_lens, prompt_lens) -> RowWork:
    """A packed row's work from its stored segment and prompt lengths (a rejected segment
    of prompt length 0 shares its chosen segment's prompt: ``segments.segment_layout``)."""
    seq_lens, prompt_lens = [int(n) for n in seq_lens], [int(p) for p in prompt_lens]
    pairs = scored = 0
    for s, (n, p) in enumerate(zip(seq_lens, prompt_lens)):
        prefix = prompt_lens[s - 1] if p == 0 else 0
        pairs += n * prefix + n * (n + 1) // 2
        scored += n - p
    return RowWork(tokens=sum(seq_lens), scored=scored, pairs=pairs)


def forward_flops(shape: ModelShape, work: RowWork) -> int:
    """2·body·tokens + 2·vocab·hidden·scored + 4·d·layers·pairs."""
    return (2 * shape.body_params * work.tokens + 2 * shape.head_params * work.scored
            + 4 * shape.attn_dim * shape.layers * work.pairs)


def train_flops(shape: ModelShape, work: RowWork, frozen_base: bool = False) -> int:
    """Forward + backward. ``frozen_base``: LoRA, whose base weights (and LM head) get no
    gradient, so their backward is one forward's worth; its adapters are not counted."""
    forward = forward_flops(shape, work)
    attention = 4 * shape.attn_dim * shape.layers * work.pairs
    weights = forward - attention
    return forward + (weights if frozen_base else 2 * weights) + 2 * attention


# Dense peak TFLOP/s of one device, without sparsity, from the vendors' data sheets: bf16/fp16
# on tensor cores; float32 without TF32 (the pipeline does not enable TF32, so fp32 matmuls
# run on the CUDA cores). A name matches when it is a substring of
# torch.cuda.get_device_name(); the first match wins.
PEAK_TFLOPS = (
    ("H200 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 60.0}),
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 60.0}),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),  # SXM
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("L40S", {"bfloat16": 362.0, "float16": 362.0, "float32": 91.6}),
    ("A10G", {"bfloat16": 70.0, "float16": 70.0, "float32": 31.2}),
)


def known_peak_tflops(device_name: str, dtype: str) -> float | None:
    for name, peaks in PEAK_TFLOPS:
        if name in device_name:
            return peaks.get(dtype)
    return None


def mfu(flops: float, seconds: float, devices: int, peak_tflops: float) -> float:
    """The fraction of ``devices`` devices' peak that ``flops`` in ``seconds`` used."""
    return flops / max(seconds, 1e-12) / (devices * peak_tflops * 1e12)
