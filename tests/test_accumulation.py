"""Gradient accumulation adds the micro-batches' gradients under every ZeRO stage.

DeepSpeed's ZeRO optimizers move their micro-step counter on in ``engine.forward``; at
micro-step 0 a backward's gradient replaces the one accumulated so far. The log-prob pass
runs as ``engine(row)`` (pipeline/training/forward.py), so the counter moves. ZeRO-0 has no
such counter (torch's autograd adds into ``.grad``): the reference here. The matrix of
stages, offload and accumulation with small buckets: tests/test_engine_matrix.py."""

import pytest

from helpers import tiny_config, train_metrics
from pipeline import runner

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_zero2_and_zero3_accumulate_as_zero0(assets, tmp_path):
    train = {"gradient_accumulation_steps": 3, "max_steps": 4, "eval_steps": 100, "learning_rate": 3e-3,
             "warmup_ratio": 0.0, "max_grad_norm": 1e9}
    losses = {}
    for stage in (0, 2, 3):
        cfg = tiny_config(assets, tmp_path / "run", tokenize={"max_tokens_per_row": 256},
                          train=dict(train, zero_stage=stage))
        runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)
        losses[stage] = [(r["loss"], r["grad_norm"]) for r in train_metrics(cfg) if "loss" in r]
    assert len(losses[3]) == 4
    for stage in (2, 3):  # the losses after each update: the update used every micro-batch
        for step, ((want, _), (got, _)) in enumerate(zip(losses[0], losses[stage]), 1):
            assert got == pytest.approx(want, abs=1e-6), (stage, step)
    # the step's gradient norm, every micro-batch's gradient summed (ZeRO-0 reports none)
    assert [n for _, n in losses[2]] == pytest.approx([n for _, n in losses[3]], rel=1e-5)
