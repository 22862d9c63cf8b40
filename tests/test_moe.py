"""MoE router load-balancing loss: equal to transformers' Mixtral function, wired into the
same log-prob pass, weighted as the model config (or train.router_aux_loss_coef) says."""

import pytest
import torch

from helpers import tiny_config
from pipeline.core.config import config_from_dict, to_dict
from pipeline.core.losses import router_load_balancing_loss
from pipeline.core.modeling import load_causal_lm, moe_router
from stages.train import preference_objective


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        output_router_logits=True, router_aux_loss_coef=0.02, max_position_embeddings=256)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mixtral")
    MixtralForCausalLM(cfg).save_pretrained(path)
    return path


def test_load_balancing_loss_equals_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(37, 8, generator=g) for _ in range(3))
    assert router_load_balancing_loss(logits, 8, 2).item() == pytest.approx(
        load_balancing_loss_func(logits, 8, 2, None).item(), abs=1e-7)


def row():
    g = torch.Generator().manual_seed(1)
    lens, prompts = [9, 7, 11, 6], [3, 3, 4, 4]
    return {"input_ids": torch.randint(3, 512, (sum(lens),), generator=g).tolist(),
            "position_ids": [i for n in lens for i in range(n)], "seq_lens": lens, "prompt_lens": prompts,
            "ref_logps": [0.0] * sum(lens), "num_tokens": sum(lens)}


def test_aux_loss_is_the_model_configs_weighted_router_loss(assets, mixtral_dir, tmp_path):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = tiny_config(assets, tmp_path)
    cfg.model.path = str(mixtral_dir)
    model = load_causal_lm(cfg.model.path, cfg.model)
    assert moe_router(model, None) == (0.02, 4, 2)
    batch = preference_objective(cfg).pairs(model, row(), "cpu")
    r = row()
    dec = model.get_decoder()(input_ids=torch.tensor([r["input_ids"]]), position_ids=torch.tensor([r["position_ids"]]),
                              use_cache=False, output_router_logits=True)
    want = 0.02 * load_balancing_loss_func(dec.router_logits, 4, 2, None)
    assert batch.aux_loss.item() == pytest.approx(want.item(), rel=1e-6)
    batch.aux_loss.backward()  # the router gets the gradient
    gates = [p.grad for n, p in model.named_parameters() if "gate" in n and "proj" not in n]
    assert gates and all(g is not None and g.abs().sum() > 0 for g in gates)


def test_router_coefficient_override(assets, mixtral_dir, tmp_path):
    cfg = tiny_config(assets, tmp_path)
    model = load_causal_lm(str(mixtral_dir), cfg.model)
    assert moe_router(model, 0.0) is None
    assert moe_router(model, 0.5) == (0.5, 4, 2)
    raw = to_dict(cfg)
    raw["model"]["path"] = str(mixtral_dir)
    raw["train"]["router_aux_loss_coef"] = 0.0
    batch = preference_objective(config_from_dict(raw)).pairs(model, row(), "cpu")
    assert batch.aux_loss is None
    dense = load_causal_lm(str(assets["model"]), cfg.model)
    assert moe_router(dense, 0.5) is None
