"""Training survives a kill: N straight steps == N/2 steps + kill -9 + resume, step for step."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_config
from pipeline import runner
from pipeline.config import dump_yaml
from pipeline.demo import make_pairs, write_jsonl

pytestmark = pytest.mark.timeout(900)


def config_file(assets, tmp_path, name, **train):
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_jsonl(make_pairs(1200, seed=11), data)
    cfg = tiny_config(assets, tmp_path / name, data_file=data, tokenize={"max_tokens_per_row": 256},
                      train={"max_steps": 40, "save_steps": 5, "save_total_limit": 2, "eval_steps": 1000,
                             "learning_rate": 3e-3, **train})
    path = tmp_path / f"{name}.yaml"
    path.write_text(dump_yaml(cfg))
    return path, cfg


def run_cli(path, *extra, timeout=600):
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--no-ray", *extra],
                          capture_output=True, text=True, timeout=timeout)


def losses(train_dir):
    records = [json.loads(x) for x in (train_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}, records


def test_kill_and_resume_gives_the_same_losses(assets, tmp_path):
    straight, _ = config_file(assets, tmp_path, "straight")
    proc = run_cli(straight)
    assert proc.returncode == 0, proc.stderr[-2000:]
    straight_dir = next((tmp_path / "straight" / "train").iterdir())
    want, _ = losses(straight_dir)
    assert sorted(want) == list(range(1, 41))

    killed, cfg = config_file(assets, tmp_path, "killed")
    train_dir = Path(runner.plan_stages(cfg)["train"].dir)
    p = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(killed), "--no-ray"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and not list((train_dir / "checkpoints").glob("step-*/COMPLETE.json")):
        assert p.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.02)
    pid = int((train_dir / "workers" / "rank-0.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not (train_dir / "_MANIFEST.json").exists()

    proc = run_cli(killed)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[tokenize] done already" in proc.stdout and "[score] done already" in proc.stdout
    resumed_at = int(proc.stdout.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert 5 <= resumed_at < 40
    got, records = losses(train_dir)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))  # none repeated or skipped
    for step in range(1, 41):
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    kept = sorted(p.name for p in (train_dir / "checkpoints").glob("step-*"))
    assert len(kept) <= 2  # save_total_limit


def test_explicit_resume_from_a_missing_or_incomplete_checkpoint_fails(assets, tmp_path):
    path, cfg = config_file(assets, tmp_path, "run", max_steps=12)
    assert run_cli(path).returncode == 0
    train_dir = Path(runner.plan_stages(cfg)["train"].dir)
    proc = run_cli(path, "--stages", "train", "--force", "train.resume_from_checkpoint=step-00000099")
    assert proc.returncode != 0
    assert "train.resume_from_checkpoint: step-00000099 does not exist" in proc.stderr
    # a checkpoint whose ranks did not all finish has no COMPLETE marker
    path2, cfg2 = config_file(assets, tmp_path, "run2", max_steps=12)
    assert run_cli(path2).returncode == 0
    ckpt = sorted((Path(runner.plan_stages(cfg2)["train"].dir) / "checkpoints").glob("step-*"))[-1]
    (ckpt / "COMPLETE.json").unlink()
    proc = run_cli(path, "--stages", "train", "--force", f"train.resume_from_checkpoint={ckpt}")
    assert proc.returncode != 0 and "is incomplete (not every rank finished" in proc.stderr
    assert not (train_dir / "_MANIFEST.json").exists()  # never a silent fresh start
