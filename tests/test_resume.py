"""Training survives a kill: N straight steps == N/2 steps + kill -9 + resume, step for step."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import run_cli, tiny_config, train_dir, train_metrics, write_config
from pipeline.demo import make_pairs, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def config_file(assets, tmp_path, name, **train):
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_jsonl(make_pairs(1200, seed=11), data)
    cfg = tiny_config(assets, tmp_path / name, data_file=data, tokenize={"max_tokens_per_row": 256},
                      train={"max_steps": 40, "save_steps": 5, "save_total_limit": 2, "eval_steps": 1000,
                             "learning_rate": 3e-3, **train})
    return write_config(cfg, tmp_path / f"{name}.yaml"), cfg


def losses(cfg):
    records = train_metrics(cfg)
    return {r["step"]: r["loss"] for r in records if "loss" in r}, records


def test_kill_and_resume_gives_the_same_losses(assets, tmp_path):
    straight, straight_cfg = config_file(assets, tmp_path, "straight")
    run_cli(straight)
    want, _ = losses(straight_cfg)
    assert sorted(want) == list(range(1, 41))

    killed, cfg = config_file(assets, tmp_path, "killed")
    out = train_dir(cfg)
    p = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(killed), "--no-ray"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and not list((out / "checkpoints").glob("step-*/COMPLETE.json")):
        assert p.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.02)
    pid = int((out / "workers" / "rank-0.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not (out / "_MANIFEST.json").exists()

    proc = run_cli(killed)
    assert "[tokenize] done already" in proc.stdout and "[score] done already" in proc.stdout
    resumed_at = int(proc.stdout.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert 5 <= resumed_at < 40
    got, records = losses(cfg)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))  # none repeated or skipped
    for step in range(1, 41):
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert len(kept) <= 2  # save_total_limit


def test_explicit_resume_from_a_missing_or_incomplete_checkpoint_fails(assets, tmp_path):
    path, cfg = config_file(assets, tmp_path, "run", max_steps=12)
    run_cli(path)
    proc = run_cli(path, "--stages", "train", "--force", "train.resume_from_checkpoint=step-00000099", check=False)
    assert proc.returncode != 0
    assert "train.resume_from_checkpoint: step-00000099 does not exist" in proc.stderr
    # a checkpoint whose ranks did not all finish has no COMPLETE marker
    path2, cfg2 = config_file(assets, tmp_path, "run2", max_steps=12)
    run_cli(path2)
    ckpt = sorted((train_dir(cfg2) / "checkpoints").glob("step-*"))[-1]
    (ckpt / "COMPLETE.json").unlink()
    proc = run_cli(path, "--stages", "train", "--force", f"train.resume_from_checkpoint={ckpt}", check=False)
    assert proc.returncode != 0 and "is incomplete (not every rank finished" in proc.stderr
    assert not (train_dir(cfg) / "_MANIFEST.json").exists()  # never a silent fresh start
