"""The run directory as a URI: every stage reads and writes it through pyarrow filesystems.

``file://`` takes the object-store branch of ``pipeline.storage`` (no rename: direct
writes, the manifest as commit marker; the train stage writes to local scratch and each
rank uploads its own checkpoint files), so this is the code path ``s3://`` and ``gs://`` use.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import tiny_config
from pipeline import runner
from pipeline.storage import Loc
from stages.train import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TRAIN = {"max_steps": 10, "save_steps": 5, "eval_steps": 5}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def step_losses(train_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(train_dir) if "loss" in r}


@pytest.fixture(scope="module")
def both_runs(assets, tmp_path_factory, ray_cluster):
    base = tmp_path_factory.mktemp("uri")
    plain = runner.run_pipeline(tiny_config(assets, base / "plain", train=TRAIN))
    uri_dir = base / "uri"
    uri_cfg = tiny_config(assets, f"file://{uri_dir}", train=TRAIN)
    uri = runner.run_pipeline(uri_cfg)
    return base, plain, uri, uri_cfg


def test_a_file_uri_run_dir_works_like_a_plain_path(both_runs):
    base, plain, uri, _ = both_runs
    for stage in ("tokenize", "score", "train"):
        assert uri[stage]["ran"]
        assert uri[stage]["dir"].startswith(f"file://{base}/uri/{stage}/")
        # same inputs, same fingerprint: where the run directory lives is not an input
        assert Path(uri[stage]["dir"]).name == Path(plain[stage]["dir"]).name
        assert uri[stage]["rows"] == plain[stage]["rows"] and uri[stage]["tokens"] == plain[stage]["tokens"]
    # the shards are the same bytes
    for stage in ("tokenize", "score"):
        a, b = Path(plain[stage]["dir"]), Path(uri[stage]["dir"][len("file://"):])
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
    train_dir = Path(uri["train"]["dir"][len("file://"):])
    files = tree(train_dir)
    assert {"_MANIFEST.json", "metrics.jsonl", "model/model.safetensors", "model/config.json",
            "model/dpo_pipeline.json", "checkpoints/latest_complete",
            "checkpoints/step-00000005/COMPLETE.json"} <= files
    # each rank uploaded its own ZeRO-3 partition
    assert {f"checkpoints/step-00000005/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    report = base / "uri" / "report"
    assert {p.name for p in report.iterdir()} == {"report.md", "loss.png", "accuracy.png", "margins.png",
                                                  "reference_logps.png"}
    # the export is a plain HF checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(train_dir / "model")
    ref = AutoModelForCausalLM.from_pretrained(Path(plain["train"]["dir"]) / "model")
    for (name, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_the_complete_checkpoint_is_registered_with_ray_train(both_runs):
    """Ray Train's run directory is the checkpoints folder; its own record of the run
    names our complete checkpoint, which lies where the rank files were written."""
    _, _, uri, _ = both_runs
    checkpoints = Path(uri["train"]["dir"][len("file://"):]) / "checkpoints"
    snapshots = [p for p in checkpoints.rglob("*.json") if "step-" not in str(p)]
    text = "".join(p.read_text() for p in snapshots)
    assert "step-00000005" in text, sorted(str(p) for p in checkpoints.rglob("*"))


def test_uri_rerun_skips_and_resumes_from_the_uploaded_checkpoint(both_runs):
    _, _, uri, cfg = both_runs
    again = runner.run_pipeline(cfg)
    assert [r["ran"] for r in again.values()] == [False, False, False]
    # lose the train output's commit and the steps after the checkpoint: train resumes
    train = Loc(uri["train"]["dir"])
    (train / "_MANIFEST.json").unlink()
    (train / "model").rmtree()
    want = step_losses(train)
    marker = Path((train / "checkpoints" / "step-00000005" / "COMPLETE.json").path)
    written = marker.stat().st_mtime_ns
    resumed = runner.run_pipeline(cfg, stages=["train"])
    assert resumed["train"]["ran"]
    records = read_metrics(train)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))
    got = step_losses(train)
    for step in range(1, 11):
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert marker.stat().st_mtime_ns == written  # resumed from it: steps 1-5 were not run again
    assert json.loads((train / "model" / "dpo_pipeline.json").read_text())["fingerprints"]["train"] == train.name
