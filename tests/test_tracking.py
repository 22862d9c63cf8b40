"""W&B and MLflow get the same numbers as metrics.jsonl when ``train.report_to`` names them
(W&B offline, MLflow on a local file store: no network)."""

import json

import pytest

from helpers import run_and_read_metrics, tiny_config, train_dir
from pipeline.core.config import ConfigError, config_from_dict, to_dict
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

    from pipeline.core.tracking import check_installed

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(RuntimeError, match=r"report_to includes 'wandb' but the wandb package is not installed"):
        check_installed(["tensorboard", "wandb"])


def test_wandb_without_credentials_is_refused_on_the_driver_unless_offline(tmp_path):
    from pipeline.core.tracking import TrackerNotReady, check_ready, forwarded_env

    home = {"HOME": str(tmp_path)}  # no ~/.netrc there
    with pytest.raises(TrackerNotReady, match="report_to includes 'wandb' but no W&B credentials were found: "
                                              "set WANDB_API_KEY"):
        check_ready(["tensorboard", "wandb"], home)
    for mode in ("offline", "disabled", "dryrun"):
        check_ready(["wandb"], {**home, "WANDB_MODE": mode})
    check_ready(["wandb"], {**home, "WANDB_API_KEY": "x" * 40})
    check_ready(["tensorboard", "mlflow"], {**home, "MLFLOW_TRACKING_URI": "https://mlflow.example.com"})  # no key needed
    # `wandb login` writes the key to ~/.netrc, for the W&B host in use
    (tmp_path / ".netrc").write_text("machine wandb.example.com\n  login user\n  password k" + "1" * 39 + "\n")
    with pytest.raises(TrackerNotReady):
        check_ready(["wandb"], home)  # a key for another host
    on_prem = {**home, "WANDB_BASE_URL": "https://wandb.example.com"}
    check_ready(["wandb"], on_prem)
    # ranks on other nodes have neither the driver's netrc nor its environment: both travel
    assert forwarded_env(["wandb"], {**on_prem, "WANDB_PROJECT": "p", "MLFLOW_RUN_ID": "r", "PATH": "/bin"}) == {
        "WANDB_BASE_URL": "https://wandb.example.com", "WANDB_PROJECT": "p", "WANDB_API_KEY": "k" + "1" * 39}
    assert forwarded_env(["tensorboard"], {**on_prem, "WANDB_PROJECT": "p"}) == {}
    # not the driver's own process state: its directories, service, run or sweep
    local = {"WANDB_DIR": "/home/me/wandb", "WANDB_SERVICE": "2-123-tcp-localhost-4567", "WANDB_RUN_ID": "abc",
             "WANDB_SWEEP_ID": "s", "WANDB__SERVICE_WAIT": "30", "MLFLOW_RUN_ID": "r", "WANDB_API_KEY": "k" * 40}
    assert forwarded_env(["wandb", "mlflow"], local) == {"WANDB_API_KEY": "k" * 40}


def test_mlflow_on_ray_needs_a_store_the_run_outlives():
    from pipeline.core.tracking import TrackerNotReady, check_ready

    with pytest.raises(TrackerNotReady, match="MLFLOW_TRACKING_URI is not set: a Ray rank would write ./mlruns"):
        check_ready(["mlflow"], {})
    check_ready(["mlflow"], {}, on_ray=False)  # --no-ray: ./mlruns of the driver's directory
    check_ready(["mlflow"], {"MLFLOW_TRACKING_URI": "https://mlflow.example.com"})
    with pytest.raises(TrackerNotReady, match="needs DATABRICKS_HOST and DATABRICKS_TOKEN"):
        check_ready(["mlflow"], {"MLFLOW_TRACKING_URI": "databricks"})


def test_a_run_whose_tracker_cannot_start_stops_before_tokenizing(assets, tmp_path, monkeypatch):
    from pipeline import runner
    from pipeline.core.rundir import stage_state
    from pipeline.core.tracking import TrackerNotReady

    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = tiny_config(assets, tmp_path / "run", train={"report_to": ["wandb"]})
    with pytest.raises(TrackerNotReady, match="no W&B credentials"):
        runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)
    assert stage_state(runner.plan_stages(cfg)["tokenize"].dir) != "done"
    # cluster.runtime_env's env_vars reach the ranks only under Ray: with --no-ray they do not count
    raw = to_dict(cfg)
    raw["cluster"]["runtime_env"] = {"env_vars": {"WANDB_MODE": "offline"}}
    with pytest.raises(TrackerNotReady, match="no W&B credentials"):
        runner.run_pipeline(config_from_dict(raw), use_ray=False, log=lambda _: None)
    monkeypatch.setenv("WANDB_MODE", "offline")
    runner.run_pipeline(config_from_dict(raw), stages=["tokenize"], use_ray=False, log=lambda _: None)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ranks_get_the_drivers_tracker_settings(assets, tmp_path, monkeypatch, ray_cluster):
    """The Ray workers were started before these variables were set (as on another node,
    they do not see the driver's environment): MLflow still logs where the driver says."""
    from pipeline import runner

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{store}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "forwarded")
    cfg = tiny_config(assets, tmp_path / "run", tokenize={"max_tokens_per_row": 256},
                      train={"max_steps": 2, "report_to": ["mlflow"], "run_name": "forwarded-run"})
    runner.run_pipeline(cfg, log=lambda _: None)
    runs = [p.parent for p in store.glob("*/*/meta.yaml")]
    assert len(runs) == 1 and (runs[0] / "tags" / "mlflow.runName").read_text() == "forwarded-run"
