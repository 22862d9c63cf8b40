"""No credential reaches a file the pipeline writes: neither under a secret key, nor inside
a value (URI user-info, secret query parameters), nor through the environment."""

import json
from pathlib import Path

import pytest

from helpers import tiny_config
from pipeline import runner
from pipeline.core.config import config_from_dict, to_dict
from pipeline.demo import make_pairs, write_jsonl
from pipeline.core.redaction import REDACTED, redact_text, redact_values

ENV_SECRET = "wandb-0123456789abcdef0123"


@pytest.mark.parametrize("text, want", [
    ("s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI@bucket/pairs.jsonl", "s3://<redacted>@bucket/pairs.jsonl"),
    ("https://alice:hunter2@mlflow.example.com/api", "https://<redacted>@mlflow.example.com/api"),
    ("--index-url https://__token__:pypi-AgEIcHlwaS5vcmc@pypi.example.com/simple numpy",
     "--index-url https://<redacted>@pypi.example.com/simple numpy"),
    ("https://bucket.s3.amazonaws.com/m.bin?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12&part=3",
     "https://bucket.s3.amazonaws.com/m.bin?X-Amz-Credential=<redacted>&X-Amz-Signature=<redacted>&part=3"),
    ("https://hub.example.com/data?token=abc123", "https://hub.example.com/data?token=<redacted>"),
    # AWS secret keys hold "/", passwords may hold "@"
    ("s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@bucket/k",
     "s3://<redacted>@bucket/k"),
    ("https://user:p@ss@host/x", "https://<redacted>@host/x"),
    ("https://TOKEN123@pypi.fury.io/acme/", "https://<redacted>@pypi.fury.io/acme/"),
    # what must stay as it is
    ("git+https://github.com/org/repo@v1.0", "git+https://github.com/org/repo@v1.0"),
    ("https://host:443/x, or write to me@example.com", "https://host:443/x, or write to me@example.com"),
    ("s3://bucket/runs/tiny", "s3://bucket/runs/tiny"),
    ("/data/prompt_key/max_tokens_per_row.jsonl", "/data/prompt_key/max_tokens_per_row.jsonl"),
    ("user@example.com wrote this", "user@example.com wrote this"),
])
def test_credentials_inside_values_are_redacted(text, want):
    assert redact_text(text, env_values=[]) == want


def test_secret_environment_values_are_redacted_wherever_they_appear():
    env = {"HF_TOKEN": "hf_abcdefghijklmnopqrstuv", "WANDB_MODE": "offline", "API_KEY": "short"}
    from pipeline.core.redaction import env_secret_values

    values = env_secret_values(env)
    assert values == ["hf_abcdefghijklmnopqrstuv"]  # not a short or a non-secret variable's value
    tree = {"a": ["x hf_abcdefghijklmnopqrstuv y", 3], "hf_abcdefghijklmnopqrstuv": True, "mode": "offline"}
    assert redact_values(tree, values) == {"a": [f"x {REDACTED} y", 3], REDACTED: True, "mode": "offline"}


@pytest.mark.slow  # the train stage's DeepSpeed starts numactl
def test_no_file_of_a_run_holds_a_credential(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", ENV_SECRET)
    secrets = ["pypi-AgEIcHlwaS5vcmc", "hunter2-very-secret", "hf_SECRETSECRETSECRET", ENV_SECRET]
    data = tmp_path / "pairs.jsonl"
    rows = make_pairs(60, seed=3)
    rows[5]["chosen"] = ""  # quarantined: the quarantine file is written too
    write_jsonl(rows, data)
    cfg = tiny_config(assets, tmp_path / "run", data_file=data, tokenize={"max_tokens_per_row": 256},
                      train={"max_steps": 2, "num_workers": 1, "report_to": ["tensorboard"]})
    raw = to_dict(cfg)
    raw["cluster"]["runtime_env"] = {
        "pip": ["--index-url https://__token__:pypi-AgEIcHlwaS5vcmc@pypi.example.com/simple", "numpy"],
        "env_vars": {"MLFLOW_TRACKING_URI": "https://alice:hunter2-very-secret@mlflow.example.com",
                     "HF_TOKEN": "hf_SECRETSECRETSECRET",
                     # a registry that takes its token in the path, given through the environment
                     "PIP_EXTRA_INDEX_URL": f"https://pkgs.example.com/{ENV_SECRET}/simple"},
    }
    cfg = config_from_dict(raw)
    runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)

    written = [p for p in Path(cfg.run_dir).rglob("*") if p.is_file()]
    assert any(p.name == "quarantine.parquet" for p in written)
    assert any(p.name == "dpo_pipeline.json" for p in written)
    leaks = {str(p.relative_to(cfg.run_dir)): s for p in written for s in secrets if s.encode() in p.read_bytes()}
    assert leaks == {}
    saved = (Path(cfg.run_dir) / "config.yaml").read_text()
    # redacted, not dropped: the rest of each value stays readable
    assert "https://<redacted>@pypi.example.com/simple" in saved
    assert "https://<redacted>@mlflow.example.com" in saved
    assert f"https://pkgs.example.com/{REDACTED}/simple" in saved
    export = next(p for p in written if p.name == "dpo_pipeline.json")
    assert json.loads(export.read_text())["config"]["cluster"]["runtime_env"]["env_vars"]["HF_TOKEN"] == REDACTED


def test_the_spec_s_repr_holds_no_credential():
    """A spec's repr can reach a log line or an error message."""
    from pipeline.training.loop import WorkerSpec

    spec = WorkerSpec({"cluster": {"runtime_env": {"env_vars": {"HF_TOKEN": "hf_SECRETSECRETSECRET"}}}}, None,
                      "s3://AKIA:SECRETKEY@bucket/rows", "s3://AKIA:SECRETKEY@bucket/out", {}, True,
                      env={"WANDB_API_KEY": ENV_SECRET})
    text = str({"spec": spec})
    assert not any(s in text for s in ("hf_SECRETSECRETSECRET", "SECRETKEY", ENV_SECRET)), text
