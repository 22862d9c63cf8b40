"""A training stage's driver side, shared by every training stage (train, sft): the checks
before a run, the settings its fingerprint holds, the ranks launched (Ray actors, cluster.rank_group, or one
rank in this process) and the summary of what they trained."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from pipeline.core.config import ConfigError, PipelineConfig, TrainingSettings, rename_group
from pipeline.core.phases import STARTUP, WORK, PhaseClock
from pipeline.core.rundir import MANIFEST
from pipeline.core.storage import Loc

from .checkpoints import complete_checkpoints
from .export import EXPORT_DIR
from .loop import PHASES_FILE, WORKERS_FILE, WorkerSpec, train_worker
from .metrics import read_metrics
from .universal_convert import prepare_resume

LOOP_VERSION = 1  # the shared loop's: in every training stage's fingerprint

# How a run is checkpointed, resumed, restarted, staged or tracked does not change what it trains.
MODEL_SOURCE_SETTINGS = ("revision", "cache_dir")


# Settings added after runs were made: fingerprinted only when set, so that those runs'
# outputs keep their fingerprints.
ADDED_SETTINGS = {"deepspeed": None, "eval_on_start": True}


RUN_ONLY_SETTINGS = ("save_steps", "save_total_limit", "resume_from_checkpoint", "max_failures", "local_dir",
                     "report_to", "run_name")


# What a step trains is its global batch, workers x accumulation steps rows (the seeded plan
# cuts one order into steps of that many rows): the fingerprint names the product, so a run
# resumed on another worker count that keeps it is the same run (universal.resume_universal).
GLOBAL_BATCH = "global_batch_rows"


SPLIT_SETTINGS = ("num_workers", "gradient_accumulation_steps")


INPUTS_FILE = "_INPUTS.json"  # the stage's fingerprint inputs, written when it starts


def model_settings(cfg: PipelineConfig) -> dict:
    # where the models come from is not what they are: their files are hashed instead
    return ({k: v for k, v in asdict(cfg.model).items() if k not in MODEL_SOURCE_SETTINGS}
            | {"path": None, "reference_path": None, "tokenizer_path": None})


def training_settings(train_cfg: TrainingSettings) -> dict:
    """A training stage's settings that change what it trains (train's with its preference
    loss, sft's the training settings alone), with the global batch for the two factors."""
    return ({k: v for k, v in asdict(train_cfg).items()
             if k not in RUN_ONLY_SETTINGS + SPLIT_SETTINGS
             and not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}
            | {GLOBAL_BATCH: train_cfg.num_workers * train_cfg.gradient_accumulation_steps})


def _batch_apart(inputs: dict, run_dir: Loc) -> tuple[dict, int]:
    """The inputs without the global batch, and the global batch. TR-DPO's score output
    holds the first segment's rows, which the global batch decides: its fingerprint (the
    upstream) then changes with the batch, and stands here for the score inputs without
    the segment (``first_segment``), read from its manifest."""
    settings = dict(inputs["train_settings"])
    batch = settings.pop(GLOBAL_BATCH, None)
    upstream = inputs.get("upstream")
    for stage_dir in run_dir.iterdir() if upstream else []:
        manifest = stage_dir / str(upstream) / MANIFEST
        if manifest.is_file():
            made = json.loads(manifest.read_text()).get("inputs", {})
            if "first_segment" in made:
                upstream = {k: v for k, v in made.items() if k != "first_segment"}
            break
    return dict(inputs, train_settings=settings, upstream=upstream), batch


def check_global_batch(out: Loc, info: dict) -> None:
    """Before training: a partial train output of this same run at another global batch
    (more or fewer workers, the accumulation not changed to match) holds checkpoints that
    this run would silently not resume. Refused with the way to keep the global batch,
    unless --force. Then this output records its inputs (INPUTS_FILE)."""
    out = Loc(out)
    if "inputs" not in info:  # a caller outside the runner (a benchmark): nothing to compare
        return
    run_dir = out.parent.parent  # <run_dir>/<stage>/<fingerprint>
    mine, batch = _batch_apart(info["inputs"], run_dir)
    for other in out.parent.iterdir() if not info.get("force") else []:
        if other.name == out.name or (other / MANIFEST).is_file() or not (other / INPUTS_FILE).is_file():
            continue
        theirs, their_batch = _batch_apart(json.loads((other / INPUTS_FILE).read_text()), run_dir)
        if theirs == mine and their_batch != batch and complete_checkpoints(other):
            fits = ", ".join(f"{w} x {their_batch // w}" for w in range(1, their_batch + 1) if their_batch % w == 0)
            stage = out.parent.name  # <run_dir>/<stage>/<fingerprint>: train, or sft
            raise ConfigError(f"{stage}: {other} holds checkpoints of this run at a global batch of {their_batch} rows "
                              f"a step, and this one's is {batch} ({stage}.num_workers x "
                              f"{stage}.gradient_accumulation_steps): to resume it on another worker count keep the "
                              f"global batch ({fits}); to train anew at {batch}, rerun with --stages {stage} --force, "
                              f"or remove that output")
    (out / INPUTS_FILE).write_text(json.dumps(info["inputs"], indent=1, default=str))


def preflight(train_cfg: TrainingSettings, dtype: str, stage: str = "train") -> None:
    """What would stop a training stage, checked on the driver before any stage runs: the
    user's DeepSpeed JSON against the pipeline's settings, and NVMe offload's op. Errors
    name the stage's keys (``sft.zero_stage`` for the sft stage)."""
    from cluster.deepspeed_config import build_ds_config, check_nvme, check_with_deepspeed

    if train_cfg.deepspeed:
        try:
            ds = build_ds_config(train_cfg, dtype, train_cfg.num_workers)
            check_with_deepspeed(ds)
            check_nvme(ds)
        except ConfigError as e:
            raise ConfigError(rename_group(str(e), "train", stage)) from None


def check_before_run(train_cfg: TrainingSettings, cfg: PipelineConfig, stage: str, use_ray: bool) -> None:
    """A training stage's checks before any stage runs: ``preflight``, and that the trackers
    it reports to are ready where its ranks run (under Ray they see runtime_env's env_vars)."""
    preflight(train_cfg, cfg.model.dtype, stage)
    if train_cfg.report_to:
        from pipeline.core.tracking import check_ready

        ranks_env = {**os.environ, **(cfg.cluster.runtime_env.get("env_vars", {}) if use_ray else {})}
        check_ready(train_cfg.report_to, ranks_env, on_ray=use_ray)


def summarize(out: Loc) -> dict:
    records = read_metrics(out)
    attempts = json.loads((Loc(out) / WORKERS_FILE).read_text())["attempts"]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    return {
        "steps": train[-1]["step"] if train else 0,
        "step0_loss": train[0]["loss"] if train else None,
        "final_loss": train[-1]["loss"] if train else None,
        "eval_step0_loss": evals[0]["eval_loss"] if evals and evals[0]["step"] == 0 else None,  # eval_on_start
        "final_eval": {k: v for k, v in evals[-1].items()} if evals else {},
        "rows": int(sum(r["rows"] for r in train)),
        "tokens": int(sum(r["tokens"] for r in train)),
        "export": str(Loc(out) / EXPORT_DIR),
        "workers": attempts[-1],  # each rank's node id, hostname and pid in the attempt that finished
        "attempts": len(attempts),
    }


def launch(spec: WorkerSpec, train_cfg: TrainingSettings, out: Loc) -> None:
    """Run a training stage's ranks: ``train_cfg.num_workers`` Ray actors, started again
    after a failure ``train_cfg.max_failures`` times (cluster.rank_group), when
    ``spec.on_ray``, else one rank in this process. Every training stage (train, sft) starts its ranks here, after the
    checkpoint they resume from, if written by another worker count, is converted."""
    prepare_resume(train_cfg, out, spec.stage, train_cfg.num_workers if spec.on_ray else 1, spec.on_ray)
    if (Loc(out) / PHASES_FILE).is_file():  # an earlier launch's: this one's phases are its ranks'
        (Loc(out) / PHASES_FILE).unlink()
    if not spec.on_ray:
        train_worker({"spec": spec})
        # in-process, the next stage (sft, then score) runs in this process: free the engine's memory
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return
    from cluster.rank_group import run_ranks

    resources = {"CPU": train_cfg.cpus_per_worker, "GPU": 1 if train_cfg.use_gpu else 0}
    run_ranks(train_worker, {"spec": spec}, num_workers=train_cfg.num_workers, resources=resources,
              max_failures=train_cfg.max_failures, name=spec.stage)


def mark_phases(clock: PhaseClock, out: Loc) -> None:
    """A training stage's phases, as its rank 0 recorded them in this launch (``PHASES_FILE``,
    removed before the ranks start): start-up until the first attempt's engine was built and
    resumed, work until the model was exported (a failed attempt, and the restart
    after it, are work)."""
    path = Loc(out) / PHASES_FILE
    if path.is_file():
        times = {k: v if isinstance(v, list) else [v] for k, v in json.loads(path.read_text()).items()}
        for phase, at in ((STARTUP, times.get(STARTUP, [])[:1]), (WORK, times.get(WORK, [])[-1:])):
            if at:
                clock.end(phase, at[0])


NO_EVAL = "no eval split (data.eval_fraction: 0), so no eval metrics"
