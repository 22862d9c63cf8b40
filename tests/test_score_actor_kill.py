"""A score actor killed mid-stage (SIGKILL, by pid): the pool replaces it and gives its
shard again within the same run; the output has every row exactly once, bit for bit equal to a
clean run."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import Killer, tiny_config
from pipeline import runner
from pipeline.core.rundir import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_killed_score_actor_is_retried_in_the_same_run(assets, tmp_path, ray_cluster):
    groups = dict(tokenize={"max_tokens_per_row": 256, "rows_per_shard": 4})
    clean_cfg = tiny_config(assets, tmp_path / "clean", **groups)
    runner.run_pipeline(clean_cfg, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    clean_dir = Path(runner.plan_stages(clean_cfg)["score"].dir)

    cfg = tiny_config(assets, tmp_path / "killed", **groups)
    runner.run_pipeline(cfg, stages=["tokenize"], log=lambda _: None)
    score_dir = Path(runner.plan_stages(cfg)["score"].dir)
    killer = Killer("ShardScorer", lambda: bool(list(score_dir.glob("*.parquet"))))  # after the first shard
    killer.start()
    results = runner.run_pipeline(cfg, stages=["tokenize", "score"], log=lambda _: None)
    killer.join()
    assert killer.killed, "no score actor was found to kill"
    assert results["score"]["ran"]

    manifest = read_manifest(score_dir)
    clean = read_manifest(clean_dir)
    assert [s["name"] for s in manifest["shards"]] == [s["name"] for s in clean["shards"]]
    assert len(manifest["shards"]) > 10
    for shard in manifest["shards"]:  # every shard once, the same bytes as the clean run
        assert (score_dir / shard["name"]).read_bytes() == (clean_dir / shard["name"]).read_bytes(), shard
    row_ids = [r for p in sorted(score_dir.glob("*.parquet")) for r in pq.read_table(p).column("row_id").to_pylist()]
    assert len(row_ids) == len(set(row_ids)) == manifest["stats"]["rows"]
    assert not [p.name for p in score_dir.iterdir() if ".tmp-" in p.name]  # the dead actor's half file is gone
