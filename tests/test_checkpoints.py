"""Checkpoints that can be trusted: complete only when what they imply is on disk."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli, tiny_config, train_metrics, write_config
from pipeline import runner
from pipeline.demo import make_pairs, write_jsonl
from pipeline.core.storage import Loc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def uri_config(assets, tmp_path, name="run", **train):
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_jsonl(make_pairs(400, seed=8), data)
    return tiny_config(assets, f"file://{tmp_path / name}", data_file=data, tokenize={"max_tokens_per_row": 256},
                       train={"max_steps": 10, "save_steps": 5, "eval_steps": 1000, "num_workers": 1, **train})


def test_a_crash_while_uploading_metrics_leaves_no_complete_checkpoint(assets, tmp_path):
    """Rank 0 uploads metrics.jsonl before it writes COMPLETE.json: a process killed in the
    upload leaves the checkpoint incomplete, so the rerun starts over and logs every step.
    (Marked complete first, the rerun resumed at step 5 with steps 1-5 missing from the log.)"""
    cfg = uri_config(assets, tmp_path)
    path = write_config(cfg, tmp_path / "c.yaml")
    probe = subprocess.run([sys.executable, str(Path(__file__).parent / "sync_kill_probe.py"), str(path)],
                           capture_output=True, text=True, timeout=600)
    assert probe.returncode == -signal.SIGKILL, probe.stderr[-2000:]
    out = Loc(runner.plan_stages(cfg)["train"].dir)
    assert (out / "checkpoints" / "step-00000005").is_dir()  # every rank's part was written
    assert not (out / "checkpoints" / "step-00000005" / "COMPLETE.json").is_file()

    proc = run_cli(path)
    assert "resumed from" not in proc.stdout
    steps = [r["step"] for r in train_metrics(cfg) if "loss" in r]
    assert steps == list(range(1, 11))
