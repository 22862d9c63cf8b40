import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import biased_qwen2, run_and_read_metrics, run_cli, tiny_config, train_metrics, write_config
from pipeline.demo import make_pairs, write_jsonl
from pipeline.training.engine import lr_lambda, param_groups


def test_linear_schedule_with_warmup_worked_numbers():
    f = lr_lambda("linear", warmup=2, total=10, min_ratio=0.0)
    assert [f(s) for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]


def test_cosine_schedule_decays_to_its_floor():
    f = lr_lambda("cosine", warmup=0, total=10, min_ratio=0.1)
    assert f(0) == pytest.approx(1.0)
    assert f(5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(10) == pytest.approx(0.1)


def test_constant_schedule_after_warmup():
    f = lr_lambda("constant", warmup=4, total=10, min_ratio=0.0)
    assert [f(s) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3  # linear bias, norm weight, norm bias


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bf16_checkpointing_rmsprop_accumulation_without_ray(assets, tmp_path):
    """The in-process path (no Ray, one rank) with the non-default numerics options."""
    data = tmp_path / "pairs.jsonl"
    write_jsonl(make_pairs(400, seed=3), data)
    cfg = tiny_config(assets, tmp_path / "run", data_file=data,
                      tokenize={"max_tokens_per_row": 256},
                      train={"optimizer": "rmsprop", "gradient_checkpointing": True,
                             "gradient_accumulation_steps": 2, "max_steps": 3,
                             "lr_scheduler_type": "linear", "warmup_steps": 1,
                             "learning_rate": 1e-3, "eval_steps": 100})
    cfg.model.dtype = "bfloat16"
    records = run_and_read_metrics(cfg, tmp_path)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # bf16 policy == bf16 reference
    # linear with 1 warmup step over 3 steps: multipliers 0, 1, 0.5
    assert [r["learning_rate"] for r in steps] == pytest.approx([0.0, 1e-3, 5e-4])
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in steps)
    assert steps[0]["rows"] == 2  # two packed rows per step (accumulation 2, one rank)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["dtype"] == "bfloat16"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("offloading", [True, False])
def test_activation_offloading_wraps_every_training_forward(assets, tmp_path, offloading):
    """Each training micro-batch's forward runs inside the offload context when the option
    is on (with gradient checkpointing too): the saved tensors pass through its hooks. On a
    host nothing moves (tests/test_gpu.py checks the copies on a GPU)."""
    data = tmp_path / "pairs.jsonl"
    write_jsonl(make_pairs(200, seed=6), data)
    cfg = tiny_config(assets, tmp_path / "run", data_file=data, tokenize={"max_tokens_per_row": 256},
                      train={"gradient_checkpointing": True, "activation_offloading": offloading,
                             "gradient_accumulation_steps": 2, "max_steps": 2, "eval_steps": 100})
    path = write_config(cfg, tmp_path / "c.yaml")
    probe_script = Path(__file__).parent / "offload_probe.py"
    proc = subprocess.run([sys.executable, str(probe_script), str(path)], capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["contexts"] == [offloading] * 4  # 2 steps x 2 micro-batches, eval not wrapped
    assert (probe["saved"] > 0) is offloading


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reference_free_loss_skips_the_score_stage(assets, tmp_path):
    data = tmp_path / "pairs.jsonl"
    write_jsonl(make_pairs(300, seed=4), data)
    cfg = tiny_config(assets, tmp_path / "run", data_file=data, tokenize={"max_tokens_per_row": 256},
                      train={"loss_type": "simpo", "cpo_alpha": 0.0, "max_steps": 2, "eval_steps": 100})
    path = write_config(cfg, tmp_path / "c.yaml")
    proc = run_cli(path)
    assert "[score] not needed: the loss is reference-free" in proc.stdout
    assert not (tmp_path / "run" / "score").exists()
    steps = [r for r in train_metrics(cfg) if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    status = run_cli(path, command="status", timeout=120).stdout.splitlines()
    assert [line.split()[0:3] for line in status[1:]] == [
        ["tokenize", status[1].split()[1], "done"], ["sft", "-", "not"], ["score", "-", "not"],
        ["train", status[4].split()[1], "done"], ["generate", "-", "not"]]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_step0_is_ln2_in_bf16_under_zero3_with_linear_biases(assets, tmp_path):
    """A Qwen2-style model (biases on q/k/v), bf16, ZeRO-3: the policy's step-0 log-probs
    equal the scored reference bit for bit, so the step-0 eval loss is ln 2 and every
    reward is 0. DeepSpeed's ZeRO-3 replaces F.linear by default (matmul, then += bias: two
    bf16 roundings where F.linear's addmm has one), which broke this (a step-0 reward of
    -3.6e-6 here); cluster/zero3_linear.py keeps torch's forward."""
    data = tmp_path / "pairs.jsonl"
    write_jsonl(make_pairs(300, seed=5), data)
    cfg = tiny_config(assets, tmp_path / "run", data_file=data, tokenize={"max_tokens_per_row": 256},
                      train={"max_steps": 1, "eval_steps": 100, "zero_stage": 3})
    cfg.model.path = str(biased_qwen2(assets, tmp_path))
    cfg.model.dtype = "bfloat16"
    records = run_and_read_metrics(cfg, tmp_path)
    step0 = records[0]
    assert step0["step"] == 0 and step0["eval_pairs"] > 0
    assert step0["eval_rewards/chosen"] == 0.0 and step0["eval_rewards/rejected"] == 0.0
    ln2 = float(torch.tensor(math.log(2), dtype=torch.float32))  # the loss is computed in fp32
    assert step0["eval_loss"] == ln2
    step1 = [r for r in records if "loss" in r][0]
    assert step1["rewards/margins"] == 0.0 and step1["loss"] == ln2
