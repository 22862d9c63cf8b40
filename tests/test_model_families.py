"""Architectures whose logits are more than ``lm_head(hidden)`` (docs/design.md, "One
log-prob function"), and the load-time probe that refuses a model whose packed log-probs
differ from its own forward.

Every model here is a tiny random-init config built locally (no download), saved with
``save_pretrained`` and loaded through ``load_causal_lm``, as the score and train stages
load theirs.
"""

import pytest
import torch

from pipeline.core.config import ModelConfig
from pipeline.core.logps import lm_head_target_logps, packed_token_logps
from pipeline.core.segments import segment_layout
from pipeline.core.modeling import load_causal_lm

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)


def save_tiny(tmp_path, name, config_cls, model_cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = model_cls(config_cls(**SMALL, **kwargs))
    path = tmp_path / name
    model.save_pretrained(path)
    return str(path)


def granite(tmp_path):
    from transformers import GraniteConfig, GraniteForCausalLM

    return save_tiny(tmp_path, "granite", GraniteConfig, GraniteForCausalLM, logits_scaling=8.0,
                     embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3)


def cohere(tmp_path):
    from transformers import CohereConfig, CohereForCausalLM

    return save_tiny(tmp_path, "cohere", CohereConfig, CohereForCausalLM, logit_scale=0.25)


def gemma2(tmp_path):
    """Final-logit soft-capping at 1.5: the random logits reach past it, so the cap bends
    them. (transformers runs Gemma-2 with eager attention only.)"""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return save_tiny(tmp_path, "gemma2", Gemma2Config, Gemma2ForCausalLM, head_dim=8, final_logit_softcapping=1.5,
                     attn_logit_softcapping=None, initializer_range=0.2)


def gemma3(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return save_tiny(tmp_path, "gemma3", Gemma3TextConfig, Gemma3ForCausalLM, head_dim=8, final_logit_softcapping=1.5,
                     initializer_range=0.2)


def falcon_h1(tmp_path, ssm_out_multiplier=1.0):
    from transformers import FalconH1Config, FalconH1ForCausalLM

    return save_tiny(tmp_path, "falcon_h1", FalconH1Config, FalconH1ForCausalLM, lm_head_multiplier=0.37,
                     mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1,
                     mamba_chunk_size=8, ssm_out_multiplier=ssm_out_multiplier)


def own_logps(model, seg, prompt):
    """The model's own log-probs of seg's completion tokens: log_softmax of its logits."""
    logits = model(input_ids=seg[None], use_cache=False).logits[0].float()
    return logits.log_softmax(-1)[:-1].gather(-1, seg[1:, None]).squeeze(-1)[prompt - 1:]


def packed_vs_own(model, lens, prompts, seed=0):
    """Max |packed_token_logps - the model's own| over the segments of one packed row."""
    g = torch.Generator().manual_seed(seed)
    segs = [torch.randint(0, VOCAB, (n,), generator=g) for n in lens]
    layout = segment_layout(torch.tensor(lens), torch.tensor(prompts))
    with torch.no_grad():
        packed = packed_token_logps(model, torch.cat(segs), torch.cat([torch.arange(n) for n in lens]), layout,
                                    chunk=5).logps
        diff, offset = 0.0, 0
        for seg, p in zip(segs, prompts):
            got = packed[offset + p: offset + len(seg)]
            diff = max(diff, (got - own_logps(model, seg, p)).abs().max().item())
            offset += len(seg)
    return diff


ATTNS = ["segment_sdpa", "sdpa", "eager"]


@pytest.mark.parametrize("family, transform, attn", [  # transform: (scale, softcap)
    *((granite, (1 / 8.0, None), attn) for attn in ATTNS),
    *((cohere, (0.25, None), attn) for attn in ATTNS),
    *((gemma3, (1.0, 1.5), attn) for attn in ATTNS),
    (gemma2, (1.0, 1.5), "eager"),
])
def test_logit_transforms_give_the_models_own_logps(tmp_path, family, transform, attn):
    """Granite divides its logits by logits_scaling, Cohere multiplies them by logit_scale,
    Gemma-2/3 soft-cap them: the chunked pass applies each, and a packed row's log-probs are
    the model's own log_softmax(logits) per segment (the load-time probe passes)."""
    model = load_causal_lm(family(tmp_path), ModelConfig(path="x", attn_implementation=attn))
    diff = packed_vs_own(model, [11, 7, 16, 9], [3, 3, 5, 2])
    assert diff < 1e-5, diff
    from pipeline.core.logit_transforms import LogitTransform, logit_transform

    assert logit_transform(model) == LogitTransform(*transform)


def test_falcon_h1_lm_head_multiplier_and_its_refusal_for_packed_rows(tmp_path):
    """falcon_h1 multiplies its logits by lm_head_multiplier: applied, a row of one
    segment gives the model's own log-probs. Its mamba layers (the torch path on CPU) carry
    state and convolution across a packed row, so packed segments see each other: the probe
    refuses it when it loads, naming that reason. (With random weights the mamba branch is
    faint; ssm_out_multiplier makes it count, as it does in a trained model.)"""
    from transformers import AutoModelForCausalLM

    path = falcon_h1(tmp_path, ssm_out_multiplier=100.0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    assert packed_vs_own(model, [14], [3]) < 1e-5  # one segment: only the logit transform matters
    assert packed_vs_own(model, [7, 7], [2, 2]) > 5e-4  # the leak the probe refuses
    from pipeline.core.logit_transforms import LogitTransform, logit_transform

    assert logit_transform(model) == LogitTransform(scale=0.37)
    with pytest.raises(NotImplementedError, match=r"falcon_h1 .*falcon_h1.*segments of a packed row see each other"):
        load_causal_lm(path, ModelConfig(path="x", attn_implementation="sdpa"))


@pytest.mark.parametrize("family", [granite, gemma3])
def test_logit_transform_gradients_equal_the_models_own(tmp_path, family):
    """The training path: parameter gradients of the packed row's log-probs (the chunked
    backward with the transform) equal those of the model's own log_softmax(logits)."""
    model = load_causal_lm(family(tmp_path), ModelConfig(path="x"))
    g = torch.Generator().manual_seed(1)
    lens, prompts = [10, 7, 12], [3, 2, 4]
    segs = [torch.randint(0, VOCAB, (n,), generator=g) for n in lens]
    weights = [torch.rand(n - p, generator=g) for n, p in zip(lens, prompts)]
    layout = segment_layout(torch.tensor(lens), torch.tensor(prompts))
    grads = []
    for packed in (True, False):
        model.zero_grad()
        if packed:
            logps = packed_token_logps(model, torch.cat(segs), torch.cat([torch.arange(n) for n in lens]), layout,
                                       chunk=4).logps[layout.targets]
        else:
            logps = torch.cat([own_logps(model, seg, p) for seg, p in zip(segs, prompts)])
        (logps * torch.cat(weights)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].shape == grads[1].shape
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4), (grads[0] - grads[1]).abs().max()


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("scale, softcap", [(0.125, None), (1.0, 2.0), (3.0, 5.0)])
def test_chunked_transform_equals_naive_with_grads(chunk, scale, softcap):
    """Forward (log-probs, log sum p^2) and backward (hidden, weight, bias) of the chunked
    pass with a logit scale and soft-capping, against float64 autograd of the formula."""
    from pipeline.core.logit_transforms import LogitTransform

    transform = LogitTransform(scale, softcap)
    g = torch.Generator().manual_seed(0)
    hidden = (3 * torch.randn(13, 8, generator=g)).requires_grad_()
    head = torch.nn.Linear(8, 40, bias=True)
    targets = torch.randint(0, 40, (13,), generator=g)
    ours, sq, _ = lm_head_target_logps(head, hidden, targets, chunk, log_sum_sq=True, transform=transform)
    h64 = hidden.detach().double().requires_grad_()
    head64 = torch.nn.Linear(8, 40).double()
    head64.load_state_dict(head.state_dict())
    z = transform.scale * head64(h64)
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    logp64 = torch.log_softmax(z, -1)
    naive = logp64.gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(ours.double(), naive, atol=1e-6)
    assert torch.allclose(sq.double(), torch.logsumexp(2 * logp64, -1), atol=1e-6)
    w = torch.randn(13, generator=g)
    (ours * w).sum().backward()
    (naive * w.double()).sum().backward()
    for a, b in ((hidden.grad, h64.grad), (head.weight.grad, head64.weight.grad), (head.bias.grad, head64.bias.grad)):
        assert torch.allclose(a.double(), b, atol=1e-5), (a.double() - b).abs().max()


def test_an_unknown_logit_transform_is_refused(assets):
    """A config naming a logit transform of a model type the pass does not know."""
    from transformers import AutoModelForCausalLM

    from pipeline.core.logit_transforms import logit_transform

    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    model.config.lm_head_multiplier = 0.5
    with pytest.raises(NotImplementedError, match="lm_head_multiplier=0.5"):
        logit_transform(model)


def _ignore_position_ids(monkeypatch):
    """Remote code that drops position_ids: the decoder numbers the row's tokens 0..T-1,
    transformers sees no packing, and every segment attends to the ones before it."""
    from transformers.models.llama.modeling_llama import LlamaModel

    forward = LlamaModel.forward

    def without_positions(self, *args, position_ids=None, **kwargs):
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", without_positions)


def _causal_over_the_row(monkeypatch):
    """Remote code whose attention is its own causal SDPA over the whole sequence (no mask,
    no attention interface): packed segments see each other whatever the implementation."""
    from transformers.models.llama import modeling_llama

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = modeling_llama.apply_rotary_pos_emb(q, k, *position_embeddings)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                                               enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)


@pytest.mark.parametrize("attn, broken", [
    ("sdpa", _ignore_position_ids), ("eager", _ignore_position_ids),
    ("segment_sdpa", _causal_over_the_row), ("sdpa", _causal_over_the_row), ("eager", _causal_over_the_row),
])
def test_the_probe_refuses_a_model_whose_segments_see_each_other(assets, monkeypatch, attn, broken):
    broken(monkeypatch)
    with pytest.raises(NotImplementedError, match=r"model type llama \(.*model\): the packed log-prob pass differs"
                                                  r".*segments of a packed row see each other"):
        load_causal_lm(str(assets["model"]), ModelConfig(path="x", attn_implementation=attn))


def test_the_probe_refuses_an_unapplied_logit_transform(tmp_path, monkeypatch):
    """Were granite's logits_scaling unknown to the pass, the probe would catch it: the
    first segment alone already differs."""
    import pipeline.core.logps as logps

    monkeypatch.setattr(logps, "logit_transform", lambda model: logps.LogitTransform())
    with pytest.raises(NotImplementedError, match=r"model type granite .*more than lm_head\(hidden\)"):
        load_causal_lm(granite(tmp_path), ModelConfig(path="x"))


def test_the_probe_changes_nothing(assets):
    """No RNG draw, the train mode restored, no gradient left behind, same results after."""
    from pipeline.core.logps_probe import probe_packed_logps

    model = load_causal_lm(str(assets["model"]), ModelConfig(path="x"))
    model.train()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 500, (20,), generator=g)
    layout = segment_layout(torch.tensor([12, 8]), torch.tensor([4, 3]))
    pos = torch.cat([torch.arange(12), torch.arange(8)])
    before = packed_token_logps(model, ids, pos, layout).logps.detach()
    rng = torch.get_rng_state()
    diff = probe_packed_logps(model)
    assert 0 <= diff < 1e-5
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(packed_token_logps(model, ids, pos, layout).logps.detach(), before)


def test_no_probe_while_zero3_partitions_the_weights(assets, monkeypatch):
    """Under ZeRO-3 (parameters carry ``ds_id``) no plain forward can run before the
    DeepSpeed engine exists: load_causal_lm leaves the probe to the train engine."""
    import pipeline.core.modeling as modeling
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained

    def partitioned(*args, **kwargs):
        model = load(*args, **kwargs)
        for p in model.parameters():
            p.ds_id = 0
        return model

    def refuse(*args, **kwargs):
        raise AssertionError("probed a partitioned model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", partitioned)
    monkeypatch.setattr(modeling, "probe_packed_logps", refuse)
    model = load_causal_lm(str(assets["model"]), ModelConfig(path="x"))
    assert modeling.is_partitioned(model)
