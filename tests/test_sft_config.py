"""The sft group: what it takes from train, what it refuses, and the fingerprint chain
tokenize -> sft -> score -> train (pipeline/runner.py's plan, no stage run)."""

import pytest
from helpers import tiny_config

from pipeline.core.config import ConfigError, as_written, config_from_dict, to_dict
from pipeline.runner import plan_stages, status
from pipeline.core.storage import Loc


def test_where_sft_runs_is_trains_what_it_trains_is_its_own(assets, tmp_path):
    cfg = tiny_config(assets, tmp_path / "run", sft={"enabled": True, "num_train_epochs": 2, "cpus_per_worker": 0.5},
                      train={"num_workers": 1, "gradient_accumulation_steps": 3, "zero_stage": 2, "seed": 7,
                             "max_steps": 9, "resume_from_checkpoint": "step-00000010", "run_name": "dpo-a",
                             "peft": {"r": 4}, "deepspeed": {"zero_optimization": {"reduce_bucket_size": 1000}}})
    sft = cfg.sft_training()
    # where and how the ranks run: train's, unless given
    assert (sft.num_workers, sft.zero_stage, sft.cpus_per_worker) == (1, 2, 0.5)
    assert sft.deepspeed == {"zero_optimization": {"reduce_bucket_size": 1000}}
    assert "cpus_per_worker" not in cfg.sft.from_train and "num_workers" in cfg.sft.from_train
    # what it trains: its own (TrainConfig's defaults; TRL SFTConfig's learning rate)
    assert sft.num_train_epochs == 2 and sft.learning_rate == 2e-5
    assert (sft.gradient_accumulation_steps, sft.seed, sft.max_steps, sft.peft) == (1, 42, -1, None)
    assert (sft.warmup_ratio, sft.lr_scheduler_type) == (0.0, "linear")  # not tiny_config's train schedule
    assert sft.resume_from_checkpoint is None and sft.run_name is None
    # the config written back (to_dict: the workers', <run_dir>/config.yaml) is the same config,
    # and its inherited keys still follow train
    assert config_from_dict(to_dict(cfg)) == cfg
    again = to_dict(cfg)
    again["train"]["num_workers"], again["train"]["seed"] = 4, 3
    assert (config_from_dict(again).sft.num_workers, config_from_dict(again).sft.seed) == (4, 42)
    # the config a run writes down (config.yaml) leaves the taken keys out: a rerun from it
    # follows train, and a value set there for one of them wins
    written = as_written(cfg)
    assert "from_train" not in written["sft"] and "num_workers" not in written["sft"]
    assert written["sft"]["cpus_per_worker"] == 0.5  # given under sft: kept
    written["train"]["num_workers"] = 3
    assert config_from_dict(written).sft.num_workers == 3
    written["sft"]["zero_stage"] = 1
    assert config_from_dict(written).sft.zero_stage == 1
    with pytest.raises(ConfigError, match=r"^sft\.from_train: set by the pipeline"):
        config_from_dict(dict(to_dict(cfg), sft=dict(to_dict(cfg)["sft"], from_train=["learning_rate"])))


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


def test_every_loss_setting_is_trains_alone():
    """The preference loss object's settings (PreferenceLoss, which build_loss fills from
    the train group) are PreferenceSettings' fields, so none becomes an sft key, and sft
    refuses each of them by name."""
    import dataclasses

    from pipeline.core.config import PreferenceSettings, SFTConfig, TrainConfig, TrainingSettings
    from pipeline.core.losses import PreferenceLoss

    loss = {f.name for f in dataclasses.fields(PreferenceLoss) if f.init}
    preference = {f.name for f in dataclasses.fields(PreferenceSettings)}
    sft = {f.name for f in dataclasses.fields(SFTConfig)}
    assert loss <= preference and not preference & sft
    assert {f.name for f in dataclasses.fields(TrainConfig)} == \
        preference | {f.name for f in dataclasses.fields(TrainingSettings)} | {"merge_adapter"}
    assert sft == {f.name for f in dataclasses.fields(TrainingSettings)} | {"enabled", "data", "from_train"}
    for key in sorted(preference):
        with pytest.raises(ConfigError, match=rf"^sft\.{key}: a setting of the preference loss \(train\.{key}\)"):
            config_from_dict({"sft": {"enabled": True, key: None}})


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
    # what DPO trains is not what SFT trains: a seed or step sweep of DPO keeps the reference
    assert changed(train={"seed": 3, "max_steps": 7, "warmup_ratio": 0.2, "peft": {"r": 4}}) == {"train"}
    # where the ranks run is train's unless sft sets it: the global batch is part of what sft trains
    assert changed(train={"num_workers": 4}) == {"sft", "score", "train"}
    assert changed(train={"num_workers": 4}, sft={"enabled": True, "num_workers": 2}) == {"train"}
    # how sft is checkpointed or placed is not what it trains; its global batch kept: the same run
    assert changed(sft={"enabled": True, "save_steps": 5, "report_to": []}) == set()
    assert changed(sft={"enabled": True, "num_workers": 1, "gradient_accumulation_steps": 2}) == set()
    # a reference-free loss: no score stage, train still starts from the SFT model
    free = fingerprints(tiny_config(assets, tmp_path / "run", sft={"enabled": True},
                                    train={"loss_type": "simpo", "cpo_alpha": 0.0}))
    assert list(free) == ["tokenize", "sft", "train"] and free["sft"] == base["sft"]


def test_status_shows_the_sft_stage(assets, tmp_path):
    rows = {r["stage"]: r for r in status(tiny_config(assets, tmp_path / "run", sft={"enabled": True}))}
    assert list(rows) == ["tokenize", "sft", "score", "train", "generate"]
    assert rows["sft"]["state"] == "missing" and rows["sft"]["fingerprint"] != "-"
    off = {r["stage"]: r for r in status(tiny_config(assets, tmp_path / "run"))}
    assert off["sft"]["state"] == "not needed"


def test_what_each_stage_reads(assets, tmp_path):
    from pipeline.runner import upstream

    def ups(**groups):
        cfg = tiny_config(assets, tmp_path / "run", **groups)
        return upstream(plan_stages(cfg), cfg)

    assert ups() == {"tokenize": set(), "score": {"tokenize"}, "train": {"score", "tokenize"}}
    assert ups(sft={"enabled": True}) == {"tokenize": set(), "sft": {"tokenize"}, "score": {"tokenize", "sft"},
                                          "train": {"score", "sft", "tokenize"}}
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "Q", "completion": "A"}\n')
    own = ups(sft={"enabled": True, "data": {"train_files": [str(data)]}})
    assert own["sft"] == set()  # data of its own: --stages sft needs no tokenize output
    free = ups(sft={"enabled": True}, train={"loss_type": "simpo", "cpo_alpha": 0.0})
    assert free["train"] == {"sft", "tokenize"}


def test_an_output_made_from_another_sft_model_is_stale(tmp_path):
    import json

    from pipeline.core.models import Pinned
    from pipeline.runner import StagePlan
    from pipeline.runner import stale_output as stale_sft_output
    from pipeline.core.stage import model_marker

    SFT_MARKER = model_marker("sft")

    plan = StagePlan("score", "f" * 16, Loc(tmp_path / "score"), {})
    now = Pinned("model.path", "x", "local", "/x", export_digest="b" * 64)
    assert stale_sft_output("score", plan, "missing", now) is None
    (tmp_path / "score").mkdir()
    (tmp_path / "score" / SFT_MARKER).write_text(json.dumps({"export_digest": "a" * 64}))
    assert stale_sft_output("score", plan, "partial", now).startswith(
        f"score ({'f' * 16}) was made from an SFT model with digest {'a' * 64}, and the sft stage's model is now")
    (tmp_path / "score" / SFT_MARKER).write_text(json.dumps({"export_digest": "b" * 64}))
    assert stale_sft_output("score", plan, "partial", now) is None


def test_a_worker_after_train_takes_the_sft_export_as_its_reference(assets, tmp_path):
    """After sft and train the driver hands the workers a config whose policy is train's
    export and whose reference is sft's; with sft.enabled still set, that is no user giving
    two references (the generate stage's actors refused it: a ConfigError in the worker)."""
    import shutil

    from pipeline.core import models
    from pipeline.core.config import for_workers

    cfg = tiny_config(assets, tmp_path / "run", sft={"enabled": True})
    sft_export, train_export = (shutil.copytree(assets["model"], tmp_path / name) for name in ("sft", "train"))
    cfg, _ = models.pin_trained(cfg, str(sft_export), "d1", ("path", "reference_path"))
    cfg, _ = models.pin_trained(cfg, str(train_export), "d2", ("path",))
    worker = config_from_dict(for_workers(cfg), handed_on=True)
    assert (worker.model.path, worker.reference_path) == (str(train_export), str(sft_export))
    with pytest.raises(ConfigError, match=r"model\.reference_path and sft\.enabled"):  # as a user's config
        config_from_dict(for_workers(cfg))
