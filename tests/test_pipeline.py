"""End to end on the session's Ray cluster: the run's warm actors, the real rank group, real DeepSpeed
ZeRO-3 on 2 CPU workers. Kept few: each run costs about a minute."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import tiny_config
from pipeline import cli, runner
from pipeline.core.config import dump_yaml, load_config
from pipeline.core.logps import packed_token_logps
from pipeline.core.segments import segment_layout, segment_sums
from pipeline.core.losses import preference_loss
from pipeline.core.modeling import row_tensors
from pipeline.core.packing import epoch_plan
from pipeline.core.rows import RowReader, split_files
from pipeline.training.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def first_run(assets, tmp_path_factory, ray_cluster):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    cfg = tiny_config(assets, run_dir, train={"max_steps": 30, "eval_steps": 10})
    results = runner.run_pipeline(cfg)
    return cfg, results


def test_all_stages_run_and_step0_is_ln2(first_run):
    cfg, results = first_run
    assert [r["ran"] for r in results.values()] == [True, True, True]
    records = read_metrics(Path(results["train"]["dir"]))
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert abs(train[0]["loss"] - math.log(2)) < 1e-6  # policy == reference at step 0
    assert train[0]["rewards/chosen"] == 0.0 and train[0]["rewards/margins"] == 0.0
    assert abs(evals[0]["eval_loss"] - math.log(2)) < 1e-6
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert len(train) == 30 and train[-1]["step"] == 30
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9  # learned, on held-out prompts
    assert evals[-1]["eval_loss"] < 0.5
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"):
        assert key in train[1]


def test_step_loss_is_mean_over_all_pairs_of_the_step(first_run, assets):
    """Step 1's grad norm on 2 ZeRO-3 ranks equals the gradient of
    sum(per-pair loss) / pairs over both ranks' rows, computed here in one process."""
    from transformers import AutoModelForCausalLM

    cfg, results = first_run
    scored = runner.plan_stages(cfg)["score"].dir
    reader = RowReader(split_files(scored, "train"))
    step = epoch_plan(reader.num_rows, 2, 1, cfg.train.seed, 0)[0]
    model = AutoModelForCausalLM.from_pretrained(assets["model"], attn_implementation="sdpa")
    total, pairs = 0.0, 0
    for rank_plan in step:
        for mb in rank_plan:
            row = reader[mb.row]
            t = row_tensors(row)
            layout = segment_layout(t["seq_lens"], t["prompt_lens"])
            seq = segment_sums(packed_token_logps(model, t["input_ids"], t["position_ids"], layout).logps, layout)
            ref = segment_sums(torch.tensor(row["ref_logps"]), layout)
            out = preference_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=cfg.train.beta)
            total = total + out.losses.sum()
            pairs += out.losses.numel()
    (total / pairs).backward()
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    logged = [r for r in read_metrics(Path(results["train"]["dir"])) if "loss" in r][0]
    assert logged["pairs"] == pairs
    assert logged["grad_norm"] == pytest.approx(norm, rel=1e-4)


def eval_chosen_logps(model, cfg) -> tuple[float, int]:
    """Mean chosen log-prob over the eval rows, as the trainer's eval computes it."""
    reader = RowReader(split_files(runner.plan_stages(cfg)["score"].dir, "eval"))
    chosen, pairs = 0.0, 0
    with torch.no_grad():
        for i in range(reader.num_rows):
            t = row_tensors(reader[i])
            layout = segment_layout(t["seq_lens"], t["prompt_lens"])
            seq = segment_sums(packed_token_logps(model, t["input_ids"], t["position_ids"], layout).logps, layout)
            chosen += float(seq[0::2].double().sum())
            pairs += seq.numel() // 2
    return chosen / pairs, pairs


def test_export_reloads_and_reproduces_the_trained_logps(first_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, results = first_run
    out = Path(results["train"]["dir"])
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    AutoTokenizer.from_pretrained(out / "model")
    info = json.loads((out / "model" / "dpo_pipeline.json").read_text())
    assert set(info["fingerprints"]) == {"tokenize", "score", "train"}
    mean, pairs = eval_chosen_logps(model, cfg)
    final = [r for r in read_metrics(out) if "eval_loss" in r][-1]
    assert final["eval_pairs"] == pairs
    assert mean == pytest.approx(final["eval_logps/chosen"], abs=1e-4)


def test_lora_under_zero3_saves_the_adapter_and_the_merged_model(first_run):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from pipeline.core.config import LoraSettings

    cfg, results = first_run
    cfg = copy.deepcopy(cfg)
    cfg.train.peft = LoraSettings(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    cfg.train.merge_adapter, cfg.train.max_steps, cfg.train.learning_rate = True, 12, 1e-2
    again = runner.run_pipeline(cfg)
    assert [r["ran"] for r in again.values()] == [False, False, True]  # the reference is the base: no rescoring
    out = Path(again["train"]["dir"])
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    assert abs(train[0]["loss"] - math.log(2)) < 1e-6  # LoRA B starts at 0: policy == base
    final = [r for r in records if "eval_loss" in r][-1]
    assert final["eval_loss"] < math.log(2) - 0.04  # learned (0.6435 on the split keyed on the row's prompt)
    assert (out / "model" / "adapter_config.json").exists()
    assert not (out / "model" / "model.safetensors").exists()  # the adapter only
    for model in (AutoModelForCausalLM.from_pretrained(out / "model" / "merged"),
                  AutoPeftModelForCausalLM.from_pretrained(out / "model")):
        mean, _ = eval_chosen_logps(model.eval(), cfg)
        assert mean == pytest.approx(final["eval_logps/chosen"], abs=1e-4)


def test_rerun_skips_everything(first_run):
    cfg, results = first_run
    again = runner.run_pipeline(cfg)
    assert [r["ran"] for r in again.values()] == [False, False, False]
    assert {k: r["dir"] for k, r in again.items()} == {k: r["dir"] for k, r in results.items()}


def test_changed_beta_reruns_only_train(first_run):
    cfg, results = first_run
    cfg = copy.deepcopy(cfg)
    cfg.train.beta, cfg.train.max_steps = 0.2, 3
    again = runner.run_pipeline(cfg)
    assert [r["ran"] for r in again.values()] == [False, False, True]
    assert again["score"]["dir"] == results["score"]["dir"]
    assert again["train"]["dir"] != results["train"]["dir"]


def test_cli_with_another_loss_reruns_only_train(first_run, tmp_path, capsys):
    cfg, results = first_run
    config_file = tmp_path / "run.yaml"
    config_file.write_text(dump_yaml(cfg))
    overrides = ["train.loss_type=ipo", "train.max_steps=3"]
    assert cli.main(["run", str(config_file), *overrides]) == 0
    printed = capsys.readouterr().out
    assert f"[tokenize] done already ({results['tokenize']['dir']}), skipped" in printed
    assert f"[score] done already ({results['score']['dir']}), skipped" in printed
    assert "[train] running" in printed
    train_dir = Path(runner.plan_stages(load_config(config_file, overrides))["train"].dir)
    first = [r for r in read_metrics(train_dir) if "loss" in r][0]
    assert first["loss"] == pytest.approx(25.0, abs=1e-5)  # IPO at policy == reference: (1 / (2 beta))^2
    assert cli.main(["status", str(config_file), *overrides]) == 0
    status = capsys.readouterr().out.splitlines()
    assert [line.split()[0] + " " + line.split()[2] for line in status[1:]] == [
        "tokenize done", "sft not", "score done", "train done", "generate not"]  # sft and generate off: not needed


def test_a_killed_rank_restarts_and_resumes_exactly(first_run, tmp_path):
    """Kill rank 1 by pid after the first checkpoint: the rank group starts every rank
    again (train.max_failures), training resumes from the checkpoint, and every step's loss equals the
    straight run's (checkpoint settings do not change the trained numbers)."""
    import os
    import signal
    import threading
    import time

    cfg, results = first_run
    cfg = copy.deepcopy(cfg)
    cfg.run_dir = str(tmp_path / "run")
    cfg.train.save_steps, cfg.train.max_failures = 5, 1
    train_dir = Path(runner.plan_stages(cfg)["train"].dir)
    assert train_dir.name == Path(results["train"]["dir"]).name  # same training, same fingerprint
    killed = []

    def killer():
        deadline = time.time() + 600
        while time.time() < deadline:
            if list((train_dir / "checkpoints").glob("step-*/COMPLETE.json")):
                pid = int((train_dir / "workers" / "rank-1.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    runner.run_pipeline(cfg)
    thread.join(timeout=5)
    assert killed, "no checkpoint appeared"
    assert int((train_dir / "workers" / "rank-1.pid").read_text()) != killed[0]  # a new worker
    want = {r["step"]: r["loss"] for r in read_metrics(Path(results["train"]["dir"])) if "loss" in r}
    got = [r for r in read_metrics(train_dir) if "loss" in r]
    assert [r["step"] for r in got] == list(range(1, 31))
    for r in got:
        assert r["loss"] == pytest.approx(want[r["step"]], abs=1e-6), r["step"]


def test_run_report_and_tensorboard(first_run):
    """The report's PNGs are real images of a sensible size; TensorBoard has TRL's tags."""
    import matplotlib.image as mpimg

    cfg, results = first_run
    runner.run_pipeline(cfg)  # all done: skipped; the report describes the latest run of the run dir
    report = Path(cfg.run_dir) / "report"
    text = (report / "report.md").read_text()
    assert f"`{results['train']['dir']}`" in text
    for name in ("loss.png", "accuracy.png", "margins.png", "reference_logps.png"):
        assert f"]({name})" in text
        image = mpimg.imread(report / name)
        assert image.shape[0] >= 300 and image.shape[1] >= 500 and image.std() > 0.01  # not blank
    assert "step-0 loss 0.693147" in text and "waste" in text
    events = list((Path(results["train"]["dir"]) / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    blob = events[0].read_bytes()
    for tag in (b"train/loss", b"train/rewards/accuracies", b"train/grad_norm", b"eval/loss"):
        assert tag in blob
