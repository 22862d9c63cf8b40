"""The model FLOPs of a packed row and the mfu made of them (pipeline/core/flops.py), the
arithmetic written out; and the train stage's logged mfu adding up to its rows' FLOPs."""

import json
from pathlib import Path

import pytest

from pipeline.core.flops import ModelShape, RowWork, forward_flops, mfu, row_work, train_flops

# 1,000 parameters, untied 10 x 4 embedding and LM head: body = 1000 - 2 x 40 = 920
SHAPE = ModelShape(params=1000, vocab=10, hidden=4, layers=2, attn_dim=4, tied=False)


def test_a_rows_work_counts_its_tokens_scored_tokens_and_attention_pairs():
    # a chosen segment of 5 tokens (prompt 2) and its rejected one of 3 sharing that prompt
    work = row_work([5, 3], [2, 0])
    # scored: 5 - 2 = 3 completion tokens, then all 3 of the shared-prompt segment
    # pairs: causal 5·6/2 = 15; the rejected segment sees the 2 prompt keys and itself: 3·2 + 3·4/2 = 12
    assert work == RowWork(tokens=8, scored=6, pairs=27)
    assert row_work([4, 4], [1, 1]) == RowWork(tokens=8, scored=6, pairs=10 + 10)


def test_forward_and_train_flops_worked_by_hand():
    work = RowWork(tokens=8, scored=6, pairs=27)
    assert SHAPE.body_params == 920 and SHAPE.head_params == 40
    # 2 x 920 x 8 (decoder, every token) + 2 x 40 x 6 (LM head, scored tokens) + 4 x 4 x 2 x 27 (attention)
    assert forward_flops(SHAPE, work) == 14720 + 480 + 864 == 16064
    # backward twice the forward: 3 x
    assert train_flops(SHAPE, work) == 3 * 16064 == 48192
    # LoRA: the frozen weights' backward is once their forward (16064 - 864), attention's twice
    assert train_flops(SHAPE, work, frozen_base=True) == 16064 + 15200 + 2 * 864 == 32992
    # a tied table is one parameter set: body = 1000 - 40
    assert ModelShape(1000, 10, 4, 2, 4, tied=True).body_params == 960


def test_mfu_is_flops_over_seconds_over_the_devices_peak():
    # 1e12 FLOPs in 2 s on 4 devices of 0.5 TFLOP/s: 0.5e12 / 2e12
    assert mfu(1e12, 2.0, 4, 0.5) == 0.25


def test_a_models_shape_from_its_config(assets):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_config(config)
    shape = ModelShape.of(config, sum(p.numel() for p in model.parameters()))
    # the demo's Llama: 2 layers of hidden 64, 4 heads of 16, an untied 512-token vocabulary
    assert (shape.vocab, shape.hidden, shape.layers, shape.attn_dim, shape.tied) == (512, 64, 2, 64, False)
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n or n.endswith("model.norm.weight"))
    assert shape.body_params == layers


@pytest.mark.slow
def test_the_logged_mfu_adds_up_to_the_rows_flops(assets, tmp_path):
    """The demo's train stage in one process, device.peak_tflops given: each step's mfu times
    its seconds and the peak is that step's FLOPs, and over the epoch they sum to the
    FLOPs of every train row once (the plan takes each row once an epoch)."""
    from helpers import tiny_config

    from pipeline import runner
    from pipeline.core.rows import RowReader, split_files
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny_config(assets, tmp_path / "run", train={"num_workers": 1, "report_to": [], "eval_steps": 1000},
                      device={"peak_tflops": 0.001}, score={"actors": 1})
    results = runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)
    steps = [json.loads(line) for line in (Path(results["train"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "mfu" in m]
    assert len(steps) == cfg.train.num_train_epochs * results["train"]["stats"]["steps"] > 0
    logged = sum(m["mfu"] * (m["tokens"] / m["tokens_per_second"]) * 0.001e12 for m in steps)
    config = AutoConfig.from_pretrained(assets["model"])
    shape = ModelShape.of(config, sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()))
    rows = RowReader(split_files(runner.plan_stages(cfg)["score"].dir, "train"))
    expected = sum(train_flops(shape, row_work(rows[i]["seq_lens"], rows[i]["prompt_lens"])) for i in range(rows.num_rows))
    assert logged == pytest.approx(expected, rel=1e-9)
    assert all(0 < m["mfu"] for m in steps)
    assert "mfu" in results["score"]["stats"]  # the score stage's, over its actors' seconds


def test_a_logging_windows_mfu_is_over_its_seconds():
    """Two steps logged as one record: 1 s at mfu 0.1 and 3 s at 0.3 make 1 / 4 x 0.1 + 3 / 4 x
    0.3 = 0.25 (the FLOPs over the seconds, as the throughput), not their mean 0.2."""
    from pipeline.training.metrics import window_record

    window = [{"step": 1, "tokens": 100, "tokens_per_second": 100.0, "mfu": 0.1},
              {"step": 2, "tokens": 300, "tokens_per_second": 100.0, "mfu": 0.3}]
    record = window_record(window, ("tokens",))
    assert record["mfu"] == pytest.approx(0.25) and record["tokens_per_second"] == pytest.approx(100.0)
