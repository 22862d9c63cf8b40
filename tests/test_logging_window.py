"""train.logging_steps > 1 logs the means over each window, as TRL does, and every step
still counts in the totals (rows, tokens) of the manifest."""

import json
from pathlib import Path

import pytest

from helpers import tiny_config
from pipeline import runner
from pipeline.core.rundir import read_manifest
from pipeline.training.metrics import window_record


def test_a_window_record_sums_counts_and_averages_the_rest():
    window = [{"step": 2, "epoch": 0.2, "learning_rate": 1e-3, "loss": 0.6, "grad_norm": 2.0, "rows": 2,
               "pairs": 5, "tokens": 100, "tokens_per_second": 50.0},
              {"step": 3, "epoch": 0.3, "learning_rate": 2e-3, "loss": 0.4, "grad_norm": 4.0, "rows": 3,
               "pairs": 7, "tokens": 300, "tokens_per_second": 100.0}]
    assert window_record(window, ("rows", "pairs", "tokens")) == {
        "step": 3, "epoch": 0.3, "learning_rate": 2e-3,  # the last step's
        "loss": 0.5, "grad_norm": 3.0,  # means over the window
        "rows": 5, "pairs": 12, "tokens": 400,  # summed
        "tokens_per_second": 400 / (100 / 50 + 300 / 100),  # 80: tokens over the window's time
    }


@pytest.mark.slow  # DeepSpeed starts numactl
def test_logging_steps_logs_window_means_and_counts_every_step(assets, tmp_path):
    def run(name, every):
        cfg = tiny_config(assets, tmp_path / name, tokenize={"max_tokens_per_row": 256},
                          train={"max_steps": 7, "logging_steps": every, "eval_steps": 100, "num_workers": 1})
        result = runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)
        out = Path(result["train"]["dir"])
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        return records, read_manifest(out)["stats"]

    each, each_stats = run("each", 1)
    windowed, windowed_stats = run("windowed", 3)
    assert [r["step"] for r in windowed] == [1, 3, 6, 7]  # the first, every 3rd, the last
    by_step = {r["step"]: r for r in each}
    for record, steps in zip(windowed, ([1], [2, 3], [4, 5, 6], [7])):
        assert record["loss"] == pytest.approx(sum(by_step[s]["loss"] for s in steps) / len(steps), abs=1e-12)
        assert record["tokens"] == sum(by_step[s]["tokens"] for s in steps)
    assert (windowed_stats["rows"], windowed_stats["tokens"]) == (each_stats["rows"], each_stats["tokens"])
