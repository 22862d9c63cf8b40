"""The generate stage's judge (stages/generate/judge.py) and prompts (prompts.py), with the
arithmetic written out: Wilson intervals, win rates with ties at half, and a tiny reward
model whose scores are worked by hand. Fast: no pipeline run."""

import math

import numpy as np
import pytest
import torch

from stages.generate.judge import RewardModel, wilson, win_rate
from stages.generate.prompts import pairs_of_row

Z = 1.959963984540054


def test_the_wilson_interval_worked_by_hand():
    # p = 5/6 over n = 3: z^2 = 3.841459
    # centre = (p + z^2 / 2n) / (1 + z^2 / n) = (0.833333 + 0.640243) / 2.280486 = 0.646168
    # half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
    #      = 0.859451 * sqrt(0.046296 + 0.106707) = 0.859451 * 0.391156 = 0.336180
    lo, hi = wilson(5 / 6, 3)
    assert lo == pytest.approx(0.646168 - 0.336180, abs=2e-6) and hi == pytest.approx(0.646168 + 0.336180, abs=2e-6)
    # p = 1/2 is the interval's centre; p = 0 and 1 keep it inside [0, 1]
    lo, hi = wilson(0.5, 100)
    assert (lo + hi) / 2 == pytest.approx(0.5) and hi - lo == pytest.approx(2 * Z / (1 + Z * Z / 100) *
                                                                             math.sqrt(0.25 / 100 + Z * Z / 40000))
    assert wilson(0.0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson(1.0, 10)[1] == pytest.approx(1.0)


def test_a_win_rate_counts_ties_half_and_averages_a_prompts_samples():
    ours = np.array([[2.0, 0.0], [1.0, 1.0], [-1.0, 3.0]])
    theirs = np.array([[1.0, 0.0], [1.0, 2.0], [0.0, 0.0]])
    # prompt 1: win, tie -> 0.75; prompt 2: tie, loss -> 0.25; prompt 3: loss, win -> 0.5; mean 0.5
    got = win_rate(ours, theirs)
    assert got["win_rate"] == 0.5 and got["prompts"] == 3 and got["ci95"] == list(wilson(0.5, 3))
    # one answer a prompt on the other side (the dataset's chosen) is compared with every sample
    assert win_rate(ours, np.array([[1.0], [1.0], [1.0]]))["win_rate"] == pytest.approx((0.5 + 0.5 + 0.5) / 3)


def test_a_tiny_reward_model_scores_worked_by_hand_and_its_win_rate(assets, tmp_path):
    """A sequence-classification Llama with no layers: a text's score is the score head on
    the RMS-normed embedding of its last token. Embeddings (a, b, 0, 0) with a^2 + b^2 = 4
    have mean square 1, so the score with head (1, 0, 0, 0) is a / sqrt(1 + eps): the
    completions ending in 'great', 'lamp' and 'awful' score 2, 0 and -2 (over sqrt(1 + eps))."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(assets["model"])
    prompt = tok.apply_chat_template([{"role": "user", "content": "What do you think of the lamp?"}],
                                     tokenize=False, add_generation_prompt=True)
    answers = {"great": "The lamp is great", "lamp": "I find the lamp", "awful": "The lamp is awful"}
    last = {w: tok(prompt + text, add_special_tokens=False)["input_ids"][-1] for w, text in answers.items()}
    assert len(set(last.values())) == 3
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=4, intermediate_size=8, num_hidden_layers=0,
                         num_attention_heads=1, num_key_value_heads=1, num_labels=1, pad_token_id=pad,
                         rms_norm_eps=1e-6)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 1] = 2.0  # every other token: score 0
        for word, a in (("great", 2.0), ("lamp", 0.0), ("awful", -2.0)):
            model.model.embed_tokens.weight[last[word]] = torch.tensor([a, math.sqrt(4 - a * a), 0.0, 0.0])
        model.score.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")

    judge = RewardModel(str(tmp_path / "rm"), torch.float32, torch.device("cpu"))
    scores = {w: judge.score(prompt, text) for w, text in answers.items()}
    unit = 1 / math.sqrt(1 + 1e-6)
    assert scores == pytest.approx({"great": 2 * unit, "lamp": 0.0, "awful": -2 * unit}, abs=1e-6)
    # three prompts: great vs awful (win), great vs great (tie), lamp vs awful (win): 2.5 / 3
    policy = np.array([[scores["great"]], [scores["great"]], [scores["lamp"]]])
    reference = np.array([[scores["awful"]], [scores["great"]], [scores["awful"]]])
    got = win_rate(policy, reference)
    assert got["win_rate"] == pytest.approx(5 / 6)
    assert got["ci95"] == pytest.approx([0.309988, 0.982347], abs=2e-6)  # worked above


def test_a_packed_row_gives_each_pair_its_prompt_and_answers():
    # pair a: chosen [1 2 | 3 4], rejected [1 2 | 5] (own prompt); pair b: chosen [6 | 7],
    # rejected with the prompt shared (prompt length 0): [8 9]
    ids = [1, 2, 3, 4, 1, 2, 5, 6, 7, 8, 9]
    got = pairs_of_row(ids, [4, 3, 2, 2], [2, 2, 1, 0], ["a", "b"])
    assert got == [("a", [1, 2], [3, 4], [5]), ("b", [6], [7], [8, 9])]
