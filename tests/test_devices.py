"""A GPU job with no GPU stops at once with the reason: in the process that computes (no
CUDA device), and on the driver before anything is placed (a Ray cluster with no GPU
resource, where Ray would otherwise wait forever)."""

import time
from pathlib import Path

import pytest
import torch

from helpers import tiny_config
from pipeline import runner
from pipeline.core.config import for_workers
from pipeline.core.devices import NoGPUError, check_cluster_gpus
from pipeline.core.rundir import stage_state
from pipeline.registry import stage
from stages.score import ShardScorer

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def stages(names: list[str]) -> list:
    return [stage(name) for name in names]


def test_the_driver_check_counts_gpus_per_stage(assets, tmp_path):
    cfg = tiny_config(assets, tmp_path, score={"num_gpus_per_actor": 1},
                      train={"use_gpu": True, "num_workers": 4})
    with pytest.raises(NoGPUError, match=r"score.num_gpus_per_actor needs 1 GPU\(s\), but the Ray cluster has 0: "
                                         r"Ray would wait for them forever"):
        check_cluster_gpus(cfg, stages(["tokenize", "score", "train"]), {"CPU": 16.0}, None)
    with pytest.raises(NoGPUError, match=r"train.use_gpu needs 4 GPU\(s\), but the Ray cluster has 2 "
                                         r"\(and its autoscaler can add at most 2"):
        check_cluster_gpus(cfg, stages(["train"]), {"CPU": 16.0, "GPU": 2.0}, {"CPU": 16, "GPU": 2})
    check_cluster_gpus(cfg, stages(["tokenize"]), {"CPU": 16.0}, None)  # tokenize needs none
    # an autoscaler that can bring GPU nodes up: the request is not refused
    check_cluster_gpus(cfg, stages(["score", "train"]), {"CPU": 16.0}, {"CPU": 192, "GPU": 32})
    cpu = tiny_config(assets, tmp_path)
    check_cluster_gpus(cpu, stages(["tokenize", "score", "train"]), {"CPU": 2.0}, None)
    # each stage declares its GPUs (Stage.gpus); a stage the config does not plan asks for none
    sft = {"use_gpu": True, "num_workers": 2}
    with pytest.raises(NoGPUError, match=r"sft.use_gpu needs 2 GPU\(s\), but the Ray cluster has 1"):
        check_cluster_gpus(tiny_config(assets, tmp_path, sft=dict(sft, enabled=True)), stages(["sft"]), {"GPU": 1.0}, None)
    check_cluster_gpus(tiny_config(assets, tmp_path, sft=sft), stages(["sft"]), {"CPU": 2.0}, None)  # sft off
    free = tiny_config(assets, tmp_path, score={"num_gpus_per_actor": 1}, train={"loss_type": "simpo"})
    check_cluster_gpus(free, stages(["score"]), {"CPU": 2.0}, None)  # reference-free: no score stage


@no_cuda
def test_a_score_actor_that_asks_for_a_gpu_and_sees_none_refuses_before_loading(assets, tmp_path):
    cfg = tiny_config(assets, tmp_path, score={"num_gpus_per_actor": 1})
    with pytest.raises(NoGPUError, match="score.num_gpus_per_actor asks for a GPU, but this process sees "
                                         "no CUDA device"):
        ShardScorer(for_workers(cfg))


@no_cuda
def test_a_no_ray_train_with_use_gpu_and_no_cuda_refuses_instead_of_training_on_the_cpu(assets, tmp_path):
    cfg = tiny_config(assets, tmp_path / "run", tokenize={"max_tokens_per_row": 256},
                      train={"use_gpu": True, "num_workers": 1, "max_steps": 2})
    runner.run_pipeline(cfg, stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
    with pytest.raises(NoGPUError, match="train.use_gpu asks for a GPU"):
        runner.run_pipeline(cfg, stages=["train"], use_ray=False, log=lambda _: None)
    train_dir = Path(runner.plan_stages(cfg)["train"].dir)
    assert not (train_dir / "metrics.jsonl").exists()  # no step ran


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_ray_cluster_without_gpus_refuses_a_gpu_score_before_placing_anything(assets, tmp_path, ray_cluster):
    cfg = tiny_config(assets, tmp_path / "run", score={"num_gpus_per_actor": 1},
                      cluster={"address": ray_cluster})
    start = time.time()
    with pytest.raises(NoGPUError, match=r"score.num_gpus_per_actor needs 1 GPU\(s\), but the Ray cluster has 0"):
        runner.run_pipeline(cfg, log=lambda _: None)
    assert time.time() - start < 60
    # refused on connecting, before the first stage: tokenize did not run either
    assert stage_state(runner.plan_stages(cfg)["tokenize"].dir) != "done"


def test_a_rank_trains_on_cuda_local_rank(monkeypatch):
    """cuda:LOCAL_RANK, where DeepSpeed and zero.Init place tensors: on Ray the rank group
    made LOCAL_RANK the index of the rank's GPU among the node's visible ones
    (tests/test_rank_group.py); in one process it is torchrun's, or 0."""
    from pipeline.training.engine import rank_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device(use_gpu=True) == torch.device("cuda:1")
    assert rank_device(use_gpu=False) == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert rank_device(use_gpu=True) == torch.device("cuda:0")



@pytest.mark.slow
def test_deepspeed_is_imported_without_mlflow_which_stays_importable():
    """DeepSpeed's autotuner imports mlflow where it is installed (0.9 s of every rank's
    start-up); the ranks import DeepSpeed without it, and mlflow still imports after."""
    import subprocess
    import sys

    code = ("import sys; from pipeline.training.engine import import_deepspeed; import_deepspeed(); "
            "print('mlflow' in sys.modules); import mlflow; print(mlflow.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-2:] == ["False", "mlflow"], out  # after DeepSpeed's accelerator line


@pytest.mark.slow
def test_the_engine_is_built_without_deepspeeds_muon_which_stays_importable():
    """DeepSpeed's engine imports its Muon optimizer while it is built (about 1 s of every
    rank's start-up) only to ask whether the optimizer is one; the pipeline's never is. In
    a ZeRO-3 build the question gets the same answers from a class of the pipeline's own,
    which leaves nothing behind, and the real optimizer imports after (every training test
    builds through it)."""
    import subprocess
    import sys

    code = """
import sys, torch
from pipeline.training.engine import MUON, _without_muon, init_distributed
from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS, is_zero_supported_optimizer
init_distributed("gloo")
adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
with _without_muon():
    stand_in = sys.modules[MUON].MuonWithAuxAdam
    print(is_zero_supported_optimizer(adamw), isinstance(adamw, stand_in))
print(MUON in sys.modules or stand_in in ZERO_SUPPORTED_OPTIMIZERS)
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
print(MuonWithAuxAdam is not stand_in and issubclass(MuonWithAuxAdam, torch.optim.Optimizer))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-3:] == ["True False", "False", "True"], out
