"""The train stage's driver side: its fingerprint, the check that the rows to train on are
the tokenized rows, the objective built from the config, and the two ways to run the
ranks: Ray Train (``run_on_ray``) or one rank in this process (``run_in_process``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pyarrow.parquet as pq

from pipeline.config import PipelineConfig, TrainConfig, build_loss, for_workers, rename_group
from pipeline.models import local_dir
from pipeline.config import ConfigError
from pipeline.rundir import MANIFEST, HashCache, ShardInfo, hash_checkpoint, read_manifest
from pipeline.stage import RunContext, Stage
from pipeline.storage import Loc

from .checkpoints import CHECKPOINT_DIR, complete_checkpoints
from .export import EXPORT_DIR, export_digest, merge_adapter
from .loop import WORKERS_FILE, WorkerSpec, train_worker
from .metrics import METRICS_FILE, read_metrics
from .preference import PreferenceObjective
from .rows import split_files
from .universal_convert import prepare_resume

STAGE_VERSION = 1

# How a run is checkpointed, resumed, restarted, staged or tracked does not change what it trains.
MODEL_SOURCE_SETTINGS = ("revision", "cache_dir")
# Settings added after runs were made: fingerprinted only when set, so that those runs'
# outputs keep their fingerprints.
ADDED_SETTINGS = {"deepspeed": None}
RUN_ONLY_SETTINGS = ("save_steps", "save_total_limit", "resume_from_checkpoint", "max_failures", "local_dir",
                     "report_to", "run_name")
# What a step trains is its global batch, workers x accumulation steps rows (the seeded plan
# cuts one order into steps of that many rows): the fingerprint names the product, so a run
# resumed on another worker count that keeps it is the same run (universal.resume_universal).
GLOBAL_BATCH = "global_batch_rows"
SPLIT_SETTINGS = ("num_workers", "gradient_accumulation_steps")
INPUTS_FILE = "_INPUTS.json"  # the stage's fingerprint inputs, written when it starts


def fingerprint_inputs(cfg: PipelineConfig, cache: HashCache, upstream: str, sft: str | None = None) -> dict:
    """``sft``: the sft stage's fingerprint when its export is the policy to start from."""
    return {
        "version": STAGE_VERSION,
        "upstream": upstream,
        "policy_model": hash_checkpoint(local_dir(cfg.model.path, cfg.model), "model", cache) if sft is None
        else {"sft": sft},
        "model_settings": model_settings(cfg),
        "train_settings": training_settings(cfg.train),
    }


def model_settings(cfg: PipelineConfig) -> dict:
    # where the models come from is not what they are: their files are hashed instead
    return ({k: v for k, v in asdict(cfg.model).items() if k not in MODEL_SOURCE_SETTINGS}
            | {"path": None, "reference_path": None, "tokenizer_path": None})


def training_settings(train_cfg: TrainConfig, keys: tuple[str, ...] | None = None) -> dict:
    """A training stage's settings that change what it trains (``keys``: those it reads; all
    of TrainConfig's by default), with the global batch for the two factors."""
    return ({k: v for k, v in asdict(train_cfg).items()
             if (keys is None or k in keys) and k not in RUN_ONLY_SETTINGS + SPLIT_SETTINGS
             and not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}
            | {GLOBAL_BATCH: train_cfg.num_workers * train_cfg.gradient_accumulation_steps})


def _batch_apart(inputs: dict) -> tuple[dict, int]:
    settings = dict(inputs["train_settings"])
    batch = settings.pop(GLOBAL_BATCH, None)
    return dict(inputs, train_settings=settings), batch


def check_global_batch(out: Loc, info: dict) -> None:
    """Before training: a partial train output of this same run at another global batch
    (more or fewer workers, the accumulation not changed to match) holds checkpoints that
    this run would silently not resume. Refused with the way to keep the global batch,
    unless --force. Then this output records its inputs (INPUTS_FILE)."""
    out = Loc(out)
    if "inputs" not in info:  # a caller outside the runner (a benchmark): nothing to compare
        return
    mine, batch = _batch_apart(info["inputs"])
    for other in out.parent.iterdir() if not info.get("force") else []:
        if other.name == out.name or (other / MANIFEST).is_file() or not (other / INPUTS_FILE).is_file():
            continue
        theirs, their_batch = _batch_apart(json.loads((other / INPUTS_FILE).read_text()))
        if theirs == mine and their_batch != batch and complete_checkpoints(other):
            fits = ", ".join(f"{w} x {their_batch // w}" for w in range(1, their_batch + 1) if their_batch % w == 0)
            stage = out.parent.name  # <run_dir>/<stage>/<fingerprint>: train, or sft
            raise ConfigError(f"{stage}: {other} holds checkpoints of this run at a global batch of {their_batch} rows "
                              f"a step, and this one's is {batch} ({stage}.num_workers x "
                              f"{stage}.gradient_accumulation_steps): to resume it on another worker count keep the "
                              f"global batch ({fits}); to train anew at {batch}, rerun with --stages {stage} --force, "
                              f"or remove that output")
    (out / INPUTS_FILE).write_text(json.dumps(info["inputs"], indent=1, default=str))


def preflight(train_cfg: TrainConfig, dtype: str, stage: str = "train") -> None:
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


def check_before_run(train_cfg: TrainConfig, cfg: PipelineConfig, stage: str, use_ray: bool) -> None:
    """A training stage's checks before any stage runs: ``preflight``, and that the trackers
    it reports to are ready where its ranks run (under Ray they see runtime_env's env_vars)."""
    preflight(train_cfg, cfg.model.dtype, stage)
    if train_cfg.report_to:
        from pipeline.tracking import check_ready

        ranks_env = {**os.environ, **(cfg.cluster.runtime_env.get("env_vars", {}) if use_ray else {})}
        check_ready(train_cfg.report_to, ranks_env, on_ray=use_ray)


def preference_objective(cfg: PipelineConfig) -> PreferenceObjective:
    """The train stage's objective: the run's loss object, built once here from the YAML."""
    return PreferenceObjective(build_loss(cfg.train), cfg.train, cfg.model.logp_chunk_tokens)


def verify_rows(rows_dir: Loc, tokenized_dir: Loc, fingerprints: dict) -> None:
    """Before the first step: the rows to train on are the tokenized rows, pair for pair,
    and the reference columns were scored from them. Refuses, naming what differs."""
    rows_dir, tokenized_dir = Loc(rows_dir), Loc(tokenized_dir)
    manifest = read_manifest(rows_dir)
    if rows_dir != tokenized_dir:
        upstream = (manifest or {}).get("inputs", {}).get("upstream")
        if upstream != fingerprints["tokenize"]:
            raise RuntimeError(f"train: the reference columns in {rows_dir} were scored from tokenize output "
                               f"{upstream}, not {fingerprints['tokenize']}: rescore (--from score)")
    for split in ("train", "eval"):
        ours, theirs = split_files(rows_dir, split), split_files(tokenized_dir, split)
        if [p.name for p in ours] != [p.name for p in theirs]:
            raise RuntimeError(f"train: {split} shards differ between {rows_dir} {[p.name for p in ours]} "
                               f"and {tokenized_dir} {[p.name for p in theirs]}")
        for a, b in zip(ours, theirs):
            ids_a, ids_b = (pq.ParquetFile(x.open_input()).read(columns=["pair_ids"]).column(0).to_pylist()
                            for x in (a, b))
            if ids_a != ids_b:
                k = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y) if len(ids_a) == len(ids_b) else 0
                raise RuntimeError(f"train: {a.name} row {k}: pair_ids {ids_a[k] if ids_a else None} in {rows_dir} "
                                   f"but {ids_b[k] if ids_b else None} in the tokenized rows {tokenized_dir}")


def summarize(out: Loc) -> dict:
    records = read_metrics(out)
    attempts = json.loads((Loc(out) / WORKERS_FILE).read_text())["attempts"]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    return {
        "steps": train[-1]["step"] if train else 0,
        "step0_loss": train[0]["loss"] if train else None,
        "final_loss": train[-1]["loss"] if train else None,
        "eval_step0_loss": evals[0]["eval_loss"] if evals else None,
        "final_eval": {k: v for k, v in evals[-1].items()} if evals else {},
        "rows": int(sum(r["rows"] for r in train)),
        "tokens": int(sum(r["tokens"] for r in train)),
        "export": str(Loc(out) / EXPORT_DIR),
        "workers": attempts[-1],  # each rank's node id, hostname and pid in the attempt that finished
        "attempts": len(attempts),
    }


def worker_spec(cfg: PipelineConfig, rows_dir: Loc, out: Loc, info: dict, ray_train: bool = False) -> WorkerSpec:
    from pipeline.tracking import forwarded_env

    info = {k: v for k, v in info.items() if k not in ("inputs", "force")}  # the export records the rest
    return WorkerSpec(for_workers(cfg), preference_objective(cfg), str(Loc(rows_dir)), str(Loc(out)), info,
                      ray_train, env=forwarded_env(cfg.train.report_to, os.environ))


def outputs(cfg: PipelineConfig, out: Loc) -> tuple[list[ShardInfo], dict]:
    """The files the manifest commits (metrics and the exported model) and the summary."""
    out = Loc(out)
    if cfg.train.merge_adapter:
        merge_adapter(cfg, out)
    files = [out / METRICS_FILE] + (out / EXPORT_DIR).files()
    return [ShardInfo.of(f, 0, base=out) for f in files], summarize(out)


def run_in_process(cfg: PipelineConfig, rows_dir: Loc, out: Loc, info: dict):
    """One rank in this process (no Ray): the benchmarks' and the GPU machine's path.
    ``rows_dir``: the scored rows, or the tokenized rows for a reference-free loss."""
    verify_rows(rows_dir, Loc(info["tokenized_dir"]), info["fingerprints"])
    check_global_batch(out, info)
    launch(worker_spec(cfg, rows_dir, out, info), cfg.train, out)
    return outputs(cfg, out)


def run_on_ray(cfg: PipelineConfig, rows_dir: Loc, out: Loc, info: dict):
    """``train.num_workers`` ranks placed by Ray Train, restarted ``train.max_failures`` times."""
    verify_rows(rows_dir, Loc(info["tokenized_dir"]), info["fingerprints"])
    check_global_batch(out, info)
    launch(worker_spec(cfg, rows_dir, out, info, ray_train=True), cfg.train, out)
    return outputs(cfg, out)


def launch(spec: WorkerSpec, train_cfg: TrainConfig, out: Loc) -> None:
    """Run a training stage's ranks: ``train_cfg.num_workers`` of them placed by Ray Train
    and restarted ``train_cfg.max_failures`` times when ``spec.ray_train``, else one rank
    in this process. Every training stage (train, sft) starts its ranks here, after the
    checkpoint they resume from, if written by another worker count, is converted."""
    prepare_resume(train_cfg, out, spec.stage, train_cfg.num_workers if spec.ray_train else 1, spec.ray_train)
    if not spec.ray_train:
        train_worker({"spec": spec})
        # in-process, the next stage (sft, then score) runs in this process: free the engine's memory
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": train_cfg.cpus_per_worker}
    if train_cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if train_cfg.use_gpu else "gloo"),
        # Ray Train's run directory is our checkpoints folder, so registering a checkpoint
        # (register_checkpoint) copies nothing.
        run_config=RunConfig(storage_path=str(Loc(out)), name=CHECKPOINT_DIR,
                             failure_config=FailureConfig(max_failures=train_cfg.max_failures)),
    )
    trainer.fit()


# ----------------------------------------------------------------------------- the stage's door

NO_EVAL = "no eval split (data.eval_fraction: 0), so no eval metrics"


def _run(ctx: RunContext):
    """On the scored rows, or on the tokenized rows for a reference-free loss."""
    rows = ctx.dir("score") if "score" in ctx.plans else ctx.dir("tokenize")
    return (run_on_ray if ctx.use_ray else run_in_process)(ctx.cfg, rows, ctx.out, ctx.info("tokenize"))


def trained_model(cfg: PipelineConfig, out: Loc) -> tuple[Loc, str]:
    """The trained policy as a stage after train loads it, and its digest: the consolidated
    model, or with LoRA the base model with the adapter merged (a plain model)."""
    export = Loc(out) / EXPORT_DIR
    if cfg.train.peft is not None:
        if not cfg.train.merge_adapter:
            raise ConfigError("train.merge_adapter: a stage after train loads the trained policy, and with train.peft "
                              "only the adapter is exported; set train.merge_adapter true")
        export = export / "merged"
    return export, export_digest(out, export)


def summary_lines(stats: dict) -> list[str]:
    final = stats.get("final_eval", {})
    evaluated = (f"final eval rewards/accuracies {final['eval_rewards/accuracies']:.3f}, "
                 f"eval loss {final['eval_loss']:.4f}") if final else NO_EVAL
    return [f"train: {stats['steps']} steps, step-0 loss {stats['step0_loss']:.6f} (ln 2 = 0.693147), {evaluated}",
            f"model: {stats['export']}"]


STAGE = Stage(
    name="train",
    # on the scored rows, or the tokenized ones without a score stage; with sft, its export is the
    # policy's start: its fingerprint stands for it
    fingerprint_inputs=lambda cfg, cache, fingerprints: fingerprint_inputs(
        cfg, cache, fingerprints.get("score", fingerprints["tokenize"]), sft=fingerprints.get("sft")),
    run=_run,
    reads=lambda cfg, planned: {"score"} if "score" in planned else {"tokenize"} | ({"sft"} & planned),
    models=("path", "tokenizer_path"),
    loads={"sft": "path"},
    resumes=True,  # from its newest complete checkpoint
    export=trained_model,
    makes="a trained policy",
    hands_on=("path",),
    gpus=lambda cfg: {"train.use_gpu": float(cfg.train.num_workers)} if cfg.train.use_gpu else {},
    preflight=lambda cfg, use_ray: check_before_run(cfg.train, cfg, "train", use_ray),
    summary=summary_lines,
)
