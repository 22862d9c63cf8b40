"""Behaviour pinned across refactors: for fixed configs, the stage fingerprints, the
tokenize and score shards and the train losses must not change unless a stage's version
is bumped on purpose (then tests/data/behaviour_pin.json is regenerated in the same commit,
with the reason in the commit message).

Regenerate: ``python tests/test_behaviour_pin.py --write`` (runs the pipeline in a
subprocess, as the test does)."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

HERE = Path(__file__).parent
PIN = HERE / "data" / "behaviour_pin.json"

# Each case: train overrides on the tiny config. The fingerprints of all three are pinned;
# the first one also runs end to end (tokenize, score, 6 train steps, one rank, no Ray).
CASES = {
    "sigmoid": {},
    "ipo_rpo": {"loss_type": "ipo", "rpo_alpha": 0.5, "beta": 0.2},
    "simpo": {"loss_type": "simpo", "cpo_alpha": 0.0},
}
RUN_CASE = "sigmoid"


def case_config(assets: dict, run_dir: Path, train: dict):
    sys.path.insert(0, str(HERE))
    from helpers import tiny_config

    return tiny_config(assets, run_dir, tokenize={"max_tokens_per_row": 256},
                       train={"max_steps": 6, "eval_steps": 3, "num_workers": 1, **train})


# Pair ids and the tokenize fingerprint include the data file's path as given (its source
# label), so the pinned run builds its assets at one fixed path.
FIXED_ROOT = Path("/tmp/dpo-pipeline-behaviour-pin")


def measure() -> dict:
    import shutil

    from pipeline import runner
    from pipeline.core.config import dump_yaml
    from pipeline.demo import make_assets

    shutil.rmtree(FIXED_ROOT, ignore_errors=True)
    assets, tmp = make_assets(FIXED_ROOT / "assets"), FIXED_ROOT

    out = {"fingerprints": {}}
    for name, train in CASES.items():
        cfg = case_config(assets, tmp / name, train)
        out["fingerprints"][name] = {s: p.fingerprint for s, p in runner.plan_stages(cfg).items()}
    cfg = case_config(assets, tmp / RUN_CASE, CASES[RUN_CASE])
    path = tmp / "pin.yaml"
    path.write_text(dump_yaml(cfg))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--no-ray"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = runner.plan_stages(cfg)
    for stage in ("tokenize", "score"):
        manifest = json.loads((Path(plans[stage].dir) / "_MANIFEST.json").read_text())
        out[f"{stage}_shards"] = {s["name"]: s["sha256"] for s in manifest["shards"]}
    score_dir = Path(plans["score"].dir)
    out["ref_logps_sum"] = {f.name: float(sum(sum(x) for x in pq.read_table(f, columns=["ref_logps"])
                                                .column(0).to_pylist()))
                            for f in sorted(score_dir.glob("*.parquet"))}
    records = [json.loads(x) for x in (Path(plans["train"].dir) / "metrics.jsonl").read_text().splitlines()]
    out["losses"] = {str(r["step"]): r["loss"] for r in records if "loss" in r}
    out["eval_losses"] = {str(r["step"]): r["eval_loss"] for r in records if "eval_loss" in r}
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fingerprints_shards_and_losses_are_pinned():
    want = json.loads(PIN.read_text())
    got = measure()
    assert got["fingerprints"] == want["fingerprints"]
    assert got["tokenize_shards"] == want["tokenize_shards"]  # integer token data: byte-identical
    # Scored shards hold float32 log-probs: byte-identical on the machine the pin was made on
    # (checked there), and equal to float32 rounding on any CPU.
    assert sorted(got["score_shards"]) == sorted(want["score_shards"])
    for name, value in want["ref_logps_sum"].items():
        assert got["ref_logps_sum"][name] == pytest.approx(value, rel=1e-6), name
    assert got["losses"].keys() == want["losses"].keys()
    for step, value in want["losses"].items():
        assert got["losses"][step] == pytest.approx(value, abs=1e-6), step
    for step, value in want["eval_losses"].items():
        assert got["eval_losses"][step] == pytest.approx(value, abs=1e-6), step


if __name__ == "__main__":  # python tests/test_behaviour_pin.py [--write]
    sys.path.insert(0, str(HERE.parent))
    result = measure()
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    if "--write" in sys.argv:
        PIN.write_text(text)
    print(text)
