"""A checkpoint written before the log-prob pass went through ``engine(row)`` resumes.

The change gave the policy a new ``forward`` (pipeline/training/forward.py) and left everything
a checkpoint holds as it was: parameter names, the module tree, the optimizer's layout.
``tests/data/checkpoint-23de82a/`` is the step-2 checkpoint of a 4-step ZeRO-3 run made
by commit 23de82a, the last one before the change (a 20k-parameter Llama, so the fixture
is small; made by ``python tests/test_checkpoint_compat.py OUT`` at that commit). Here
that checkpoint is resumed by this version and trains steps 3 and 4 as this version's
own uninterrupted run does.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FIXTURE = HERE / "data" / "checkpoint-23de82a"
sys.path.insert(0, str(HERE))


def small_model(assets: dict, out: Path) -> Path:
    """The demo tokenizer with a 20k-parameter Llama (hidden 16, one layer), deterministic."""
    from transformers import AutoTokenizer

    from pipeline.demo import build_model

    if not (out / "model.safetensors").exists():
        tokenizer = AutoTokenizer.from_pretrained(assets["model"])
        out.mkdir(parents=True)
        tokenizer.save_pretrained(out)
        build_model(len(tokenizer), seed=0, hidden_size=16, layers=1).save_pretrained(out, safe_serialization=True)
    return out


def config(assets: dict, run_dir: Path):
    from helpers import tiny_config

    model = small_model(assets, run_dir.parent / "small-model")
    return tiny_config(assets, run_dir, model={"path": str(model)}, tokenize={"max_tokens_per_row": 256},
                       train={"num_workers": 1, "max_steps": 4, "save_steps": 2, "eval_steps": 100, "zero_stage": 3,
                              "warmup_ratio": 0.0, "report_to": []})


def losses(cfg) -> dict[int, float]:
    from helpers import train_metrics

    return {r["step"]: r["loss"] for r in train_metrics(cfg) if "loss" in r}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_checkpoint_from_before_the_front_door_resumes(assets, tmp_path, capsys):
    from helpers import train_dir
    from pipeline import runner

    cfg = config(assets, tmp_path / "run")
    runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)
    want = losses(cfg)
    out = train_dir(cfg)
    shutil.rmtree(out)  # this version's train output, replaced by the old one's first two steps
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(FIXTURE / "step-00000002", out / "checkpoints" / "step-00000002")
    (out / "checkpoints" / "latest_complete").write_text("step-00000002")
    shutil.copy(FIXTURE / "metrics.jsonl", out / "metrics.jsonl")
    capsys.readouterr()
    runner.run_pipeline(cfg, stages=["train"], use_ray=False, log=lambda _: None)
    said = capsys.readouterr().out
    assert f"[train] resumed from {out / 'checkpoints' / 'step-00000002'} at step 2" in said, said
    got = losses(cfg)
    assert sorted(got) == [1, 2, 3, 4]
    # the old run's, as logged before the change (on another machine: to the last bits of the CPU's kernels)
    assert [got[s] for s in (1, 2)] == pytest.approx([want[s] for s in (1, 2)], abs=1e-6)
    assert [got[s] for s in (3, 4)] == pytest.approx([want[s] for s in (3, 4)], abs=1e-6)
    assert got[4] < got[1]  # it trained


if __name__ == "__main__":  # make the fixture: python tests/test_checkpoint_compat.py OUT (at the commit named above)
    from helpers import train_dir
    from pipeline import runner
    from pipeline.demo import make_assets

    where = Path(sys.argv[1])
    cfg = config(make_assets(where / "assets"), where / "run")
    runner.run_pipeline(cfg, use_ray=False)
    FIXTURE.mkdir(parents=True, exist_ok=True)
    shutil.copytree(train_dir(cfg) / "checkpoints" / "step-00000002", FIXTURE / "step-00000002", dirs_exist_ok=True)
    records = [json.loads(x) for x in (train_dir(cfg) / "metrics.jsonl").read_text().splitlines()]
    (FIXTURE / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= 2))
