"""W&B and MLflow get the same numbers as metrics.jsonl when ``train.report_to`` names them
(W&B offline, MLflow on a local file store: no network)."""

import json

import pytest

from helpers import run_and_read_metrics, tiny_config, train_dir
from pipeline.config import ConfigError
from pipeline.demo import make_pairs, write_jsonl


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wandb_and_mlflow_receive_every_logged_metric(assets, tmp_path):
    data = tmp_path / "pairs.jsonl"
    write_jsonl(make_pairs(300, seed=5), data)
    cfg = tiny_config(assets, tmp_path / "run", data_file=data, tokenize={"max_tokens_per_row": 256},
                      train={"max_steps": 3, "eval_steps": 2, "report_to": ["tensorboard", "wandb", "mlflow"],
                             "run_name": "tracked"})
    env = dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_PROJECT="dpo-test",
               MLFLOW_TRACKING_URI=f"file://{tmp_path}/mlruns", MLFLOW_ALLOW_FILE_STORE="true",
               MLFLOW_EXPERIMENT_NAME="dpo-test")
    records = run_and_read_metrics(cfg, tmp_path, env=env)
    out = train_dir(cfg)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    eval_losses = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(losses) == [1, 2, 3] and sorted(eval_losses) == [0, 2, 3]

    # MLflow: one run named as configured, each metric at each step with the exact value
    runs = [p.parent for p in (tmp_path / "mlruns").glob("*/*/meta.yaml")]
    assert len(runs) == 1
    run = runs[0]
    assert (run / "tags" / "mlflow.runName").read_text() == "tracked"
    assert (run / "tags" / "dpo_pipeline.fingerprint").read_text() == out.name
    logged = [line.split() for line in (run / "metrics" / "train" / "loss").read_text().splitlines()]
    assert {int(step): float(value) for _, value, step in logged} == losses
    logged = [line.split() for line in (run / "metrics" / "eval" / "loss").read_text().splitlines()]
    assert {int(step): float(value) for _, value, step in logged} == eval_losses
    assert (run / "params" / "train.loss_type").read_text() == "sigmoid"

    # W&B (offline): the run file, named by the train fingerprint, holds every logged loss
    wandb_runs = list((out / "wandb").glob(f"offline-run-*-{out.name}/run-{out.name}.wandb"))
    assert len(wandb_runs) == 1
    blob = wandb_runs[0].read_bytes()
    assert b"train/loss" in blob and b"eval/rewards/accuracies" in blob
    for value in list(losses.values()) + list(eval_losses.values()):
        assert json.dumps(value).encode() in blob, value
    # and TensorBoard as before
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_unknown_tracker_is_a_config_error(assets, tmp_path):
    with pytest.raises(ConfigError, match="train.report_to: 'neptune' is not one of"):
        tiny_config(assets, tmp_path, train={"report_to": ["neptune"]})


def test_missing_tracker_package_names_the_fix(monkeypatch):
    import importlib.util

    from pipeline.tracking import check_installed

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(RuntimeError, match=r"report_to includes 'wandb' but the wandb package is not installed"):
        check_installed(["tensorboard", "wandb"])
