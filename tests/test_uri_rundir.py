"""The run directory as a URI: every stage reads and writes it through pyarrow filesystems.

Both kinds of URI take the object-store branch of ``pipeline.core.storage`` (no rename: direct
writes, the manifest as commit marker; the train stage writes to local scratch and each
rank uploads its own checkpoint files): ``file://``, and ``s3://`` on a real S3-compatible
server started by the tests (``conftest.s3_bucket``: moto's standalone server, reached
through ``AWS_ENDPOINT_URL_S3`` as users reach MinIO or Ceph), with the data there too.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import tiny_config
from pipeline import runner
from pipeline.core.storage import Loc
from pipeline.training.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TRAIN = {"max_steps": 10, "save_steps": 5, "eval_steps": 5}


def tree(root: Loc) -> set[str]:
    return {f.relative_to(root) for f in root.files()}


def step_losses(train_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(train_dir) if "loss" in r}


@pytest.fixture(scope="module", params=["file", "s3"])
def both_runs(request, assets, tmp_path_factory, ray_cluster, s3_bucket):
    base = tmp_path_factory.mktemp("uri")
    model = {}
    if request.param == "s3":  # the data and the model on the server too, read by every worker from there
        root = f"{s3_bucket}/{base.name}"
        data = Loc(f"{root}/data/pairs.jsonl")
        data.upload(assets["data"])
        for f in assets["model"].iterdir():
            Loc(f"{root}/base-model/{f.name}").upload(f)
        model = {"path": f"{root}/base-model", "cache_dir": str(base / "model-cache")}
    else:
        root, data = f"file://{base}/uri", assets["data"]
    plain = runner.run_pipeline(tiny_config(assets, base / "plain", data_file=str(data), train=TRAIN))
    uri_cfg = tiny_config(assets, root, data_file=str(data), train=TRAIN, model=model)
    uri = runner.run_pipeline(uri_cfg)
    return Loc(root), plain, uri, uri_cfg


def test_a_uri_run_dir_works_like_a_plain_path(both_runs):
    root, plain, uri, cfg = both_runs
    for stage in ("tokenize", "score", "train"):
        assert uri[stage]["ran"]
        assert uri[stage]["dir"].startswith(f"{root}/{stage}/")
        # same inputs, same fingerprint: where the run directory lives is not an input
        assert Path(uri[stage]["dir"]).name == Path(plain[stage]["dir"]).name
        assert uri[stage]["rows"] == plain[stage]["rows"] and uri[stage]["tokens"] == plain[stage]["tokens"]
    if cfg.model.path.startswith("s3://"):  # the model came from the bucket: recorded, pinned by content
        for stage, keys in (("tokenize", ["model.tokenizer_path"]), ("score", ["model.reference_path"]),
                            ("train", ["model.path", "model.tokenizer_path"])):
            recorded = json.loads((Loc(uri[stage]["dir"]) / "_MANIFEST.json").read_text())["models"]
            assert sorted(recorded) == keys
            assert {r["kind"] for r in recorded.values()} == {"uri"}
            assert all(r["pinned"] == f"{root}/base-model#sha256={r['digest']}" for r in recorded.values())
    # the shards are the same bytes
    for stage in ("tokenize", "score"):
        a, b = Path(plain[stage]["dir"]), Loc(uri[stage]["dir"])
        shards = sorted(p.name for p in a.glob("*.parquet"))
        assert shards == sorted(p.name for p in b.glob("*.parquet")) and len(shards) > 2
        for name in shards:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # training: the same losses step for step, with checkpoints and the export uploaded
    want, got = step_losses(plain["train"]["dir"]), step_losses(uri["train"]["dir"])
    assert sorted(got) == list(range(1, 11))
    assert abs(got[1] - math.log(2)) < 1e-6
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    train_dir = Loc(uri["train"]["dir"])
    files = tree(train_dir)
    assert {"_MANIFEST.json", "metrics.jsonl", "model/model.safetensors", "model/config.json",
            "model/dpo_pipeline.json", "checkpoints/latest_complete",
            "checkpoints/step-00000005/COMPLETE.json"} <= files
    # each rank uploaded its own ZeRO-3 partition
    assert {f"checkpoints/step-00000005/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    assert {p.name for p in (root / "report").iterdir()} == {"report.md", "loss.png", "accuracy.png", "margins.png",
                                                             "reference_logps.png", "_MADE_FROM.json"}
    # the export is a plain HF checkpoint
    from transformers import AutoModelForCausalLM

    local = Path(plain["train"]["dir"]).parent / "downloaded-export"
    (train_dir / "model").download(local)
    model = AutoModelForCausalLM.from_pretrained(local)
    ref = AutoModelForCausalLM.from_pretrained(Path(plain["train"]["dir"]) / "model")
    for (name, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_uri_rerun_skips_and_resumes_from_the_uploaded_checkpoint(both_runs):
    _, _, uri, cfg = both_runs
    again = runner.run_pipeline(cfg)
    assert [r["ran"] for r in again.values()] == [False, False, False]
    # lose the train output's commit and the steps after the checkpoint: train resumes
    train = Loc(uri["train"]["dir"])
    (train / "_MANIFEST.json").unlink()
    (train / "model").rmtree()
    want = step_losses(train)
    marker = train / "checkpoints" / "step-00000005" / "COMPLETE.json"
    written = marker.info().mtime_ns
    resumed = runner.run_pipeline(cfg, stages=["train"])
    assert resumed["train"]["ran"]
    records = read_metrics(train)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))
    got = step_losses(train)
    for step in range(1, 11):
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert marker.info().mtime_ns == written  # resumed from it: steps 1-5 were not run again
    assert json.loads((train / "model" / "dpo_pipeline.json").read_text())["fingerprints"]["train"] == train.name
