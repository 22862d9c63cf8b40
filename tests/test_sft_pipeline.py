"""The sft stage end to end on the session's Ray cluster (2 ZeRO-3 ranks on CPU):
tokenize -> sft -> score -> train, the SFT model as reference and as the policy's start,
reruns, a killed worker, LoRA SFT, and the step normalisation across ranks."""

import copy
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import tiny_config
from pipeline import runner
from pipeline.core.config import LoraSettings, load_config
from pipeline.core.packing import epoch_plan
from pipeline.core.rundir import read_manifest
from pipeline.core.storage import Loc
from pipeline.core.rows import RowReader, split_files
from pipeline.training.metrics import read_metrics
from stages.sft.objective import SFTObjective

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
SFT = {"enabled": True, "learning_rate": 1e-3, "max_steps": 16, "eval_steps": 8}


def sft_config(assets, run_dir, **groups):
    return tiny_config(assets, run_dir, **{"sft": dict(SFT), "train": {"max_steps": 6, "eval_steps": 3}, **groups})


@pytest.fixture(scope="module")
def sft_run(assets, tmp_path_factory, ray_cluster):
    """The demo config with the sft stage, as shipped, pointed at the session's assets and
    shortened."""
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    cfg = load_config(ROOT / "configs" / "tiny-sft.yaml", [
        f"run_dir={run_dir}", f"model.path={assets['model']}", f"data.train_files=[{assets['data']}]",
        *(f"sft.{k}={v}" for k, v in SFT.items() if k != "learning_rate"), "train.max_steps=6", "train.eval_steps=3"])
    return cfg, runner.run_pipeline(cfg)


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(out)) if "loss" in r}


def test_four_stages_sft_model_is_reference_and_start(sft_run):
    cfg, results = sft_run
    assert list(results) == ["tokenize", "sft", "score", "train"]
    assert all(r["ran"] for r in results.values())
    records = read_metrics(Path(results["sft"]["dir"]))
    train, evals = [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 17)) and [r["step"] for r in evals] == [0, 8, 16]
    for key in ("loss", "mean_token_accuracy", "num_tokens", "grad_norm", "learning_rate"):  # TRL's names
        assert key in train[0], key
    assert {"eval_loss", "eval_mean_token_accuracy"} <= set(evals[0])
    assert train[-1]["num_tokens"] == sum(r["tokens"] for r in train)  # cumulative, as TRL's
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5  # the chosen completions got likelier (6.23 -> 5.41)
    stats = results["sft"]["stats"]
    logp = stats["eval_chosen_logp_per_token"]
    assert logp == {"base": -evals[0]["eval_loss"], "sft": -evals[-1]["eval_loss"]}
    assert stats["packing"]["train"]["waste_fraction"] <= 0.03
    # DPO from the SFT model, against the SFT model scored offline: policy == reference at step 0
    dpo = [r for r in read_metrics(Path(results["train"]["dir"])) if "loss" in r]
    assert abs(dpo[0]["loss"] - math.log(2)) < 1e-6
    export = str(Path(results["sft"]["dir"]) / "model")
    assert read_manifest(Loc(results["score"]["dir"]))["models"]["model.reference_path"]["pinned"] == export
    assert read_manifest(Loc(results["train"]["dir"]))["models"]["model.path"]["pinned"] == export
    # the summary and the report say what SFT did to the eval split's chosen completions
    summary = runner.format_summary(results)
    assert f"{logp['base']:.4f} under the base model, {logp['sft']:.4f} under the SFT model" in summary
    report = (Path(cfg.run_dir) / "report" / "report.md").read_text()
    assert "## sft" in report and f"{logp['sft']:.4f} under the SFT model" in report


def test_a_second_run_skips_all_four(sft_run):
    cfg, results = sft_run
    again = runner.run_pipeline(cfg)
    assert [r["ran"] for r in again.values()] == [False, False, False, False]
    status = {r["stage"]: r["state"] for r in runner.status(cfg)}
    assert status == {"tokenize": "done", "sft": "done", "score": "done", "train": "done", "generate": "not needed"}


def test_a_new_beta_reruns_only_train(sft_run):
    cfg, results = sft_run
    cfg = copy.deepcopy(cfg)
    cfg.train.beta, cfg.train.max_steps = 0.3, 2
    again = runner.run_pipeline(cfg)
    assert [r["ran"] for r in again.values()] == [False, False, False, True]


def test_train_refuses_columns_scored_from_another_sft_model(sft_run):
    """The sft output rerun (--force, other hardware) keeps its fingerprint with other
    weights: the reference columns scored from the earlier weights are refused, not
    trained against (step 0 would no longer be policy == reference)."""
    cfg, results = sft_run
    manifest = Path(results["score"]["dir"]) / "_MANIFEST.json"
    original = manifest.read_text()
    scored = json.loads(original)
    assert scored["models"]["model.reference_path"]["export_digest"]  # what score loaded is recorded
    scored["models"]["model.reference_path"]["export_digest"] = "0" * 64
    manifest.write_text(json.dumps(scored))
    cfg = copy.deepcopy(cfg)
    cfg.train.beta = 0.4
    try:
        with pytest.raises(RuntimeError, match=r"score \(\w+\) was made from an SFT model with digest 0{64}, and "
                                               r"the sft stage's model is now \w+ .*rerun it, --from score --force"):
            runner.run_pipeline(cfg, stages=["train"])  # score is upstream of train: refused, not trained on
    finally:
        manifest.write_text(original)
    assert not runner.plan_stages(cfg)["train"].dir.exists()  # refused before anything ran


def test_a_killed_sft_worker_resumes_with_the_same_losses(sft_run):
    """Rank 1 SIGKILLed after the first sft checkpoint: every rank is started again, they
    resume from it, and every step's loss is the straight run's."""
    cfg, results = sft_run
    cfg = copy.deepcopy(cfg)
    cfg.run_dir = str(Path(cfg.run_dir).parent / "killed")
    cfg.sft.save_steps, cfg.sft.max_failures = 5, 1
    out = Path(runner.plan_stages(cfg)["sft"].dir)
    assert out.name == Path(results["sft"]["dir"]).name  # checkpointing does not change what is trained
    killed = []

    def killer():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            if list((out / "checkpoints").glob("step-*/COMPLETE.json")):
                pid = int((out / "workers" / "rank-1.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    runner.run_pipeline(cfg, stages=["tokenize", "sft"])
    thread.join(timeout=5)
    assert killed, "no sft checkpoint appeared"
    assert int((out / "workers" / "rank-1.pid").read_text()) != killed[0]
    want, got = losses(results["sft"]["dir"]), losses(out)
    assert sorted(got) == list(range(1, 17))
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], abs=1e-6), step


def chosen_logps(model, rows_dir) -> torch.Tensor:
    """Every completion token's log-prob on the sft eval rows."""
    objective = SFTObjective(logp_chunk_tokens=256)
    rows = RowReader(split_files(Loc(rows_dir), "eval"), objective.columns)
    from pipeline.core.logps import packed_token_logps
    from pipeline.core.modeling import row_inputs

    out = []
    with torch.no_grad():
        for i in range(rows.num_rows):
            ids, pos, layout = row_inputs(rows[i], "cpu")
            out.append(packed_token_logps(model, ids, pos, layout, 256).logps[layout.targets])
    return torch.cat(out)


def test_lora_sft_merged_model_is_the_reference_of_full_dpo(sft_run, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from pipeline.core.attention import register

    cfg, _ = sft_run
    cfg = copy.deepcopy(cfg)
    cfg.run_dir = str(tmp_path / "lora")
    cfg.sft.peft = LoraSettings(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    cfg.sft.learning_rate, cfg.sft.max_steps = 1e-2, 8
    results = runner.run_pipeline(cfg)
    out = Path(results["sft"]["dir"])
    assert (out / "model" / "adapter_config.json").is_file() and (out / "model" / "merged" / "config.json").is_file()
    merged = str(out / "model" / "merged")
    assert read_manifest(Loc(results["score"]["dir"]))["models"]["model.reference_path"]["pinned"] == merged
    dpo = [r for r in read_metrics(Path(results["train"]["dir"])) if "loss" in r]
    assert abs(dpo[0]["loss"] - math.log(2)) < 1e-6  # full DPO from the merged model, against it
    register()
    logps = [chosen_logps(m.eval(), out) for m in (
        AutoModelForCausalLM.from_pretrained(merged, attn_implementation="segment_sdpa"),
        AutoPeftModelForCausalLM.from_pretrained(out / "model", attn_implementation="segment_sdpa"))]
    assert logps[0].numel() > 100
    assert torch.allclose(logps[0], logps[1], atol=1e-5, rtol=0)
    sft = [r for r in read_metrics(out) if "eval_loss" in r]
    assert sft[-1]["eval_loss"] < sft[0]["eval_loss"]  # the adapter learned
    assert float(-logps[0].double().mean()) == pytest.approx(sft[-1]["eval_loss"], abs=1e-4)


def test_a_step_is_the_mean_over_its_completion_tokens_on_every_rank(assets, tmp_path, ray_cluster):
    """Two ZeRO-3 ranks with accumulation 2 and rows of unequal completion counts: step 1's
    loss and gradient norm are one process's over the same four rows (the plan gives both
    the same rows: the global batch is 4)."""
    rows = {"max_tokens_per_row": 256}
    sft = dict(SFT, max_steps=2, eval_steps=100, max_grad_norm=1e9, warmup_ratio=0.0)
    two = sft_config(assets, tmp_path / "two", tokenize=rows, sft=dict(sft, num_workers=2, gradient_accumulation_steps=2))
    one = sft_config(assets, tmp_path / "one", tokenize=rows, sft=dict(sft, num_workers=1, gradient_accumulation_steps=4))
    runner.run_pipeline(two, stages=["tokenize", "sft"])
    runner.run_pipeline(one, stages=["tokenize", "sft"], use_ray=False)
    out = Path(runner.plan_stages(two)["sft"].dir)
    units = SFTObjective(256).units_per_row(RowReader(split_files(Loc(out), "train")))
    step1 = [units[mb.row] for rank in epoch_plan(len(units), 2, 2, two.sft.seed, 0)[0] for mb in rank]
    assert len(set(step1)) == 4  # four rows, four different completion-token counts
    got = [[r for r in read_metrics(Path(runner.plan_stages(c)["sft"].dir)) if "loss" in r] for c in (two, one)]
    counts = [r["completion_tokens"] for r in got[0]]
    assert counts == [r["completion_tokens"] for r in got[1]] and counts[0] > 0
    for a, b in zip(*got):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_sft_on_data_of_its_own(assets, tmp_path, ray_cluster):
    """sft.data naming a file of SFT conversations: tokenised on Ray by the tokenize stage's
    code into the sft output (a bad row quarantined and counted), trained, handed on."""
    pairs = [json.loads(line) for line in open(assets["data"]).read().splitlines()[:600]]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": p["prompt"] + p["chosen"]}) + "\n" for p in pairs)
                    + json.dumps({"text": "no prompt"}) + "\n")
    cfg = sft_config(assets, tmp_path / "run", sft=dict(SFT, data={"train_files": [str(data)]}))
    results = runner.run_pipeline(cfg)
    assert [r["ran"] for r in results.values()] == [True, True, True, True]
    stats = results["sft"]["stats"]["packing"]
    assert (stats["input_rows"], stats["quarantined"], stats["format"]) == (601, 1, "messages_conversational")
    out = Path(results["sft"]["dir"])
    assert (out / "quarantine.parquet").is_file() and not (out / "_units").exists()
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5
    dpo = [r for r in read_metrics(Path(results["train"]["dir"])) if "loss" in r]
    assert abs(dpo[0]["loss"] - math.log(2)) < 1e-6
    assert "its own data: 601 rows, 1 quarantined" in (Path(cfg.run_dir) / "report" / "report.md").read_text()


def test_sft_on_a_bucket_run_dir(assets, tmp_path, ray_cluster, s3_bucket):
    """run_dir and the base model on an S3 server: the SFT model is uploaded, handed on as a
    bucket URI pinned by content (every worker fetches the same bytes), and DPO starts at ln 2."""
    root = f"{s3_bucket}/sft-{tmp_path.name}"
    for f in assets["model"].iterdir():
        Loc(f"{root}/base-model/{f.name}").upload(f)
    cfg = sft_config(assets, root, sft=dict(SFT, max_steps=6, eval_steps=3),
                     model={"path": f"{root}/base-model", "cache_dir": str(tmp_path / "model-cache")},
                     train={"max_steps": 3, "eval_steps": 3})
    results = runner.run_pipeline(cfg)
    assert [r["ran"] for r in results.values()] == [True, True, True, True]
    sft_dir = Loc(results["sft"]["dir"])
    assert (sft_dir / "model" / "model.safetensors").is_file() and (sft_dir / "_MANIFEST.json").is_file()
    from stages.sft import export_digest

    for stage, key in (("score", "model.reference_path"), ("train", "model.path")):
        record = read_manifest(Loc(results[stage]["dir"]))["models"][key]
        assert record["kind"] == "uri" and record["pinned"].startswith(f"{sft_dir}/model#sha256=")
        assert record["export_digest"] == export_digest(cfg, sft_dir)
    dpo = [r for r in read_metrics(Loc(results["train"]["dir"])) if "loss" in r]
    assert abs(dpo[0]["loss"] - math.log(2)) < 1e-6
    assert [r["ran"] for r in runner.run_pipeline(cfg).values()] == [False] * 4
