from pathlib import Path

import pytest
import yaml

from helpers import run_cli
from pipeline.core.config import ConfigError, dump_yaml, load_config

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
        ("tokenize.pack_buffer_tokens=0", "tokenize.pack_buffer_tokens: must be >= 1"),
        ("train.beta", "expected key.sub=value"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, BASE), [override])


def test_share_prompt_follows_the_attention_and_refuses_what_cannot_run_it(tmp_path):
    from pipeline.core.config import shares_prompt

    for attn, default in (("segment_sdpa", True), ("sdpa", True), ("eager", True), ("flash_attention_2", False)):
        cfg = load_config(write(tmp_path, BASE), [f"model.attn_implementation={attn}"])
        assert cfg.tokenize.share_prompt is None and shares_prompt(cfg) is default
        assert shares_prompt(load_config(write(tmp_path, BASE), [f"model.attn_implementation={attn}",
                                                                 "tokenize.share_prompt=false"])) is False
    with pytest.raises(ConfigError, match="tokenize.share_prompt: true needs model.attn_implementation segment_sdpa, "
                                          "sdpa, eager .it is flash_attention_2"):
        load_config(write(tmp_path, BASE), ["model.attn_implementation=flash_attention_2", "tokenize.share_prompt=true"])


@pytest.mark.slow
def test_cli_reports_a_typo_without_a_traceback():
    proc = run_cli(REPO / "configs" / "tiny.yaml", "train.bta=0.2", check=False, timeout=120)
    assert proc.returncode == 2
    assert "error: unknown config key train.bta" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.loss_type=exo_pair"], "train.label_smoothing: exo_pair needs epsilon > 0 .*1e-3"),
        (["train.loss_type=hinge", "train.label_smoothing=0.1"], r"train.label_smoothing: 0.1 has no effect on \['hinge'\]"),
        (["train.loss_type=bco_pair", "train.f_divergence_type=forward_kl"], "train.f_divergence_type: forward_kl has no valid"),
        (["train.f_alpha_divergence_coef=0.3"], "train.f_alpha_divergence_coef: only used with"),
        (["train.loss_type=[sigmoid, sft]", "train.loss_weights=[1.0]"], "train.loss_weights: 1 weights for 2"),
        (["train.loss_type=ipo", "train.aggregation=mean"], r"train.aggregation: mean would length-normalise \['ipo'\]"),
        (["train.ld_alpha=1.5"], r"train.ld_alpha: must be in \[0, 1\]"),
        (["train.loss_type=aot", "train.use_weighting=true"], "train.use_weighting: WPO weights are per pair"),
        (["train.ref_model_mixup_alpha=0.6"], "train.ref_model_mixup_alpha: TR-DPO's alpha applies only with "
                                              "train.sync_ref_model: true"),
        (["train.sync_ref_model=true", "train.loss_type=simpo"], "train.sync_ref_model: simpo read no reference"),
        (["train.sync_ref_model=true", "train.loss_type=[cpo, orpo]"], "train.sync_ref_model: cpo/orpo read no"),
        (["train.sync_ref_model=true", "train.reference_free=true"], "train.sync_ref_model: train.reference_free"),
        (["train.sync_ref_model=true", "train.ref_model_mixup_alpha=0"], r"train.ref_model_mixup_alpha: must be in \(0, 1\] \(it is 0"),
        (["train.sync_ref_model=true", "train.ref_model_mixup_alpha=1.5"], r"train.ref_model_mixup_alpha: must be in \(0, 1\]"),
        (["train.sync_ref_model=true", "train.ref_model_sync_steps=0"], "train.ref_model_sync_steps: must be >= 1"),
        (["train.sync_ref_model=true", "train.zero_stage=2"], "train.sync_ref_model: .* needs train.zero_stage: 3 .it is 2"),
        (["train.sync_ref_model=true", "train.deepspeed={zero_optimization: {offload_optimizer: {device: nvme}}}"],
         "train.sync_ref_model: .* offload_optimizer on nvme"),
        (["train.sync_ref_model=true", "train.deepspeed={zero_optimization: {offload_param: {device: nvme}}}"],
         "train.sync_ref_model: .* offload_param on nvme"),
        (["train.loss_type=simpo_v2"], "train.loss_type: 'simpo_v2' is not one of"),
    ],
)
def test_impossible_loss_settings_name_the_setting(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, BASE), overrides)


def test_reference_free_losses_skip_scoring(tmp_path):
    from pipeline.core.config import build_loss

    def loss(*overrides):
        return build_loss(load_config(write(tmp_path, BASE), list(overrides)).train)

    assert not loss("train.loss_type=simpo").needs_reference
    assert not loss("train.reference_free=true").needs_reference
    assert loss("train.loss_type=[simpo, sigmoid]").needs_reference
    assert loss("train.rpo_alpha=0.3", "train.loss_type=aot_pair").terms == (("aot_unpaired", 1.0), ("sft", 0.3))


@pytest.mark.parametrize("name", ["tiny.yaml", "qwen2.5-1.5b-1node.yaml", "llama3.1-8b-multinode.yaml"])
def test_shipped_configs_load(name):
    """The example configs are valid configs (every key known, every value in range)."""
    cfg = load_config(str(Path(__file__).parent.parent / "configs" / name), [])
    if name != "tiny.yaml":
        assert cfg.train.use_gpu and cfg.score.num_gpus_per_actor == 1
        assert cfg.model.dtype == "bfloat16" and cfg.train.zero_stage == 3
        assert "://" in cfg.run_dir  # shared storage


def test_run_help_lists_every_stage(capsys):
    from pipeline import cli
    from pipeline.registry import names

    STAGES = names()

    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"comma-separated subset of {','.join(STAGES)}" in text and "sft" in STAGES
    assert f"run this stage ({', '.join(STAGES)}) and every later one" in text


def test_tr_dpo_settings_enter_trains_fingerprint_only_when_on(tmp_path):
    """Without sync_ref_model TR-DPO's tau is not in train's fingerprint (runs made before it
    keep theirs); with it, tau is, and the alpha that applies (null is TRL's 0.6: the same run)."""
    from stages.train.driver import train_settings

    def settings(*overrides):
        return train_settings(load_config(write(tmp_path, BASE), list(overrides)).train)

    plain = settings()
    assert "ref_model_sync_steps" not in plain and plain["ref_model_mixup_alpha"] is None
    assert settings("train.ref_model_sync_steps=64") == plain
    on = settings("train.sync_ref_model=true")
    assert on["ref_model_sync_steps"] == 512 and on["ref_model_mixup_alpha"] == 0.6
    assert settings("train.sync_ref_model=true", "train.ref_model_mixup_alpha=0.6") == on
    assert settings("train.sync_ref_model=true", "train.ref_model_sync_steps=64") != on
    assert settings("train.sync_ref_model=true", "train.ref_model_mixup_alpha=0.5") != on


def test_a_data_error_raised_in_a_ray_worker_is_said_in_one_line():
    """Ray wraps a worker's exception in a RayTaskError that is also an instance of its
    class, whose text holds the worker's traceback: the CLI says the cause's message."""
    from ray.exceptions import RayTaskError

    from pipeline.cli import user_error
    from pipeline.core.config import DataError

    try:
        raise DataError("data.train_files: x.json holds neither a JSON array of rows nor JSON Lines")
    except DataError as e:
        wrapped = RayTaskError("tokenize_unit", "Traceback (most recent call last):\n  frames", e).as_instanceof_cause()
    assert isinstance(wrapped, DataError) and "frames" in str(wrapped)  # the worker's text, not the message
    assert user_error(wrapped) == "data.train_files: x.json holds neither a JSON array of rows nor JSON Lines"
