"""Judging completions with a reward model: each completion's reward, then win rates with
95% Wilson intervals over prompts (ties count half). Pure arithmetic below the model."""

from __future__ import annotations

import math

import numpy as np
import torch

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` over ``n`` trials."""
    if n == 0:
        return math.nan, math.nan
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def win_rate(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """``ours``, ``theirs``: rewards, (prompts, samples) each, or (prompts, 1) for one side
    (the dataset's chosen answer) broadcast over the other's samples. A prompt scores the
    mean over its samples of 1 (ours higher), 1/2 (equal), 0 (lower); the win rate is the
    mean over prompts, its interval Wilson's over the number of prompts."""
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    per_prompt = ((ours > theirs) + 0.5 * (ours == theirs)).mean(axis=1)
    p, n = float(per_prompt.mean()), int(per_prompt.size)
    lo, hi = wilson(p, n)
    return {"win_rate": p, "ci95": [lo, hi], "prompts": n}


class RewardModel:
    """A sequence-classification model scoring prompt + completion, as text through its own
    tokenizer (its template and vocabulary may differ from the policy's): the prompt as the
    policy saw it (its chat markup kept), then the completion."""

    def __init__(self, path: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"generate.reward_model: {path} has {self.model.config.num_labels} labels; a reward "
                             "model has one (a scalar score)")
        self.device = device

    @torch.inference_mode()
    def score(self, prompt: str, completion: str) -> float:
        ids = self.tokenizer(prompt + completion, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return float(self.model(input_ids=ids.to(self.device)).logits[0, 0].float())
