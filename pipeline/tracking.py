"""Experiment trackers for the train stage's metrics: TensorBoard, Weights & Biases, MLflow.

``train.report_to`` picks them (TRL's ``report_to``); their own settings come from the
environment the way TRL users set them (``WANDB_PROJECT``, ``WANDB_API_KEY``,
``WANDB_MODE``, ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, ...), for example through
``cluster.runtime_env.env_vars``, whose secrets are redacted from everything written down.
Only rank 0 logs. Metric names follow TRL's layout: ``train/loss``, ``eval/rewards/accuracies``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from pipeline.redaction import redact_values

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}


def check_installed(report_to: list[str]) -> None:
    """Fail before any work when a requested tracker's package is missing."""
    for name in report_to:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise RuntimeError(f"train.report_to includes {name!r} but the {PACKAGES[name]} package is not "
                               f"installed: pip install {PACKAGES[name]} (on a cluster: cluster.runtime_env.pip)")


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

            # The id is the train stage's fingerprint: a resumed run continues the same W&B run.
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
