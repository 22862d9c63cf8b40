"""The sft group: what it takes from train, what it refuses, and the fingerprint chain
tokenize -> sft -> score -> train (pipeline/runner.py's plan, no stage run)."""

import pytest
from helpers import tiny_config

from pipeline.config import ConfigError, config_from_dict, to_dict
from pipeline.runner import plan_stages, status


def test_sft_options_not_given_are_trains_except_its_own_defaults(assets, tmp_path):
    cfg = tiny_config(assets, tmp_path / "run", sft={"enabled": True, "num_train_epochs": 2},
                      train={"num_workers": 1, "gradient_accumulation_steps": 3, "zero_stage": 2,
                             "resume_from_checkpoint": "step-00000010", "run_name": "dpo-a"})
    sft = cfg.sft_training()
    assert (sft.num_workers, sft.gradient_accumulation_steps, sft.zero_stage) == (1, 3, 2)  # train's
    assert sft.num_train_epochs == 2  # its own, given
    assert sft.learning_rate == 2e-5  # TRL SFTConfig's default, not train's 1e-3
    assert sft.resume_from_checkpoint is None and sft.run_name is None  # a train checkpoint is not sft's
    assert (sft.warmup_ratio, sft.min_lr_ratio) == (0.05, 0.1)  # train's, as written in tiny_config
    # the config written back (to_dict, as the workers receive it) is the same config
    assert config_from_dict(to_dict(cfg)) == cfg


def test_sft_refuses_what_is_not_its_own(assets, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.reference_path and sft\.enabled"):
        tiny_config(assets, tmp_path / "run", sft={"enabled": True}, model={"reference_path": str(assets["model"])})
    with pytest.raises(ConfigError, match=r"^sft\.beta: a setting of the preference loss"):
        tiny_config(assets, tmp_path / "run", sft={"enabled": True, "beta": 0.5})
    with pytest.raises(ConfigError, match=r"^sft\.merge_adapter: .*merged model"):
        tiny_config(assets, tmp_path / "run", sft={"enabled": True, "merge_adapter": True})
    with pytest.raises(ConfigError, match=r"^sft\.learning_rate: must be > 0"):
        tiny_config(assets, tmp_path / "run", sft={"enabled": True, "learning_rate": 0.0})
    with pytest.raises(ConfigError, match=r"^sft\.gradient_accumulation_steps: must be >= 1"):
        tiny_config(assets, tmp_path / "run", sft={"enabled": True, "gradient_accumulation_steps": 0})
    with pytest.raises(ConfigError, match=r"sft\.data: 'files' is not one of \['chosen'\]"):
        tiny_config(assets, tmp_path / "run", sft={"enabled": True, "data": "files"})
    # an sft group that is off is not checked against model.reference_path
    tiny_config(assets, tmp_path / "run", sft={"enabled": False}, model={"reference_path": str(assets["model"])})


def fingerprints(cfg) -> dict:
    return {name: plan.fingerprint for name, plan in plan_stages(cfg).items()}


def test_sft_disabled_changes_no_fingerprint(assets, tmp_path):
    plain = fingerprints(tiny_config(assets, tmp_path / "run"))
    off = fingerprints(tiny_config(assets, tmp_path / "run", sft={"enabled": False, "learning_rate": 0.5,
                                                                    "num_train_epochs": 3}))
    assert off == plain and "sft" not in plain


def test_the_fingerprint_chain(assets, tmp_path):
    base = fingerprints(tiny_config(assets, tmp_path / "run", sft={"enabled": True}))
    plain = fingerprints(tiny_config(assets, tmp_path / "run"))
    assert list(base) == ["tokenize", "sft", "score", "train"]
    assert base["tokenize"] == plain["tokenize"]
    assert base["score"] != plain["score"] and base["train"] != plain["train"]  # the SFT model, not model.path

    def changed(**groups) -> set:
        other = fingerprints(tiny_config(assets, tmp_path / "run", **{"sft": {"enabled": True}, **groups}))
        return {name for name in base if other[name] != base[name]}

    # an sft setting reruns sft, score and train; a train setting reruns train only
    assert changed(sft={"enabled": True, "learning_rate": 1e-4}) == {"sft", "score", "train"}
    assert changed(sft={"enabled": True, "warmup_ratio": 0.2}) == {"sft", "score", "train"}
    assert changed(train={"beta": 0.5}) == {"train"}
    # a train option sft takes unless it sets its own: both stages see it
    assert changed(train={"warmup_ratio": 0.2}) == {"sft", "score", "train"}
    assert changed(train={"warmup_ratio": 0.2}, sft={"enabled": True, "warmup_ratio": 0.05}) == {"train"}
    # how sft is checkpointed or placed is not what it trains; its global batch kept: the same run
    assert changed(sft={"enabled": True, "save_steps": 5, "report_to": []}) == set()
    assert changed(sft={"enabled": True, "num_workers": 1, "gradient_accumulation_steps": 2}) == set()
    # a reference-free loss: no score stage, train still starts from the SFT model
    free = fingerprints(tiny_config(assets, tmp_path / "run", sft={"enabled": True},
                                    train={"loss_type": "simpo", "cpo_alpha": 0.0}))
    assert list(free) == ["tokenize", "sft", "train"] and free["sft"] == base["sft"]


def test_status_shows_the_sft_stage(assets, tmp_path):
    rows = {r["stage"]: r for r in status(tiny_config(assets, tmp_path / "run", sft={"enabled": True}))}
    assert list(rows) == ["tokenize", "sft", "score", "train"]
    assert rows["sft"]["state"] == "missing" and rows["sft"]["fingerprint"] != "-"
    off = {r["stage"]: r for r in status(tiny_config(assets, tmp_path / "run"))}
    assert off["sft"]["state"] == "not needed"
