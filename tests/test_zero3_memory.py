"""ZeRO-3 memory: one copy of an fp32 model's weights (cluster/zero3_master_weights.py), and
buffers sized from the model (cluster/deepspeed_config.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.deepspeed_config import SUB_GROUP_SIZE, build_ds_config
from helpers import tiny_config

HERE = Path(__file__).parent


def probe(assets, tmp_path, mode):
    out = tmp_path / f"{mode}.json"
    proc = subprocess.run([sys.executable, str(HERE / "zero3_master_probe.py"), str(assets["model"]), mode, str(out)],
                          capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_fp32_model_has_one_copy_of_its_weights_and_the_same_steps(assets, tmp_path):
    fixed, unfixed = probe(assets, tmp_path, "fixed"), probe(assets, tmp_path, "unfixed")
    # Before: DeepSpeed's fp32 master weights were a second copy of the fp32 partition.
    assert unfixed["master_copy_bytes"] == unfixed["partition_bytes"] > 0
    assert fixed["master_copy_bytes"] == 0
    # The same arithmetic: losses and updated weights equal to the bit.
    assert fixed["losses"] == unfixed["losses"] and len(set(fixed["losses"])) == 3  # the weights did move
    assert fixed["weights"] == unfixed["weights"]


def test_zero3_buffers_are_sized_from_the_model(assets, tmp_path):
    cfg = tiny_config(assets, tmp_path)
    zero = build_ds_config(cfg.train, "float32", 2, hidden_size=896)["zero_optimization"]  # Qwen2.5-0.5B's width
    assert zero["reduce_bucket_size"] == 1 << 20  # 896^2 = 802,816 is under the 2^20 floor
    assert "stage3_prefetch_bucket_size" not in zero  # DeepSpeed's 5e7: prefetch whole layers ahead
    zero = build_ds_config(cfg.train, "bfloat16", 32, hidden_size=4096)["zero_optimization"]  # Llama-3.1-8B's
    assert zero["reduce_bucket_size"] == 4096 * 4096 == 16777216
    assert zero["sub_group_size"] == SUB_GROUP_SIZE == 50_000_000
    cfg.train.zero_stage = 0
    assert "sub_group_size" not in build_ds_config(cfg.train, "float32", 1, hidden_size=4096)["zero_optimization"]


def test_a_checkpoint_of_another_optimizer_layout_is_refused_with_the_reason():
    from pipeline.training.checkpoints import layout_mismatch

    train_cfg = tiny_config({"model": "m", "data": "d.jsonl"}, "run").train
    info = {"step": 10, "world_size": 2, "zero_stage": 3, "zero_sub_groups": 1}
    assert layout_mismatch(info, 2, 1, train_cfg) is None
    # another worker count: written before the accumulation was recorded, it cannot be checked
    assert "written by 2 workers and this run has 1, and it does not record its gradient accumulation" in \
        layout_mismatch(info, 1, 1, train_cfg)
    assert "cut into 1 sub-groups a rank and this run's into 10" in layout_mismatch(info, 2, 10, train_cfg)
    del info["zero_sub_groups"]  # written before it was recorded: DeepSpeed's own load decides
    assert layout_mismatch(info, 2, 10, train_cfg) is None
