"""Stale or damaged outputs never reach training: fingerprints per input, pair-id checks,
bad reference values, truncated shards, secrets kept out of what is written down."""

import json
import shutil

from pathlib import Path

import pytest

from helpers import tiny_config
from pipeline import runner
from pipeline.core.config import config_from_dict, redact, to_dict
from pipeline.demo import make_pairs, write_jsonl
from pipeline.core.rundir import stage_state
from stages import train
from stages.score import stage as score


@pytest.fixture()
def small(assets, tmp_path):
    data = tmp_path / "pairs.jsonl"
    write_jsonl(make_pairs(300, seed=2), data)
    model = tmp_path / "model"
    shutil.copytree(assets["model"], model)
    cfg = tiny_config(assets, tmp_path / "run", data_file=data, tokenize={"max_tokens_per_row": 256,
                                                                          "rows_per_shard": 4},
                      train={"max_steps": 2})
    raw = to_dict(cfg)
    raw["model"]["path"] = str(model)
    return config_from_dict(raw), tmp_path


def fps(cfg):
    return {name: plan.fingerprint for name, plan in runner.plan_stages(cfg).items()}


def changed(cfg, section, key, value):
    raw = to_dict(cfg)
    raw[section][key] = value
    return fps(config_from_dict(raw))


def test_each_input_changes_exactly_the_stages_it_feeds(small):
    cfg, tmp = small
    base = fps(cfg)

    def differ(new):
        return [s for s in base if new[s] != base[s]]

    # settings
    assert differ(changed(cfg, "tokenize", "max_length", 48)) == ["tokenize", "score", "train"]
    assert differ(changed(cfg, "model", "dtype", "bfloat16")) == ["score", "train"]
    assert differ(changed(cfg, "model", "attn_implementation", "eager")) == ["score", "train"]
    assert differ(changed(cfg, "train", "beta", 0.3)) == ["train"]
    assert differ(changed(cfg, "train", "seed", 7)) == ["train"]  # epoch plans, torch
    assert differ(changed(cfg, "data", "seed", 7)) == ["tokenize", "score", "train"]  # split, row shuffle
    # settings that do not change any output
    assert differ(changed(cfg, "tokenize", "actors", 2)) == []
    assert differ(changed(cfg, "tokenize", "pack_buffer_tokens", 5)) == []
    assert differ(changed(cfg, "score", "actors", 2)) == []
    assert differ(changed(cfg, "train", "save_steps", 7)) == []
    # file contents, not names or times
    data = cfg.data.train_files[0]
    with open(data, "a") as f:
        f.write(json.dumps(make_pairs(1, seed=99)[0]) + "\n")
    after_data = fps(cfg)
    assert differ(after_data) == ["tokenize", "score", "train"]
    base = after_data
    model = tmp / "model"
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok["model_max_length"] = 77
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    after_tok = fps(cfg)
    assert differ(after_tok) == ["tokenize", "score", "train"]
    base = after_tok
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    weights["lm_head.weight"][0, 0] += 1.0
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert differ(fps(cfg)) == ["score", "train"]  # reference weights (= the policy's start)
    (model / "model.safetensors").touch()  # a new mtime alone re-hashes, same content
    assert fps(cfg) == fps(cfg) and differ(fps(cfg)) == ["score", "train"]


def test_a_train_seed_sweep_reuses_the_tokenized_and_scored_rows(small):
    """train.seed seeds the epoch plans and torch only; the split and the row shuffle are
    data.seed's, so a seed sweep trains again on the same rows and never rescores."""
    cfg, _ = small
    first = runner.run_pipeline(cfg, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    raw = to_dict(cfg)
    raw["train"]["seed"] = 7
    sweep = runner.run_pipeline(config_from_dict(raw), stages=["tokenize", "score"], use_ray=False,
                                log=lambda _: None)
    assert [r["ran"] for r in sweep.values()] == [False, False]  # done: both skip
    assert [sweep[s]["dir"] for s in ("tokenize", "score")] == [first[s]["dir"] for s in ("tokenize", "score")]
    assert runner.plan_stages(config_from_dict(raw))["train"].dir != runner.plan_stages(cfg)["train"].dir
    raw["data"]["seed"] = 7
    resplit = runner.run_pipeline(config_from_dict(raw), stages=["tokenize"], use_ray=False, log=lambda _: None)
    assert resplit["tokenize"]["ran"] and resplit["tokenize"]["dir"] != first["tokenize"]["dir"]


def test_stage_version_is_in_the_fingerprint(small, monkeypatch):
    cfg, _ = small
    base = fps(cfg)
    monkeypatch.setattr(score, "STAGE_VERSION", score.STAGE_VERSION + 1)
    new = fps(cfg)
    assert [s for s in base if new[s] != base[s]] == ["score", "train"]


def test_truncated_shard_is_detected_and_only_it_is_rescored(small):
    cfg, _ = small
    runner.run_pipeline(cfg, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    plans = runner.plan_stages(cfg)
    score_dir = Path(plans["score"].dir)
    shards = sorted(score_dir.glob("train-*.parquet"))
    assert len(shards) >= 3
    clean = {p.name: p.read_bytes() for p in shards}
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    victim = shards[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert stage_state(score_dir) == "partial"
    results = runner.run_pipeline(cfg, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    assert [r["ran"] for r in results.values()] == [False, True]
    for p in sorted(score_dir.glob("train-*.parquet")):
        assert p.read_bytes() == clean[p.name]  # bit for bit
        if p.name != victim.name:
            assert p.stat().st_mtime_ns == mtimes[p.name]  # untouched
    assert stage_state(score_dir) == "done"


def test_train_refuses_rows_whose_pair_ids_differ(small, assets, tmp_path):
    cfg, _ = small
    runner.run_pipeline(cfg, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    plans = runner.plan_stages(cfg)
    fingerprints = {k: p.fingerprint for k, p in plans.items()}
    train.verify_rows(plans["score"].dir, plans["tokenize"].dir, fingerprints)  # consistent: no error
    other = tiny_config(assets, tmp_path / "other", data_file=cfg.data.train_files[0],
                        tokenize={"max_tokens_per_row": 256, "rows_per_shard": 4}, data={"seed": 7})
    runner.run_pipeline(other, stages=["tokenize"], use_ray=False, log=lambda _: None)
    other_tok = Path(runner.plan_stages(other)["tokenize"].dir)
    # the same pairs packed with another seed: same shard names, other pairs in each row
    with pytest.raises(RuntimeError, match=r"train-00000.parquet row \d+: pair_ids"):
        train.verify_rows(plans["score"].dir, other_tok, fingerprints)
    with pytest.raises(RuntimeError, match="were scored from tokenize output"):
        train.verify_rows(plans["score"].dir, plans["tokenize"].dir, dict(fingerprints, tokenize="0" * 16))


def test_nan_reference_log_probs_fail_the_score_stage_naming_rows(small):
    cfg, tmp = small
    runner.run_pipeline(cfg, stages=["tokenize"], use_ray=False, log=lambda _: None)
    from safetensors.torch import load_file, save_file

    model = tmp / "model"
    weights = load_file(model / "model.safetensors")
    weights["lm_head.weight"][5] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"score: row \d+ has \d+ reference log-probs that are NaN"):
        runner.run_pipeline(cfg, stages=["score"], use_ray=False, log=lambda _: None)


def test_secrets_are_never_written_down(small):
    cfg, tmp = small
    raw = to_dict(cfg)
    raw["cluster"]["runtime_env"] = {"env_vars": {"HF_TOKEN": "hf_abc123", "WANDB_API_KEY": "k-999",
                                                  "OMP_NUM_THREADS": "1"}}
    cfg = config_from_dict(raw)
    assert redact(to_dict(cfg))["data"]["prompt_key"] == "prompt"
    runner.run_pipeline(cfg, stages=["tokenize"], use_ray=False, log=lambda _: None)
    written = (tmp / "run" / "config.yaml").read_text() + "".join(
        p.read_text() for p in (tmp / "run").rglob("_MANIFEST.json"))
    assert "hf_abc123" not in written and "k-999" not in written
    assert "OMP_NUM_THREADS: '1'" in written or '"OMP_NUM_THREADS": "1"' in written
