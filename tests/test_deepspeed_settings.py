"""The DeepSpeed settings users bring (``train.deepspeed``): a JSON file deep-merged over the
config the pipeline builds, the keys it owns protected, and ZeRO-3 offload to the CPU run
for real on two ranks with DeepSpeed's JIT-built CPU Adam."""

import json

import pytest

from helpers import tiny_config, train_metrics
from pipeline import runner
from pipeline.core.config import ConfigError, load_config
from cluster.deepspeed_config import build_ds_config

OFFLOAD = {"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": False},
                                 "offload_param": {"device": "cpu", "pin_memory": False}}}


def built(ds: dict, **train) -> dict:
    cfg = tiny_config({"model": "m", "data": "d.jsonl"}, "run", train=dict(train, deepspeed=ds))
    return build_ds_config(cfg.train, cfg.model.dtype, cfg.train.num_workers, hidden_size=64)


def test_a_user_json_is_merged_over_the_built_config(tmp_path):
    ds = {"gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": 1234,
                                **OFFLOAD["zero_optimization"]},
          "bf16": {"enabled": "auto"}, "communication_data_type": "fp32"}
    got = built(ds, gradient_accumulation_steps=4)
    plain = built(None, gradient_accumulation_steps=4)
    # the pipeline's values where the JSON says auto or repeats them
    assert got["gradient_accumulation_steps"] == 4 and got["train_batch_size"] == 8 == plain["train_batch_size"]
    assert got["zero_optimization"]["reduce_bucket_size"] == plain["zero_optimization"]["reduce_bucket_size"] == 1 << 20
    assert got["bf16"] == {"enabled": False}
    # the user's everywhere else
    assert got["zero_optimization"]["stage3_prefetch_bucket_size"] == 1234
    assert got["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert got["communication_data_type"] == "fp32"
    # and nothing else moved
    rest = {k: v for k, v in got.items() if k not in ("zero_optimization", "communication_data_type")}
    assert rest == {k: v for k, v in plain.items() if k != "zero_optimization"}


@pytest.mark.parametrize("ds, message", [
    ({"gradient_accumulation_steps": 8}, r"train.deepspeed: gradient_accumulation_steps is 8, and the pipeline sets 1 "
                                         r"from train.gradient_accumulation_steps: change that setting instead"),
    ({"train_micro_batch_size_per_gpu": 4}, r"train_micro_batch_size_per_gpu is 4, and the pipeline sets 1 from the "
                                            r"pipeline \(one packed row is one micro-batch\)"),
    ({"gradient_clipping": 0.5}, r"gradient_clipping is 0.5, and the pipeline sets 1.0 from train.max_grad_norm"),
    ({"bf16": {"enabled": True}}, r"bf16.enabled is True, and the pipeline sets False from model.dtype"),
    ({"zero_optimization": {"stage": 2}}, r"zero_optimization.stage is 2, and the pipeline sets 3 from train.zero_stage"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}, r"train.deepspeed: optimizer: the pipeline builds it "
                                                               r"from train.optimizer, learning_rate"),
    ({"scheduler": {"type": "WarmupLR"}}, r"train.deepspeed: scheduler: the pipeline builds it from "
                                          r"train.lr_scheduler_type"),
])
def test_the_keys_the_pipeline_owns_cannot_be_changed(ds, message):
    with pytest.raises(ConfigError, match=message):
        built(ds)


def test_a_section_must_stay_a_section():
    with pytest.raises(ConfigError, match=r"train.deepspeed: zero_optimization is True, and DeepSpeed expects a "
                                          r"section \(a mapping\) there"):
        built({"zero_optimization": True})
    with pytest.raises(ConfigError, match=r"train.deepspeed: bf16 is True, and DeepSpeed expects a section"):
        built({"bf16": True})


def test_offload_needs_what_it_needs():
    with pytest.raises(ConfigError, match=r"offload_optimizer needs train.zero_stage 1, 2 or 3 \(it is 0"):
        built({"zero_optimization": {"stage": "auto", "offload_optimizer": {"device": "cpu"}}}, zero_stage=0)
    with pytest.raises(ConfigError, match=r"offload_param needs train.zero_stage 3 \(it is 2\)"):
        built({"zero_optimization": {"stage": "auto", "offload_param": {"device": "cpu"}}}, zero_stage=2)
    with pytest.raises(ConfigError, match=r"offload_optimizer steps the optimizer on the CPU with DeepSpeedCPUAdam, and "
                                          r"train.optimizer is 'rmsprop'"):
        built(OFFLOAD, optimizer="rmsprop")


@pytest.mark.parametrize("ds, message", [
    ({"checkpoint": {"load_universal": True}}, r"train.deepspeed: checkpoint.load_universal: the pipeline converts a "
                                               r"checkpoint to DeepSpeed's universal format and loads it itself"),
    ({"checkpoint": {"writer": {"type": "fast"}}}, r"train.deepspeed: checkpoint.writer selects DeepSpeed's fast or "
                                                   r"decoupled checkpoint engine"),
    ({"checkpoint": {"writer": {"decoupled": True}}}, r"train.deepspeed: checkpoint.writer selects"),
    ({"datastates_ckpt": {}}, r"train.deepspeed: datastates_ckpt selects DataStates' checkpoint engine"),
    ({"torch_autocast": {"enabled": True}}, r"train.deepspeed: torch_autocast.enabled would run the policy's log-prob "
                                            r"pass under autocast"),
    ({"nebula": {"enabled": True}}, r"train.deepspeed: DeepSpeed refuses the merged config: Nebula checkpointing has "
                                    r"been removed"),
    ({"zero_optimization": {"stage3_prefetch_bucket": 10}}, r"DeepSpeed refuses the merged config: .*"
                                                            r"stage3_prefetch_bucket Extra inputs are not permitted"),
    ({"checkpoint": {"tag_validation": "bogus"}}, r"DeepSpeed refuses the merged config: Checkpoint config contains "
                                                  r"invalid tag_validation value of BOGUS"),
])
def test_checkpoint_engines_the_ranks_cannot_load_are_refused_on_the_driver(ds, message):
    """Before, the checkpoint engines passed the driver's preflight and every rank refused
    them only after the model had loaded (pipeline/training/safe_load.py); autocast would have
    run, the log-prob pass going through engine.forward."""
    from pipeline.training.launch import preflight

    cfg = tiny_config({"model": "m", "data": "d.jsonl"}, "run", train={"deepspeed": ds})
    with pytest.raises(ConfigError, match=message):
        preflight(cfg.train, cfg.model.dtype)
    with pytest.raises(ConfigError, match=message.replace("train.deepspeed", "sft.deepspeed")):
        preflight(cfg.train, cfg.model.dtype, "sft")
    preflight(tiny_config({"model": "m", "data": "d.jsonl"}, "run", train={"deepspeed": {
        "checkpoint": {"load_universal": False, "tag_validation": "fail"}}}).train, "float32")  # these stay allowed


def test_the_json_file_is_read_when_the_config_is_loaded(assets, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(OFFLOAD))
    b.write_text(json.dumps(OFFLOAD, indent=4))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{path: {assets['model']}}}\ndata: {{train_files: [{assets['data']}]}}\n"
                      f"run_dir: {tmp_path / 'run'}\n")
    with_a = load_config(config, [f"train.deepspeed={a}"])
    assert with_a.train.deepspeed == OFFLOAD
    fp = runner.plan_stages(with_a)["train"].fingerprint
    # the content is fingerprinted, not the file's name; without a JSON, the fingerprint is as before
    assert runner.plan_stages(load_config(config, [f"train.deepspeed={b}"]))["train"].fingerprint == fp
    plain = runner.plan_stages(load_config(config))
    assert plain["train"].fingerprint != fp and plain["score"].fingerprint == runner.plan_stages(with_a)["score"].fingerprint
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"train.deepspeed: .*bad.json: not valid JSON"):
        load_config(config, [f"train.deepspeed={tmp_path / 'bad.json'}"])
    with pytest.raises(ConfigError, match=r"train.deepspeed: .*absent.json: no such file"):
        load_config(config, [f"train.deepspeed={tmp_path / 'absent.json'}"])


def test_nvme_offload_is_refused_where_libaio_is_missing(assets, tmp_path):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        pytest.skip("libaio is installed here: NVMe offload can be built")
    ds = {"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}}
    cfg = tiny_config(assets, tmp_path / "run", train={"deepspeed": ds})
    with pytest.raises(ConfigError, match=r"offload_optimizer.device nvme needs DeepSpeed's async_io op, which cannot "
                                          r"be built on .*: libaio .* is not installed"):
        runner.run_pipeline(cfg, use_ray=False)
    assert not (tmp_path / "run").exists()  # refused before any stage


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_zero3_cpu_offload_on_two_ranks_trains_as_without(assets, tmp_path, ray_cluster):
    """Optimizer state and parameters in host memory, the step on DeepSpeedCPUAdam (a C++
    op JIT-built by DeepSpeed's op builder): the same losses as torch's AdamW on the
    partitions, to 1e-5, and the same scored rows (offload is a train setting only)."""
    steps = {"max_steps": 6, "eval_steps": 3, "save_steps": 3, "weight_decay": 0.1}  # decay on one group only
    plain = tiny_config(assets, tmp_path / "run", train=steps)
    offload = tiny_config(assets, tmp_path / "run", train=dict(steps, deepspeed=OFFLOAD))
    runner.run_pipeline(plain, log=lambda _: None)
    results = runner.run_pipeline(offload, log=lambda _: None)
    assert not results["score"]["ran"] and results["train"]["ran"]
    want = {r["step"]: r for r in train_metrics(plain) if "loss" in r}
    got = {r["step"]: r for r in train_metrics(offload) if "loss" in r}
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-4), step
    assert abs(got[1]["loss"] - 0.693147) < 1e-6
