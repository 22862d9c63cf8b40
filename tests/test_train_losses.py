"""Losses on the real tiny model, in-process: offline reference == live reference, and every
loss type trains (step-0 value, finite gradients, the loss moves)."""

import copy
import math

import pytest
import torch

from helpers import tiny_config
from pipeline.core.config import build_loss, config_from_dict, to_dict
from pipeline.demo import make_pairs, write_jsonl
from pipeline.core.logps import packed_token_logps
from pipeline.core.segments import segment_layout
from pipeline.core.losses import LOSSES
from pipeline.core.modeling import load_causal_lm, row_tensors
from stages import score
from pipeline.tokenizing import tokenize
from pipeline.core.rows import RowReader, split_files
from stages.train import preference_objective
from test_losses import STEP0


@pytest.fixture(scope="module")
def scored(assets, tmp_path_factory):
    """Tokenized and scored rows of 200 demo pairs (the stages' cores, no Ray)."""
    root = tmp_path_factory.mktemp("scored")
    write_jsonl(make_pairs(200, seed=5), root / "pairs.jsonl")
    cfg = tiny_config(assets, root / "run", data_file=root / "pairs.jsonl", tokenize={"max_tokens_per_row": 256})
    tok_dir, score_dir = root / "tok", root / "score"
    tok_dir.mkdir()
    score_dir.mkdir()
    shards, _ = tokenize.run_in_process(cfg, tok_dir)
    manifest = {"shards": [s.__dict__ for s in shards]}
    score.run_in_process(cfg, tok_dir, manifest, score_dir)
    return cfg, RowReader(split_files(score_dir, "train"))


def with_train(cfg, **train):
    raw = to_dict(cfg)
    raw["train"].update(train)
    return config_from_dict(raw)


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_offline_reference_equals_live_reference(scored):
    """N AdamW steps on the stored reference columns == the same steps with the reference
    model run live each step: same losses, same gradients (fp32)."""
    cfg, rows = scored
    ref_model = load_causal_lm(cfg.model.path, cfg.model).eval()
    offline = load_causal_lm(cfg.model.path, cfg.model)
    online = copy.deepcopy(offline)
    opt_off = torch.optim.AdamW(offline.parameters(), lr=1e-3)
    opt_on = torch.optim.AdamW(online.parameters(), lr=1e-3)
    for step in range(4):
        row = rows[step]
        t = row_tensors(row)
        with torch.no_grad():
            live = packed_token_logps(ref_model, t["input_ids"], t["position_ids"],
                                      segment_layout(t["seq_lens"], t["prompt_lens"])).logps
        objective = preference_objective(cfg)
        out_off = objective.pairs(offline, row, "cpu").loss
        out_on = objective.pairs(online, dict(row, ref_logps=live.tolist()), "cpu").loss
        for opt, out in ((opt_off, out_off), (opt_on, out_on)):
            opt.zero_grad()
            out.losses.mean().backward()
        assert out_off.losses.tolist() == pytest.approx(out_on.losses.tolist(), abs=1e-6)
        assert torch.allclose(grads(offline), grads(online), atol=1e-6)
        if step == 0:
            assert out_off.losses.mean().item() == pytest.approx(math.log(2), abs=1e-6)
        opt_off.step()
        opt_on.step()
    assert out_off.losses.mean().item() < math.log(2)  # and it trained


SETTINGS = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.1}}


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_each_loss_trains_a_few_steps(scored, loss_type):
    cfg, rows = scored
    cfg = with_train(cfg, loss_type=loss_type, **SETTINGS.get(loss_type, {}))
    model = load_causal_lm(cfg.model.path, cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    values = []
    objective = preference_objective(cfg)
    for _ in range(4):
        loss = objective.pairs(model, rows[0], "cpu").loss.losses.mean()
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        values.append(loss.item())
        opt.step()
    if loss_type in STEP0:  # reference losses: each one's own value at policy == reference
        assert values[0] == pytest.approx(STEP0[loss_type], abs=1e-5)
    assert build_loss(cfg.train).needs_reference == (not LOSSES[loss_type].reference_free)
    assert values[-1] != values[0] and all(math.isfinite(v) for v in values)


def test_regularisers_train(scored):
    cfg, rows = scored
    for train in ({"use_weighting": True}, {"ld_alpha": 0.5}, {"rpo_alpha": 0.5}, {"aggregation": "mean"},
                  {"f_divergence_type": "js_divergence"}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1, 0.2]},
                  {"reference_free": True}):
        c = with_train(cfg, **train)
        model = load_causal_lm(c.model.path, c.model)
        out = preference_objective(c).pairs(model, rows[0], "cpu").loss
        out.losses.mean().backward()
        assert math.isfinite(out.losses.mean().item()), train
        if "ld_alpha" in train or "aggregation" in train or "f_divergence_type" in train:
            assert out.losses.mean().item() == pytest.approx(math.log(2), abs=1e-6), train
