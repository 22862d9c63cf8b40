"""Shared test helpers (imported by test modules as ``from helpers import ...``)."""

from pipeline.config import config_from_dict


def tiny_config(assets, run_dir, data_file=None, **groups):
    """The demo config, pointed at the session's assets; ``groups`` update sub-configs."""
    raw = {
        "run_dir": str(run_dir),
        "model": {"path": str(assets["model"])},
        "data": {"train_files": [str(data_file or assets["data"])], "eval_fraction": 0.1},
        "tokenize": {"max_length": 64, "max_tokens_per_row": 1024, "rows_per_shard": 32,
                     "rows_per_task": 1000, "actors": 2},
        "score": {"actors": 2},
        "train": {"learning_rate": 1e-3, "lr_scheduler_type": "cosine", "min_lr_ratio": 0.1,
                  "warmup_ratio": 0.05, "eval_steps": 20, "num_workers": 2},
        "cluster": {"num_cpus": 2},
    }
    for group, values in groups.items():
        raw[group].update(values)
    return config_from_dict(raw)
