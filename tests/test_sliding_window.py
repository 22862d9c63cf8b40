"""Sliding-window attention in packed rows (docs/design.md, "Packed rows and attention"):
segment_sdpa and the dense mask of shared-prompt rows apply the model's window as
transformers does (``masking_utils.sliding_window_overlay``: query i sees key j when
i - window < j <= i), in the segment's own positions.

The references are plain forwards of each (prompt + completion) sequence alone through an
``eager`` copy of the same weights, with transformers' own sliding-window mask.
"""

import pytest
import torch

from helpers import shared_and_unshared_rows

from pipeline.core.config import ModelConfig
from pipeline.core.segments import attention_mask, segment_layout
from pipeline.core.logps import packed_token_logps
from pipeline.core.modeling import load_causal_lm, row_inputs

WINDOW = 8
# (prompt, chosen, rejected): most sequences are 20 tokens, well past the window; one pair
# is shorter than it, and one prompt alone is longer.
PAIRS = [(5, 15, 15), (12, 8, 8), (3, 17, 10), (2, 3, 4), (10, 10, 6)]


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=WINDOW, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mistral")
    MistralForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen2_mixed_dir(tmp_path_factory):
    """Qwen2 with use_sliding_window and max_window_layers=1: layer 0 full attention,
    layers 1 and 2 sliding (config.layer_types)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=False)
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    """Gemma-3 text with a sliding then a full-attention layer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                           sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                           bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("gemma3")
    Gemma3ForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """Gemma-2 (eager only in transformers, attention soft-capping on): sliding and full
    layers alternate."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                       sliding_window=WINDOW, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    assert cfg.layer_types == ["sliding_attention", "full_attention"]
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("gemma2")
    Gemma2ForCausalLM(cfg).save_pretrained(path)
    return path


def reference_logps(model_dir, pairs_row):
    """Completion log-probs of every (prompt + side) sequence alone, in the unshared row's
    target order, from transformers' eager attention with its own sliding-window mask."""
    from transformers import AutoModelForCausalLM

    separate = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    ids = torch.tensor(pairs_row["input_ids"])
    out, offset = [], 0
    with torch.no_grad():
        for n, p in zip(pairs_row["seq_lens"], pairs_row["prompt_lens"]):
            seq = ids[offset:offset + n]
            logits = separate(input_ids=seq[None], use_cache=False).logits[0].double()
            out.append(torch.log_softmax(logits[:-1], -1).gather(-1, seq[1:, None]).squeeze(-1)[p - 1:])
            offset += n
    return torch.cat(out)


ATTNS = ["segment_sdpa", "sdpa", "eager"]


@pytest.mark.parametrize("model, attn", [*(("mistral", a) for a in ATTNS), *(("qwen2_mixed", a) for a in ATTNS),
                                         *(("gemma3", a) for a in ATTNS), ("gemma2", "eager")])
@pytest.mark.parametrize("share", [False, True])
def test_windowed_rows_equal_per_sequence_forwards(request, model, share, attn):
    """Packed rows, with shared prompts and without, give each sequence's log-probs alone,
    to 1e-5 in fp32, with one window on every layer (Mistral) and with sliding and full
    layers mixed (Qwen2, Gemma-2/3: the dense mask becomes one per layer type)."""
    model_dir = request.getfixturevalue(f"{model}_dir")
    unshared, shared = shared_and_unshared_rows(torch.Generator().manual_seed(7), PAIRS)
    want = reference_logps(model_dir, unshared)
    assert max(unshared["seq_lens"]) > WINDOW
    lm = load_causal_lm(str(model_dir), ModelConfig(path="x", attn_implementation=attn))
    ids, pos, layout = row_inputs(shared if share else unshared, "cpu")
    with torch.no_grad():
        got = packed_token_logps(lm, ids, pos, layout, chunk=16).logps[layout.targets]
    diff = (got.double() - want).abs().max().item()
    assert diff < 1e-5, diff


def test_windowed_dense_mask_worked_example():
    """Window 3. Pair 1: prompt 2 + chosen 3 as [p p c c c], rejected [r r] at positions 2,
    3 over the prompt; segment 3 stands alone. A query at position i sees keys at positions
    i-2 .. i: the rejected token at position 3 no longer sees the first prompt token."""
    layout = segment_layout(torch.tensor([5, 2, 4]), torch.tensor([2, 0, 1]))
    mask = attention_mask(layout, 11, window=3).int()
    assert mask[:7, :7].tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],  # position 2: prompt 0, 1 and itself
        [0, 1, 0, 0, 0, 1, 1],  # position 3: prompt 1, rejected 2 and itself
    ]
    assert mask[7:, 7:].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
    assert mask[7:, :7].sum() == 0 and mask[:7, 7:].sum() == 0
    assert torch.equal(attention_mask(layout, 11, window=100), attention_mask(layout, 11))


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("window", [1, 3, 6])
def test_segment_sdpa_window_equals_the_dense_mask_with_grads(share, window):
    """Attention output and q/k/v gradients of segment_sdpa's windowed blocks against
    SDPA with the dense windowed mask, in float64 (GQA included)."""
    from pipeline.core.attention import segment_sdpa_forward

    lens, prompts = [9, 4, 13, 6, 3, 2], [3, 0, 5, 0, 1, 1]
    if not share:
        prompts = [3, 2, 5, 4, 1, 1]
    layout = segment_layout(torch.tensor(lens), torch.tensor(prompts))
    g = torch.Generator().manual_seed(5)
    T = sum(lens)
    q, k, v = (torch.randn(1, h, T, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    got, _ = segment_sdpa_forward(torch.nn.Module(), q, k, v, None, scaling=0.3, position_ids=torch.zeros(1, T),
                                  segment_blocks=layout.blocks, sliding_window=window)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(layout, T, window),
                                                           scale=0.3, enable_gqa=True).transpose(1, 2)
    assert torch.allclose(got, ref, atol=1e-12)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(*(torch.autograd.grad((out * w).sum(), (q, k, v)) for out in (got, ref))):
        assert torch.allclose(a, b, atol=1e-12)


class _Attn(torch.nn.Module):
    def __init__(self, config, layer_idx, **attrs):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        for name, value in attrs.items():
            setattr(self, name, value)


def test_layer_window_reads_the_window_as_transformers_models_carry_it():
    from types import SimpleNamespace

    from pipeline.core.attention import layer_window

    mistral = SimpleNamespace(sliding_window=8)
    mixed = SimpleNamespace(sliding_window=8, layer_types=["full_attention", "sliding_attention"])
    assert layer_window(_Attn(mistral, 0), {"sliding_window": 8}) == 8  # the keyword (Mistral, Phi-3)
    assert layer_window(_Attn(mixed, 0), {"sliding_window": None}) is None  # Gemma-2 / Qwen2 full layer
    assert layer_window(_Attn(mixed, 1), {"sliding_window": 8}) == 8
    assert layer_window(_Attn(mixed, 1, sliding_window=8), {}) == 8  # Qwen2-MoE: attribute, no keyword
    assert layer_window(_Attn(mixed, 0), {}) is None  # ... and none on its full layers
    assert layer_window(_Attn(mistral, 0), {}) == 8  # PhiMoE: the config, as its mask reads it
    assert layer_window(_Attn(SimpleNamespace(), 0), {}) is None  # Llama
    with pytest.raises(NotImplementedError, match="chunked_attention"):
        layer_window(_Attn(SimpleNamespace(layer_types=["chunked_attention"]), 0), {})


def test_the_varlen_call_is_not_used_where_a_window_cuts_a_segment(monkeypatch):
    """The one-call varlen path would ignore the window: rows with a segment longer than
    the layer's window take the per-segment loop; others keep the one call."""
    import pipeline.core.attention as attention

    calls = []
    monkeypatch.setattr(attention, "varlen_usable", lambda query, dropout=0.0: True)
    monkeypatch.setattr(attention, "varlen_forward", lambda q, k, v, plan, scaling: calls.append(plan) or q.transpose(1, 2))
    blocks = [(0, 6, 0, 0), (6, 9, 0, 2)]  # keys of the second block: prompt 2 + its own 3
    q = torch.randn(1, 4, 9, 8)
    plan = attention.varlen_plan(blocks)
    for window, varlen in ((7, True), (6, True), (5, False), (None, True)):
        calls.clear()
        attention.segment_sdpa_forward(torch.nn.Module(), q, q, q, None, position_ids=torch.zeros(1, 9),
                                       segment_blocks=blocks, segment_varlen=plan, sliding_window=window)
        assert bool(calls) == varlen, window
