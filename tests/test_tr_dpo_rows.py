"""TR-DPO's first segment: the train rows the score stage scores (pipeline/training/plan.py
``first_segment_rows``; stages/score.py ``rows_to_score``). Every later row is rescored in
the ranks before its step, so only the rows of steps 1..τ (and the eval rows) are read
with the score stage's column. Fast: plans and manifests, no model."""

import numpy as np

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
