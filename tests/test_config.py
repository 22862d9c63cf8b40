import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, dump_yaml, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, raw) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


BASE = {"model": {"path": "m"}, "data": {"train_files": ["d.jsonl"]}}


def test_tiny_config_loads_and_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert cfg.run_dir == "runs/tiny" and cfg.train.loss_type == "sigmoid"
    again = load_config(write(tmp_path, yaml.safe_load(dump_yaml(cfg))))
    assert again == cfg


def test_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.beta=0.25", "train.num_workers=4",
                                              "train.gradient_checkpointing=true",
                                              "data.train_files=[a.jsonl, b.parquet]",
                                              "tokenize.max_prompt_length=null"])
    assert cfg.train.beta == 0.25 and cfg.train.num_workers == 4
    assert cfg.train.gradient_checkpointing is True
    assert cfg.data.train_files == ["a.jsonl", "b.parquet"]
    assert cfg.tokenize.max_prompt_length is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.bta=0.1", "unknown config key train.bta"),
        ("trian.beta=0.1", "unknown config key trian"),
        ("train.beta=high", "train.beta: expected a number"),
        ("train.num_workers=1.5", "train.num_workers: expected an integer"),
        ("train.optimizer=sgd", "train.optimizer: 'sgd' is not one of"),
        ("train.loss_type=dpo", "train.loss_type: 'dpo' is not one of"),
        ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing: expected true/false"),
        ("tokenize.max_tokens_per_row=100", "tokenize.max_tokens_per_row .* must be >= 2"),
        ("train.beta", "expected key.sub=value"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, BASE), [override])


def test_cli_reports_a_typo_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(REPO / "configs" / "tiny.yaml"), "train.bta=0.2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert "error: unknown config key train.bta" in proc.stderr
    assert "Traceback" not in proc.stderr
