"""Where a stage's tensors live, and refusing a GPU job that has no GPU.

A job that asks for GPUs (``score.num_gpus_per_actor > 0``, ``train.use_gpu: true``) and
gets none must stop at once with the reason: silently falling back to the CPU turns an
8B run into a job that never ends, and a Ray cluster with no GPU resource keeps the
request pending forever.

- ``require_gpu``: in the process that computes (a score actor, a train rank, or the
  ``--no-ray`` driver).
- ``check_cluster_gpus``: on the driver, before anything is placed, against what the Ray
  cluster has now or can add (an autoscaler's node types).
"""

from __future__ import annotations

from pipeline.core.config import PipelineConfig
from pipeline.core.stage import Stage


class NoGPUError(RuntimeError):
    pass


def require_gpu(wants_gpu: bool, setting: str) -> None:
    """In the process that computes: a job that asks for a GPU must see one."""
    import torch  # here: the driver imports this module without torch

    if wants_gpu and not torch.cuda.is_available():
        raise NoGPUError(
            f"{setting} asks for a GPU, but this process sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none: a CPU build'}); "
            f"set {setting} off to run on the CPU, or run where a GPU is visible"
        )


def gpus_needed(cfg: PipelineConfig, stages: list[Stage]) -> dict[str, float]:
    """GPUs each of ``stages`` that the config plans needs on the cluster, by the setting
    that asks for them, as each stage declares them (``Stage.gpus``: at least one actor's
    worth for score, one per rank for sft and train)."""
    return {setting: gpus for s in stages if s.needed(cfg) is None for setting, gpus in s.gpus(cfg).items()}


def check_cluster_gpus(cfg: PipelineConfig, stages: list[Stage], now: dict, at_most: dict | None) -> None:
    """Refuse on the driver what no placement can satisfy. ``now``: the cluster's resources
    (``ray.cluster_resources()``); ``at_most``: what an autoscaler may bring up (None when
    no autoscaler reports a config)."""
    have = max(now.get("GPU", 0.0), (at_most or {}).get("GPU", 0.0))
    for setting, gpus in gpus_needed(cfg, stages).items():
        if gpus > have:
            scale = "" if at_most is None else f" (and its autoscaler can add at most {at_most.get('GPU', 0)})"
            raise NoGPUError(
                f"{setting} needs {gpus:g} GPU(s), but the Ray cluster has {now.get('GPU', 0.0):g}{scale}: "
                f"Ray would wait for them forever. Add GPU nodes, or set {setting} off to run on CPUs"
            )


def check_ray_cluster_gpus(cfg: PipelineConfig, stages: list[Stage]) -> None:
    import ray

    try:  # the autoscaler's node types
        from ray._private.state import state

        at_most = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: without it, judge by what is there now
        at_most = None
    check_cluster_gpus(cfg, stages, ray.cluster_resources(), at_most)


def peak_tflops(configured: float | None, device, dtype: str) -> float | None:
    """The denominator of mfu: ``device.peak_tflops`` when given, else the vendor's figure
    for a known GPU (``flops.PEAK_TFLOPS``), else None (a CPU: no mfu)."""
    if configured:
        return configured
    if getattr(device, "type", None) == "cuda":
        import torch

        from pipeline.core.flops import known_peak_tflops

        return known_peak_tflops(torch.cuda.get_device_name(device), dtype)
    return None
