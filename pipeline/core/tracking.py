"""Experiment trackers for a training stage's metrics (train, sft): TensorBoard, Weights & Biases, MLflow.

``train.report_to`` picks them (TRL's ``report_to``); their own settings come from the
environment the way TRL users set them (``WANDB_PROJECT``, ``WANDB_API_KEY``,
``WANDB_MODE``, ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, ...), for example through
``cluster.runtime_env.env_vars``, whose secrets are redacted from everything written down.
Only rank 0 logs. Metric names follow TRL's layout: ``train/loss``, ``eval/rewards/accuracies``.

A tracker that cannot start must not be found out on rank 0 after hours of tokenizing and
scoring (and, with ``max_failures: -1``, restarted forever): ``check_ready`` runs on the
driver before any stage, and ``forwarded_env`` carries the driver's tracker settings to
ranks on other nodes, which do not share its environment or its ``~/.netrc``.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from pipeline.core.redaction import redact_values

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}


ENV_PREFIXES = {"tensorboard": (), "wandb": ("WANDB_",), "mlflow": ("MLFLOW_", "DATABRICKS_")}
WANDB_OFFLINE = ("offline", "disabled", "dryrun")
# Settings of the driver's own process and machine, not of the run: a local directory, a
# running W&B service, the run or sweep the driver itself belongs to.
PROCESS_LOCAL_ENV = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR",
                     "WANDB_SERVICE", "WANDB__", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_SWEEP_ID",
                     "WANDB_SWEEP_PARAM_PATH", "WANDB_AGENT_", "MLFLOW_RUN_ID")


class TrackerNotReady(RuntimeError):
    """A tracker of ``train.report_to`` that could not start on rank 0; the message says why."""


def check_installed(report_to: list[str]) -> None:
    """Fail before any work when a requested tracker's package is missing."""
    for name in report_to:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise TrackerNotReady(f"train.report_to includes {name!r} but the {PACKAGES[name]} package is not "
                                  f"installed: pip install 'dpo-pipeline[tracking]' (on a cluster: "
                                  f"cluster.runtime_env.pip, or ray_cluster.yaml's setup_commands)")


def wandb_netrc_key(environ) -> str | None:
    """The API key ``wandb login`` stored in the netrc file for the W&B host, if any."""
    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = environ.get("NETRC") or os.path.join(environ.get("HOME", os.path.expanduser("~")), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry and entry[2] else None


def check_ready(report_to: list[str], environ, on_ray: bool = True) -> None:
    """On the driver, before any stage: every tracker is installed, W&B has credentials
    unless it runs offline, MLflow has a store the run outlives. ``environ``: what the ranks
    will see (under Ray, the driver's environment with ``cluster.runtime_env.env_vars``)."""
    check_installed(report_to)
    uri = environ.get("MLFLOW_TRACKING_URI", "")
    if "mlflow" in report_to and on_ray and not uri:
        raise TrackerNotReady(
            "train.report_to includes 'mlflow' but MLFLOW_TRACKING_URI is not set: a Ray rank would write "
            "./mlruns in its own working directory (under `ray job submit`, a temporary copy deleted with "
            "the job); set it to a tracking server, or a file:// path every node shares")
    if "mlflow" in report_to and uri.startswith("databricks") and not (
            environ.get("DATABRICKS_HOST") and environ.get("DATABRICKS_TOKEN")):
        raise TrackerNotReady(f"train.report_to includes 'mlflow' with MLFLOW_TRACKING_URI {uri!r}, which needs "
                              f"DATABRICKS_HOST and DATABRICKS_TOKEN in the ranks' environment")
    if "wandb" in report_to and environ.get("WANDB_MODE", "").lower() not in WANDB_OFFLINE:
        if not environ.get("WANDB_API_KEY") and wandb_netrc_key(environ) is None:
            raise TrackerNotReady(
                "train.report_to includes 'wandb' but no W&B credentials were found: set WANDB_API_KEY "
                "(in the environment or cluster.runtime_env.env_vars), run `wandb login`, or set "
                "WANDB_MODE=offline to log to local files")


def forwarded_env(report_to: list[str], environ) -> dict[str, str]:
    """The driver's settings of the chosen trackers, for ranks on other nodes (applied there
    under any value the rank's own environment sets). A W&B key that ``wandb login`` put in
    the driver's netrc travels as WANDB_API_KEY; nothing here is written to a file."""
    prefixes = tuple(p for name in report_to for p in ENV_PREFIXES[name])
    env = {k: v for k, v in environ.items()
           if prefixes and k.startswith(prefixes) and not k.startswith(PROCESS_LOCAL_ENV)}
    if "wandb" in report_to and "WANDB_API_KEY" not in env:
        key = wandb_netrc_key(environ)
        if key is not None:
            env["WANDB_API_KEY"] = key
    return env


def metric_tag(key: str) -> str:
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]
    return out


class Trackers:
    """The trackers of ``report_to``; ``log`` sends one metrics record to each."""

    def __init__(self, report_to: list[str], log_dir: Path, run_name: str, run_id: str, config: dict):
        check_installed(report_to)
        config = redact_values(config)  # trackers store their parameters: no credential goes there
        self.tb = self.wandb = self.mlflow = None
        if "tensorboard" in report_to:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(log_dir / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            # The id is the stage's fingerprint: a resumed run continues the same W&B run.
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "dpo-pipeline"), name=run_name,
                                    id=run_id, resume="allow", config=config, dir=str(log_dir))
        if "mlflow" in report_to:
            import mlflow

            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "dpo-pipeline"))
            self.mlflow = mlflow
            mlflow.start_run(run_name=run_name, tags={"dpo_pipeline.fingerprint": run_id})
            mlflow.log_params(flat_params(config))

    def log(self, record: dict) -> None:
        step = record["step"]
        scalars = {metric_tag(k): float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()
