"""Settings chosen from the plan (pipeline/planning/auto.py): ``zero_stage: auto`` resolved from
the config alone, into the fingerprint, and the refusal before launch of a run whose plan
exceeds device.memory_gib."""

import json
from pathlib import Path

import pytest

from helpers import tiny_config
from pipeline import planning, runner
from pipeline.core.config import ConfigError
from test_plan import LLAMA_8B, write_config


def fingerprints(cfg) -> dict[str, str]:
    return {r["stage"]: r["fingerprint"] for r in runner.status(cfg)}


def test_auto_is_the_lowest_stage_that_fits_and_enters_the_fingerprint(assets, tmp_path):
    # the demo's 140k-parameter model: every stage fits 4 GiB a rank, the lowest is 0
    auto = tiny_config(assets, tmp_path / "run", train={"zero_stage": "auto"}, device={"memory_gib": 4})
    assert planning.resolve(auto).train.zero_stage == 0
    zero = tiny_config(assets, tmp_path / "run", train={"zero_stage": 0}, device={"memory_gib": 4})
    three = tiny_config(assets, tmp_path / "run", train={"zero_stage": 3}, device={"memory_gib": 4})
    assert fingerprints(auto)["train"] == fingerprints(zero)["train"] != fingerprints(three)["train"]
    # the memory unknown: auto is 3, the default
    unknown = tiny_config(assets, tmp_path / "run", train={"zero_stage": "auto"})
    assert planning.resolve(unknown).train.zero_stage == 3
    assert fingerprints(unknown)["train"] == fingerprints(three)["train"]
    # sft follows train's resolved stage when it inherits it, as its workers rebuild it; with an
    # auto of its own it is resolved on its own plan
    from pipeline.core.config import config_from_dict, for_workers

    sft = tiny_config(assets, tmp_path / "run", train={"zero_stage": "auto"}, sft={"enabled": True},
                      device={"memory_gib": 4})
    resolved = planning.resolve(sft)
    assert (resolved.train.zero_stage, resolved.sft.zero_stage) == (0, 0)
    assert config_from_dict(for_workers(resolved), handed_on=True).sft.zero_stage == 0
    own = tiny_config(assets, tmp_path / "run", train={"zero_stage": 2}, sft={"enabled": True, "zero_stage": "auto"},
                      device={"memory_gib": 4})
    assert (planning.resolve(own).train.zero_stage, planning.resolve(own).sft.zero_stage) == (2, 0)


@pytest.mark.parametrize("memory, expected", [(40, 3), (45, 2), (60, 1), (200, 0), (20, 3)])
def test_auto_on_an_8b_model_on_one_node(assets, tmp_path, memory, expected):
    """Llama-3.1-8B in bf16 on 8 GPU ranks, 16k-token rows with checkpointing (the plan:
    ZeRO-3 28.2 GiB a rank, ZeRO-2 40.1, ZeRO-1 48.6, ZeRO-0 179.5): auto takes the lowest that
    fits; where none does (20 GiB) it is 3, and the check before launch refuses it."""
    model = write_config(tmp_path / "llama", LLAMA_8B)
    cfg = tiny_config(assets, tmp_path / "run", model={"path": str(model), "dtype": "bfloat16",
                                                       "logp_chunk_tokens": 2048},
                      tokenize={"max_tokens_per_row": 16384},
                      train={"zero_stage": "auto", "num_workers": 8, "use_gpu": True, "gradient_checkpointing": True},
                      device={"memory_gib": memory})
    assert planning.resolve(cfg).train.zero_stage == expected


def test_a_stage_named_in_the_deepspeed_json_is_autos(assets, tmp_path):
    """A JSON naming its stage decides auto, with the memory known or not; under TR-DPO a
    stage other than 3 is refused on the driver, naming both settings."""
    for memory in (None, 4):
        cfg = tiny_config(assets, tmp_path / "run", device={"memory_gib": memory}, train={
            "zero_stage": "auto", "deepspeed": {"zero_optimization": {"stage": 2}}})
        assert planning.resolve(cfg).train.zero_stage == 2
    cfg = tiny_config(assets, tmp_path / "run", train={
        "zero_stage": "auto", "sync_ref_model": True, "ref_model_sync_steps": 2,
        "deepspeed": {"zero_optimization": {"stage": 2}}})
    with pytest.raises(ConfigError, match=r"^train\.deepspeed: zero_optimization\.stage is 2, and "
                                          r"train\.sync_ref_model needs ZeRO-3"):
        planning.resolve(cfg)


def test_tr_dpo_and_offload_param_keep_auto_at_3(assets, tmp_path):
    cfg = tiny_config(assets, tmp_path / "run", device={"memory_gib": 4},
                      train={"zero_stage": "auto", "sync_ref_model": True, "ref_model_sync_steps": 2})
    assert planning.resolve(cfg).train.zero_stage == 3
    cfg = tiny_config(assets, tmp_path / "run", device={"memory_gib": 4}, train={
        "zero_stage": "auto", "deepspeed": {"zero_optimization": {"offload_param": {"device": "cpu"}}}})
    assert planning.resolve(cfg).train.zero_stage == 3


def test_a_run_over_the_devices_memory_is_refused_before_launch(assets, tmp_path, capsys):
    """The demo on CPU ranks of 0.5 GiB: a rank's overhead alone (540 MiB) is over. Refused
    before any stage runs, with the plan and what to change; --skip-memory-check runs it."""
    from helpers import write_config as write_yaml

    from pipeline.cli import main

    cfg = tiny_config(assets, tmp_path / "run", device={"memory_gib": 0.5})
    with pytest.raises(ConfigError) as e:
        runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)
    message = str(e.value)
    assert message.startswith("score: the plan's peak an actor is 0.53 GiB, over device.memory_gib 0.5; change "
                              "the device (nothing in this config fits it: more memory a device, or more ranks)\n"
                              "train: the plan's peak a rank is 0.54 GiB, over device.memory_gib 0.5; change the device")
    assert "(or run with --skip-memory-check; docs/plan.md)" in message and "| **peak (backward)** |" in message
    assert [p.name for p in Path(cfg.run_dir).iterdir()] == [".hash_cache.json"]  # no stage ran (the fingerprints' cache)
    path = write_yaml(cfg, tmp_path / "run.yaml")
    assert main(["run", str(path), "--no-ray", "--stages", "tokenize,score"]) == 2
    assert "error: score: the plan's peak an actor is 0.53 GiB" in capsys.readouterr().err
    # a stage that fits or that does not run is not asked about: tokenize has no model
    runner.run_pipeline(cfg, stages=["tokenize"], use_ray=False, log=lambda _: None)
    assert main(["run", str(path), "--no-ray", "--stages", "tokenize,score", "--skip-memory-check"]) == 0
    done = {r["stage"]: r["state"] for r in runner.status(cfg)}
    assert (done["tokenize"], done["score"]) == ("done", "done")


@pytest.mark.slow
def test_status_and_run_agree_on_the_resolved_stage(assets, tmp_path):
    """The demo run in this process with zero_stage auto and 4 GiB: train runs in the
    directory status names, at ZeRO-0, as its recorded inputs say."""
    cfg = tiny_config(assets, tmp_path / "run", train={"zero_stage": "auto", "num_workers": 1, "report_to": []},
                      device={"memory_gib": 4})
    before = fingerprints(cfg)["train"]
    results = runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)
    out = Path(results["train"]["dir"])
    assert out.name == before == fingerprints(cfg)["train"]
    inputs = json.loads((out / "_INPUTS.json").read_text())
    assert '"zero_stage": 0' in json.dumps(inputs)
    import yaml

    assert yaml.safe_load((Path(cfg.run_dir) / "config.yaml").read_text())["train"]["zero_stage"] == "auto"  # as given


def test_a_score_actor_sharing_a_gpu_is_held_to_its_share(assets, tmp_path):
    """Two actors on a GPU (num_gpus_per_actor 0.5) have half its memory each: the plan's
    verdict and the refusal both say so."""
    from pipeline.core.storage import Loc

    cfg = tiny_config(assets, tmp_path / "run", score={"num_gpus_per_actor": 0.5}, device={"memory_gib": 0.3},
                      tokenize={"max_tokens_per_row": 65536})
    plan = planning.make_plan(cfg)
    score = next(s for s in plan.stages if s.stage == "score")
    peak = score.memory.peak()[0]
    assert 0.15 * 2**30 < peak < 0.3 * 2**30  # fits the GPU, not half of it
    text = planning.plan_text(plan, "cfg")
    assert f"| **peak (forward)** | **{peak / 2**30:.2f}** | of device.memory_gib 0.3 (its share: 0.15 GiB): over by" in text
    why = planning.over_memory(cfg, {"score": Loc(tmp_path / "run" / "score")})
    assert why.startswith(f"score: the plan's peak an actor is {peak / 2**30:.2f} GiB, over device.memory_gib 0.3 "
                          f"(its share: 0.15 GiB); change")
