"""data.eval_fraction: 0 means no eval split: no eval records (not an eval loss of 0), no
eval curve, and a summary that says so."""

import json
from pathlib import Path

import pytest

from helpers import tiny_config
from pipeline import runner


@pytest.mark.slow  # DeepSpeed starts numactl
def test_a_run_without_an_eval_split_logs_and_reports_no_eval(assets, tmp_path):
    cfg = tiny_config(assets, tmp_path / "run", data={"eval_fraction": 0.0}, tokenize={"max_tokens_per_row": 256},
                      train={"max_steps": 3, "eval_steps": 1, "num_workers": 1})
    results = runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)
    out = Path(results["train"]["dir"])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert not any(k.startswith("eval_") for r in records for k in r)
    summary = runner.format_summary(results)
    assert "no eval split (data.eval_fraction: 0)" in summary and "final eval" not in summary
    report = (Path(cfg.run_dir) / "report" / "report.md").read_text()
    assert "- no eval split (data.eval_fraction: 0), so no eval metrics" in report
    assert "final eval" not in report
