"""The sft stage against TRL 1.16's SFTTrainer: the same sequences (the sft stage's own
rows, unpacked for TRL), the same initial weights and optimizer, one process, fp32,
completion-only loss. Every epoch is one optimizer step on both sides, so the shuffles
(ours: rows per epoch; TRL's: examples) decide nothing; the 10 steps' losses agree."""

import json

import pytest

from helpers import tiny_config
from pipeline import runner
from pipeline.core.storage import Loc
from stages import sft
from pipeline.tokenizing import tokenize
from pipeline.core.rows import RowReader, split_files
from pipeline.training.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SETTINGS = {"learning_rate": 1e-3, "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0,
            "max_grad_norm": 1.0, "num_train_epochs": 10}


def test_ten_steps_equal_trl_sft_trainer(assets, tmp_path):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(open(assets["data"]).readlines()[:40]))
    groups = {"data": {"eval_fraction": 0.0}, "tokenize": {"max_tokens_per_row": 512}}
    probe = tiny_config(assets, tmp_path / "probe", data_file=data, **groups)
    for d in ("tok", "rows"):
        Loc(tmp_path / d).mkdir()
    tokenize.run_in_process(probe, Loc(tmp_path / "tok"))
    rows = sft.write_chosen_rows(probe, Loc(tmp_path / "tok"), Loc(tmp_path / "rows"))[1]["train"]["rows"]
    assert rows >= 2  # several micro-batches a step: accumulation is part of what is compared

    # ours: one rank, every row in one step (accumulation = rows), one step an epoch
    cfg = tiny_config(assets, tmp_path / "run", data_file=data, **groups,
                      sft={"enabled": True, "num_workers": 1, "gradient_accumulation_steps": rows,
                           "eval_steps": 1000, "report_to": [], "warmup_ratio": 0.0, **SETTINGS})
    results = runner.run_pipeline(cfg, stages=["tokenize", "sft"], use_ray=False, log=lambda _: None)
    ours = [r for r in read_metrics(Loc(results["sft"]["dir"])) if "loss" in r]

    # TRL: the same sequences, prompt tokens masked by completion_mask, one batch an epoch
    examples = []
    reader = RowReader(split_files(Loc(results["sft"]["dir"]), "train"))
    for i in range(reader.num_rows):
        row, start = reader[i], 0
        for n, p in zip(row["seq_lens"], row["prompt_lens"]):
            examples.append({"input_ids": row["input_ids"][start:start + n], "completion_mask": [0] * p + [1] * (n - p)})
            start += n
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32, attn_implementation="sdpa")
    args = SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(examples),
                     gradient_accumulation_steps=1, logging_steps=1, report_to=[], save_strategy="no",
                     completion_only_loss=True, max_length=None, use_cpu=True, bf16=False, seed=42,
                     adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", **SETTINGS)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                         processing_class=AutoTokenizer.from_pretrained(assets["model"]))
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h]

    assert len(ours) == len(theirs) == 10
    print(json.dumps({k: max(abs(a[k] - b[k]) for a, b in zip(ours, theirs)) for k in ("loss", "grad_norm")}))
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.5  # it learned: the comparison covers real updates
    for step, (a, b) in enumerate(zip(ours, theirs), 1):  # measured: 7e-7 at most
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), step
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), step
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-9), step
        assert a["mean_token_accuracy"] == pytest.approx(b["mean_token_accuracy"], abs=1e-6), step
        assert a["num_tokens"] == b["num_tokens"], step  # every token seen so far, prompts included
