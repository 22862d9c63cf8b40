"""A run that stops on its data ends as a bad setting does: one line naming the file, the
key or the quarantine file with its top reasons, exit code 2, no traceback; in one
process and on Ray. A crash keeps its traceback and exit code 1."""

import json

import pytest

from helpers import run_cli, tiny_config, write_config
from pipeline.demo import make_pairs, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def one_line_error(proc, pattern: str) -> str:
    """The run failed with exit code 2 and its output ends in one ``error:`` line matching
    ``pattern``, with no traceback anywhere."""
    import re

    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(pattern, last), last
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    return last


def config(assets, tmp_path, pairs, **groups):
    return write_config(tiny_config(assets, tmp_path / "run", data_file=pairs, **groups), tmp_path / "run.yaml")


@pytest.fixture
def half_bad(tmp_path):
    """40 pairs, 10 of them with an empty chosen answer."""
    rows = make_pairs(40, seed=5)
    for r in rows[:10]:
        r["chosen"] = [{"role": "assistant", "content": " "}]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(rows, path)
    return path


def test_too_many_bad_rows_end_in_one_line_naming_the_quarantine(assets, tmp_path, half_bad):
    proc = run_cli(config(assets, tmp_path, half_bad, tokenize={"max_bad_fraction": 0.1}), check=False)
    one_line_error(proc, r"tokenize: 10 of 40 pairs quarantined as bad \(25\.0% > tokenize.max_bad_fraction "
                         r"10\.0%\): empty_completion: 10; see .*quarantine\.parquet")


def test_no_training_pairs_end_in_one_line(assets, tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(make_pairs(3, seed=1), path)  # 3 pairs: every prompt to the eval split
    proc = run_cli(config(assets, tmp_path, path, data={"eval_fraction": 0.99}), check=False)
    one_line_error(proc, r"tokenize: no training pairs left \(all quarantined or in eval\): see .*quarantine\.parquet "
                         r"and data.eval_fraction")


def test_a_file_in_no_format_ends_in_one_line_naming_it(assets, tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"a": [1], "b": 2}))
    proc = run_cli(config(assets, tmp_path, path), check=False)
    one_line_error(proc, r"data.train_files: .*pairs.json holds neither a JSON array of rows nor JSON Lines")


def test_on_ray_too(assets, tmp_path, half_bad, ray_cluster):
    proc = run_cli(config(assets, tmp_path, half_bad, tokenize={"max_bad_fraction": 0.1}),
                   f"cluster.address={ray_cluster}", ray=True, check=False)
    one_line_error(proc, r"tokenize: 10 of 40 pairs quarantined as bad .*empty_completion: 10; see ")


def test_a_crash_keeps_its_traceback_and_exit_code_1(assets, tmp_path):
    """A model directory without weights is a crash of the loader, not the user's data."""
    path = tmp_path / "pairs.jsonl"
    write_jsonl(make_pairs(40, seed=2), path)
    cfg = config(assets, tmp_path, path, tokenize={"max_length": 64})
    raw = cfg.read_text().replace(str(assets["model"]), str(tmp_path / "model"))
    import shutil

    shutil.copytree(assets["model"], tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"not safetensors")
    cfg.write_text(raw)
    proc = run_cli(cfg, check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr, (proc.returncode, proc.stderr[-2000:])
