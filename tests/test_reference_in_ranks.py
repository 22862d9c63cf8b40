"""TR-DPO's reference held by the ranks (pipeline/training/reference.py; issue #33's design
in docs/design.md): 2 ranks under torchrun, ZeRO-3 with buckets far smaller than the
weights, next to the policy's engine (tests/reference_probe.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_config, write_config
from pipeline import runner
from pipeline.training.engine import free_port

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def probe(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(assets, tmp / "run", tokenize={"max_tokens_per_row": 256},
                      train={"max_steps": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0, "num_workers": 2,
                             "eval_steps": 100, "report_to": []})
    runner.run_pipeline(cfg, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    out = tmp / "reference.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(HERE / "reference_probe.py"),
                           str(write_config(cfg, tmp / "reference.yaml")), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_ranks_reference_scores_as_the_score_stage_does(probe):
    """The same model, partitioned over 2 ranks and run through its engine, gives the score
    stage's stored columns (a plain model in one actor), fp32."""
    assert probe["score_max_abs_diff"]["per_token"] <= 1e-6  # measured: 0.0, bit for bit
    assert probe["score_max_abs_diff"]["per_segment"] <= 1e-5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_each_rank_mixes_its_own_partition_into_the_reference(probe):
    """After 2 optimizer steps, α = 0.6 then α = 1: the reference scores the rows as a
    plain model holding 0.6·θ + 0.4·π_ref, then θ (whole tensors), each rank having mixed
    only its partition (half the model's elements). Under ZeRO-3's default persistence
    threshold the forward once kept the weights of before a mix (the reference kept its
    small parameters whole between forwards): it scored with old weights."""
    assert probe["policy_moved"] > 1e-3  # the steps moved the policy: the mixes are not trivially equal
    assert probe["alpha_0.6_scores_max_abs_diff"] <= 1e-5
    assert probe["alpha_1_scores_max_abs_diff"] <= 1e-5
    assert probe["alpha_1_max_abs_diff"] <= 1e-7
    total = probe["partition"]["model_elements"]
    for mixed, held in probe["partition"]["per_rank"]:
        assert mixed == held and total / 2 <= held <= total / 2 + 1000  # half, and a little padding


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_with_lora_the_reference_is_mixed_with_the_merged_weights(probe):
    """A LoRA policy after 2 steps (its B matrices moved off 0): the reference, mixed with
    α = 0.6 rank by rank, holds 0.6 · (peft's merge_and_unload of the policy) + 0.4 · π_ref,
    under the plain model's parameter names."""
    lora = probe["lora"]
    assert lora["names_equal"] and lora["adapters_moved"] > 1e-4
    assert lora["max_abs_diff"] <= 1e-6
