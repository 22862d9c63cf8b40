"""TR-DPO's first segment: the train rows the score stage scores (pipeline/training/plan.py
``first_segment_rows``; stages/score/stage.py ``rows_to_score``). Every later row is rescored in
the ranks before its step, so only the rows of steps 1..τ (and the eval rows) are read
with the score stage's column. Fast: plans and manifests, no model."""

from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_config
from pipeline.training.plan import first_segment_rows
from stages.score import rows_to_score


def train(assets, tmp_path, **keys):
    return tiny_config(assets, tmp_path, train={"sync_ref_model": True, **keys}).train


def test_the_first_segment_is_the_first_tau_steps_of_the_shuffled_epoch(assets, tmp_path):
    # 10 rows, 1 rank x 2 micro-batches a step: 5 steps an epoch; tau 2: steps 1 and 2 train on
    # the first 2 x 2 rows of epoch 0's order, the permutation drawn from (seed, epoch 0)
    t = train(assets, tmp_path, num_workers=1, gradient_accumulation_steps=2, ref_model_sync_steps=2, seed=7)
    order = np.random.default_rng([7, 0]).permutation(10)
    assert first_segment_rows(10, t) == sorted(order[:4].tolist())
    assert len(first_segment_rows(10, t)) == 4


def test_the_rows_depend_on_the_rows_a_step_not_on_the_worker_count(assets, tmp_path):
    """A resume on another worker count keeps the global batch: the same segment."""
    one = train(assets, tmp_path, num_workers=1, gradient_accumulation_steps=4, ref_model_sync_steps=3)
    two = train(assets, tmp_path, num_workers=2, gradient_accumulation_steps=2, ref_model_sync_steps=3)
    four = train(assets, tmp_path, num_workers=4, gradient_accumulation_steps=1, ref_model_sync_steps=3)
    assert first_segment_rows(50, one) == first_segment_rows(50, two) == first_segment_rows(50, four)
    assert len(first_segment_rows(50, one)) == 12


def test_a_run_shorter_than_tau_scores_the_rows_of_all_its_steps(assets, tmp_path):
    # 3 steps of 2 rows, tau 100: 6 rows. 9 steps over 2 epochs of 5 (10 rows): every row
    short = train(assets, tmp_path, num_workers=1, gradient_accumulation_steps=2, ref_model_sync_steps=100,
                  max_steps=3)
    assert len(first_segment_rows(10, short)) == 6
    long = train(assets, tmp_path, num_workers=1, gradient_accumulation_steps=2, ref_model_sync_steps=100,
                 num_train_epochs=2)
    assert first_segment_rows(10, long) == list(range(10))
    # the last step of an epoch topped up with a filler row: it repeats a row of that step
    odd = train(assets, tmp_path, num_workers=1, gradient_accumulation_steps=4, ref_model_sync_steps=3)
    assert first_segment_rows(10, odd) == list(range(10))  # 3 steps x 4 = 12 micro-batches, 10 rows


def test_each_train_shard_gets_its_rows_in_name_order_and_eval_shards_all(assets, tmp_path):
    cfg = tiny_config(assets, tmp_path, train={"sync_ref_model": True, "num_workers": 1,
                                               "gradient_accumulation_steps": 3, "ref_model_sync_steps": 2})
    manifest = {"shards": [{"name": "eval-00000.parquet", "rows": 3}, {"name": "train-00001.parquet", "rows": 6},
                           {"name": "train-00000.parquet", "rows": 4}, {"name": "quarantine.parquet", "rows": 1}]}
    wanted = first_segment_rows(10, cfg.train)  # rows 0-3 in train-00000, 4-9 in train-00001
    assert rows_to_score(cfg, manifest) == {"train-00000.parquet": [r for r in wanted if r < 4],
                                            "train-00001.parquet": [r - 4 for r in wanted if r >= 4]}
    assert len(wanted) == 6
    plain = tiny_config(assets, tmp_path)
    assert rows_to_score(plain, manifest) == {}


def test_a_tr_dpo_rerun_at_another_global_batch_is_refused_not_restarted(assets, tmp_path):
    """TR-DPO's score output depends on the rows a step, so a rerun at another global batch
    has another score fingerprint as train's upstream. It is still this run: a partial train
    output with checkpoints at 2 rows a step refuses a rerun at 3, as for a plain run, with
    the way to keep the global batch (it used to start anew beside the checkpoints)."""
    import json

    from pipeline import runner
    from pipeline.core.config import ConfigError
    from pipeline.core.rundir import MANIFEST
    from pipeline.training.checkpoints import CHECKPOINT_DIR, COMPLETE
    from pipeline.training.launch import INPUTS_FILE, check_global_batch

    def plans(workers, tau=4):
        return runner.plan_stages(tiny_config(assets, tmp_path / "run", train={
            "sync_ref_model": True, "ref_model_sync_steps": tau, "num_workers": workers}))

    two, three, other_tau = plans(2), plans(3), plans(3, tau=5)
    assert two["score"].fingerprint != three["score"].fingerprint  # the first segment's rows differ
    for p in (two, three, other_tau):  # the score outputs done, as their manifests record them
        Path(p["score"].dir.local).mkdir(parents=True, exist_ok=True)
        (p["score"].dir / MANIFEST).write_text(json.dumps({"inputs": p["score"].inputs}))
    old = Path(two["train"].dir.local)  # the run at 2 x 1, lost after step 10's checkpoint
    (old / CHECKPOINT_DIR / "step-00000010").mkdir(parents=True)
    (old / CHECKPOINT_DIR / "step-00000010" / COMPLETE).write_text(json.dumps({"step": 10}))
    (old / INPUTS_FILE).write_text(json.dumps(two["train"].inputs))

    with pytest.raises(ConfigError, match=r"global batch of 2 rows a step, and this one's is 3 .*\(1 x 2, 2 x 1\)"):
        check_global_batch(three["train"].dir, {"inputs": three["train"].inputs})
    check_global_batch(other_tau["train"].dir, {"inputs": other_tau["train"].inputs})  # another run: no refusal
