"""Resuming on another number of workers (DeepSpeed's universal checkpoint): 2 ranks for 10
steps, then 1 rank with twice the gradient accumulation, so the global batch is kept."""

import json
import shutil
from collections import Counter

import pytest

from helpers import tiny_config, train_metrics
from pipeline import runner
from pipeline.config import ConfigError
from stages.train.checkpoints import UNIVERSAL, layout_mismatch
from stages.train.rows import planned_steps


def rows_of(step_plan) -> Counter:
    return Counter(mb.row for rank_plan in step_plan for mb in rank_plan if mb.weight > 0)


def test_the_same_global_batch_gives_every_step_the_same_rows():
    rows, seed, total = 37, 5, 30  # 37 rows, 2 rows a step: 19 steps an epoch, the last one short
    straight = dict(planned_steps(rows, 2, 1, seed, total))
    first = dict((s, p) for s, p in planned_steps(rows, 2, 1, seed, total) if s <= 10)
    then = dict(planned_steps(rows, 1, 2, seed, total, done=10))
    assert sorted(first) == list(range(1, 11)) and sorted(then) == list(range(11, 31))
    resumed = {**first, **then}
    for step in range(1, total + 1):
        assert rows_of(resumed[step]) == rows_of(straight[step]), step
    epoch = Counter()
    for step in range(1, 20):
        epoch += rows_of(resumed[step])
    assert epoch == Counter(range(rows))  # each pair once in the epoch, across the change


def test_which_checkpoints_resume_on_another_worker_count():
    cfg = tiny_config({"model": "m", "data": "d.jsonl"}, "run", train={"gradient_accumulation_steps": 2,
                                                                        "num_workers": 1})
    info = {"world_size": 2, "gradient_accumulation_steps": 1, "zero_stage": 3, "zero_sub_groups": 1,
            "optimizer": "adamw"}
    assert layout_mismatch(info, 1, 1, cfg.train) == UNIVERSAL
    assert layout_mismatch(dict(info, world_size=1, gradient_accumulation_steps=2), 1, 1, cfg.train) is None
    why = layout_mismatch(dict(info, world_size=3), 1, 1, cfg.train)
    assert why.startswith("its global batch is 3 rows a step (3 workers x 1 accumulation steps) and this run's 2 "
                          "(1 x 2): the steps would train other rows. Keep the global batch (1 workers x 3, "
                          "3 workers x 1)")
    assert "restores Adam's moments only, so an RMSprop run can only resume on 2 workers" in \
        layout_mismatch(dict(info, optimizer="rmsprop"), 1, 1, cfg.train)
    assert "does not record its gradient accumulation" in \
        layout_mismatch({k: v for k, v in info.items() if k != "gradient_accumulation_steps"}, 1, 1, cfg.train)
    assert "ZeRO-3 only (this checkpoint is ZeRO-2)" in layout_mismatch(dict(info, zero_stage=2), 1, 1, cfg.train)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_resume_on_one_worker_from_two(assets, tmp_path, ray_cluster):
    import torch

    from stages.train.driver import worker_spec
    from stages.train.engine import build_engine
    from stages.train.loop import setup
    from stages.train.metrics import MetricsLog
    from stages.train.checkpoints import resume

    train = {"max_steps": 20, "save_steps": 10, "save_total_limit": None, "eval_steps": 1000,
             "weight_decay": 0.1}
    two = tiny_config(assets, tmp_path / "run", tokenize={"max_tokens_per_row": 256},
                      train=dict(train, num_workers=2, gradient_accumulation_steps=1))
    one = tiny_config(assets, tmp_path / "run", tokenize={"max_tokens_per_row": 256},
                      train=dict(train, num_workers=1, gradient_accumulation_steps=2))
    plans = runner.plan_stages(two)
    assert runner.plan_stages(one)["train"].fingerprint == plans["train"].fingerprint  # the same run
    runner.run_pipeline(two, log=lambda _: None)
    straight = {r["step"]: r for r in train_metrics(two) if "loss" in r}
    assert sorted(straight) == list(range(1, 21))

    # The run as a spot cluster leaves it after step 10's checkpoint (what came later is lost)
    out = plans["train"].dir
    (out / "_MANIFEST.json").unlink()
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "checkpoints" / "step-00000020")
    (out / "checkpoints" / "latest_complete").write_text("step-00000010")

    # A worker count that cannot keep the global batch (2 rows a step): refused, with the way out
    three = tiny_config(assets, tmp_path / "run", tokenize={"max_tokens_per_row": 256},
                        train=dict(train, num_workers=3, gradient_accumulation_steps=1))
    with pytest.raises(ConfigError, match=r"holds checkpoints of this run at a global batch of 2 rows a step, and "
                                          r"this one's is 3 .*keep the global batch \(1 x 2, 2 x 1\)"):
        runner.run_pipeline(three, stages=["train"], use_ray=False, log=lambda _: None)

    lines = []
    results = runner.run_pipeline(one, stages=["train"], use_ray=False, log=lines.append)  # one rank, in process
    assert results["train"]["ran"]
    resumed = {r["step"]: r for r in train_metrics(one) if "loss" in r}
    assert sorted(resumed) == list(range(1, 21))  # steps 1-10 kept, 11-20 trained on one rank
    for step in range(11, 21):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], abs=1e-5), step
        assert resumed[step]["rows"] == straight[step]["rows"]  # the same rows each step
    universal = out / "checkpoints" / "step-00000010" / UNIVERSAL
    assert json.loads((universal / "COMPLETE.json").read_text()) == {"from_world_size": 2}

    # The state right after the load, bit for bit the two ranks' consolidated values
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    spec = worker_spec(one, plans["score"].dir, out, {"tokenized_dir": str(plans["tokenize"].dir),
                                                      "fingerprints": {}})
    spec.cfg_dict["train"]["resume_from_checkpoint"] = "step-00000010"
    ctx = setup(spec)
    engine = build_engine(ctx.train_cfg, ctx.cfg.model, ctx.world, ctx.total_steps, ctx.objective, ctx.device)
    assert resume(engine, ctx, MetricsLog(ctx)) == 10
    checked = 0
    for name, param in engine.module.named_parameters():
        for key, got in (("fp32", safe_get_full_fp32_param(param)),
                         ("exp_avg", safe_get_full_optimizer_state(param, "exp_avg")),
                         ("exp_avg_sq", safe_get_full_optimizer_state(param, "exp_avg_sq"))):
            want = torch.load(universal / "zero" / name / f"{key}.pt", weights_only=True)
            want = want["param"] if isinstance(want, dict) else want  # fp32.pt is {"param": ...}
            assert torch.equal(got.view(-1), want.view(-1)), (name, key)
            checked += 1
    assert checked == 3 * len(list(engine.module.parameters()))
    # independently: the parameters zero_to_fp32 consolidates from the two ranks' partitions
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step-00000010")
    for name, param in engine.module.named_parameters():
        assert torch.equal(safe_get_full_fp32_param(param), consolidated[name]), name
    # each param group keeps its own settings (DeepSpeed copies group 0's onto all)
    decay, no_decay = engine.optimizer.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # each sub-group's own Adam step count (DeepSpeed shares one tensor, incremented once per sub-group)
    steps = [engine.optimizer.optimizer.state[flat]["step"] for flat in engine.optimizer.fp32_partitioned_groups_flat]
    assert len(steps) >= 2 and all(int(s) == 10 for s in steps)
    assert len({id(s) for s in steps}) == len(steps)
