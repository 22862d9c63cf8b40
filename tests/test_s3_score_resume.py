"""A score stage interrupted on S3 (a real S3-compatible server: ``conftest.s3_bucket``)
resumes shard by shard: with its manifest never written, one shard never uploaded and one
cut short, the rerun scores exactly those two again, bit for bit, and leaves the others."""

import shutil

import pytest

from helpers import tiny_config
from pipeline import runner
from pipeline.core.config import config_from_dict, to_dict
from pipeline.demo import make_pairs, write_jsonl
from pipeline.core.rundir import stage_state
from pipeline.core.storage import Loc


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_interrupted_score_on_s3_rescores_only_the_missing_and_damaged_shards(assets, tmp_path, s3_bucket):
    data = tmp_path / "pairs.jsonl"
    write_jsonl(make_pairs(300, seed=3), data)
    remote = Loc(f"{s3_bucket}/score-resume-{tmp_path.name}")
    (remote / "data" / "pairs.jsonl").upload(data)
    model = tmp_path / "model"
    shutil.copytree(assets["model"], model)
    raw = to_dict(tiny_config(assets, str(remote / "run"), data_file=str(remote / "data" / "pairs.jsonl"),
                              tokenize={"max_tokens_per_row": 256, "rows_per_shard": 4}))
    raw["model"]["path"] = str(model)
    cfg = config_from_dict(raw)
    runner.run_pipeline(cfg, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    score_dir = Loc(runner.plan_stages(cfg)["score"].dir)
    shards = score_dir.glob("train-*.parquet")
    assert len(shards) >= 3
    clean = {s.name: s.read_bytes() for s in shards}
    stamps = {s.name: s.info().mtime_ns for s in shards}
    lost, cut = shards[0], shards[1]
    (score_dir / "_MANIFEST.json").unlink()  # killed before its commit
    lost.unlink()  # never uploaded
    cut.write_bytes(clean[cut.name][: len(clean[cut.name]) // 2])  # cut short
    assert stage_state(score_dir) == "partial"
    results = runner.run_pipeline(cfg, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    assert [r["ran"] for r in results.values()] == [False, True]
    assert stage_state(score_dir) == "done"
    for s in score_dir.glob("train-*.parquet"):
        assert s.read_bytes() == clean[s.name], s.name  # bit for bit
        if s.name not in (lost.name, cut.name):
            assert s.info().mtime_ns == stamps[s.name], s.name  # untouched
