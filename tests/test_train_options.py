import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from pipeline.config import dump_yaml
from pipeline.demo import make_pairs, write_jsonl
from stages.train import lr_lambda, param_groups


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


def run_without_ray(cfg, tmp_path) -> list[dict]:
    """``python -m pipeline run CONFIG --no-ray`` (one rank in its own process); the metrics."""
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--no-ray"],
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_dir = next((Path(cfg.run_dir) / "train").iterdir())
    return [json.loads(x) for x in (train_dir / "metrics.jsonl").read_text().splitlines()]


def biased_qwen2(assets, tmp_path) -> Path:
    """A tiny Qwen2 (biases on q/k/v, set large so they matter) with the demo tokenizer, bf16."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(assets["model"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.5)
    model_dir = tmp_path / "qwen2-tiny"
    model.to(torch.bfloat16).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


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
    records = run_without_ray(cfg, tmp_path)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # bf16 policy == bf16 reference
    # linear with 1 warmup step over 3 steps: multipliers 0, 1, 0.5
    assert [r["learning_rate"] for r in steps] == pytest.approx([0.0, 1e-3, 5e-4])
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in steps)
    assert steps[0]["rows"] == 2  # two packed rows per step (accumulation 2, one rank)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["dtype"] == "bfloat16"


# The train loop in-process, with pipeline.offload instrumented: which offload context each
# micro-batch's forward ran in, and how many saved tensors went through its hooks.
OFFLOAD_PROBE = """
import json, sys
import pipeline.offload as offload
import stages.train as train
from pipeline import runner
from pipeline.config import load_config

contexts, saved = [], [0]
real_context, real_moves = train.offload_activations, offload.moves

def context(enabled, *args, **kwargs):
    contexts.append(enabled)
    return real_context(enabled, *args, **kwargs)

def moves(tensor, *args):
    saved[0] += 1
    return real_moves(tensor, *args)

train.offload_activations, offload.moves = context, moves
runner.run_pipeline(load_config(sys.argv[1]), use_ray=False, log=lambda _: None)
print(json.dumps({"contexts": contexts, "saved": saved[0]}))
"""


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
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    proc = subprocess.run([sys.executable, "-c", OFFLOAD_PROBE, str(path)], capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["contexts"] == [offloading] * 4  # 2 steps x 2 micro-batches, eval not wrapped
    assert (probe["saved"] > 0) is offloading


@pytest.mark.timeout(600)
def test_reference_free_loss_skips_the_score_stage(assets, tmp_path):
    data = tmp_path / "pairs.jsonl"
    write_jsonl(make_pairs(300, seed=4), data)
    cfg = tiny_config(assets, tmp_path / "run", data_file=data, tokenize={"max_tokens_per_row": 256},
                      train={"loss_type": "simpo", "cpo_alpha": 0.0, "max_steps": 2, "eval_steps": 100})
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--no-ray"],
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[score] not needed: the loss is reference-free" in proc.stdout
    assert not (tmp_path / "run" / "score").exists()
    train_dir = next((tmp_path / "run" / "train").iterdir())
    steps = [json.loads(x) for x in (train_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    status = subprocess.run([sys.executable, "-m", "pipeline", "status", str(path)],
                            capture_output=True, text=True, timeout=120).stdout.splitlines()
    assert [line.split()[0:3] for line in status[1:]] == [
        ["tokenize", status[1].split()[1], "done"], ["score", "-", "not"], ["train", status[3].split()[1], "done"]]


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
    records = run_without_ray(cfg, tmp_path)
    step0 = records[0]
    assert step0["step"] == 0 and step0["eval_pairs"] > 0
    assert step0["eval_rewards/chosen"] == 0.0 and step0["eval_rewards/rejected"] == 0.0
    ln2 = float(torch.tensor(math.log(2), dtype=torch.float32))  # the loss is computed in fp32
    assert step0["eval_loss"] == ln2
    step1 = [r for r in records if "loss" in r][0]
    assert step1["rewards/margins"] == 0.0 and step1["loss"] == ln2
