"""The train stage's driver side: its fingerprint, the check that the rows to train on are
the tokenized rows, the objective built from the config, and the two ways to run the
ranks: Ray actors (``run_on_ray``, cluster.rank_group) or one rank in this process (``run_in_process``)."""

from __future__ import annotations

import os

import pyarrow.parquet as pq

from pipeline.core.config import ConfigError, PipelineConfig, build_loss, for_workers
from pipeline.core.models import local_dir
from pipeline.core.rows import split_files
from pipeline.core.phases import WORK, PhaseClock
from pipeline.core.rundir import HashCache, ShardInfo, hash_checkpoint, read_manifest
from pipeline.core.stage import RunContext, Stage
from pipeline.core.storage import Loc
from pipeline.training.export import EXPORT_DIR, export_digest, merge_adapter
from pipeline.training.launch import (LOOP_VERSION, NO_EVAL, check_before_run, check_global_batch, launch,
                                      mark_phases, model_settings, summarize, training_settings)
from pipeline.training.loop import WorkerSpec
from pipeline.training.metrics import METRICS_FILE, read_metrics

from .preference import PreferenceObjective

# train's version is the shared loop's (as it was before the loop moved down a floor, so that
# fingerprints held): a change to the preference objective alone bumps sft's fingerprint too.
STAGE_VERSION = LOOP_VERSION


def fingerprint_inputs(cfg: PipelineConfig, cache: HashCache, upstream: str, sft: str | None = None) -> dict:
    """``sft``: the sft stage's fingerprint when its export is the policy to start from."""
    return {
        "version": STAGE_VERSION,
        "upstream": upstream,
        "policy_model": hash_checkpoint(local_dir(cfg.model.path, cfg.model), "model", cache) if sft is None
        else {"sft": sft},
        "model_settings": model_settings(cfg),
        "train_settings": train_settings(cfg.train),
    }


def train_settings(train_cfg) -> dict:
    """The training settings train's fingerprint holds. TR-DPO's keys came after runs were
    made: without ``sync_ref_model`` its tau is left out (those runs keep their
    fingerprints), with it the alpha that applies (null is 0.6: the same run)."""
    settings = training_settings(train_cfg)
    if train_cfg.sync_ref_model:
        settings["ref_model_mixup_alpha"] = train_cfg.mixup_alpha
    else:
        del settings["ref_model_sync_steps"]
    return settings


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


def worker_spec(cfg: PipelineConfig, rows_dir: Loc, out: Loc, info: dict, on_ray: bool = False) -> WorkerSpec:
    from pipeline.core.tracking import forwarded_env

    info = {k: v for k, v in info.items() if k not in ("inputs", "force")}  # the export records the rest
    return WorkerSpec(for_workers(cfg), preference_objective(cfg), str(Loc(rows_dir)), str(Loc(out)), info,
                      on_ray, env=forwarded_env(cfg.train.report_to, os.environ))


def outputs(cfg: PipelineConfig, out: Loc, clock: PhaseClock | None = None) -> tuple[list[ShardInfo], dict]:
    """The files the manifest commits (metrics and the exported model) and the summary;
    ``clock``: the phases, as the ranks recorded them, and a LoRA merge here as work."""
    out = Loc(out)
    if clock is not None:
        mark_phases(clock, out)
    if cfg.train.merge_adapter:
        merge_adapter(cfg, out)
        if clock is not None:
            clock.end(WORK)
    files = [out / METRICS_FILE] + (out / EXPORT_DIR).files()
    stats = summarize(out)
    if cfg.train.sync_ref_model:  # TR-DPO: when the reference was refreshed, and what that cost
        done = [r for r in read_metrics(out) if "reference_refresh" in r]
        stats["reference_refreshes"] = {"steps": [r["step"] for r in done],
                                        "seconds": sum(r["refresh_seconds"] for r in done)}
    return [ShardInfo.of(f, 0, base=out) for f in files], stats


def run_in_process(cfg: PipelineConfig, rows_dir: Loc, out: Loc, info: dict, clock: PhaseClock | None = None):
    """One rank in this process (no Ray): the benchmarks' and the GPU machine's path.
    ``rows_dir``: the scored rows, or the tokenized rows for a reference-free loss."""
    verify_rows(rows_dir, Loc(info["tokenized_dir"]), info["fingerprints"])
    check_global_batch(out, info)
    launch(worker_spec(cfg, rows_dir, out, info), cfg.train, out)
    return outputs(cfg, out, clock)


def run_on_ray(cfg: PipelineConfig, rows_dir: Loc, out: Loc, info: dict, clock: PhaseClock | None = None):
    """``train.num_workers`` ranks on Ray (cluster.rank_group), restarted ``train.max_failures`` times."""
    verify_rows(rows_dir, Loc(info["tokenized_dir"]), info["fingerprints"])
    check_global_batch(out, info)
    launch(worker_spec(cfg, rows_dir, out, info, on_ray=True), cfg.train, out)
    return outputs(cfg, out, clock)


# ----------------------------------------------------------------------------- the stage's door


def _run(ctx: RunContext):
    """On the scored rows, or on the tokenized rows for a reference-free loss."""
    rows = ctx.dir("score") if "score" in ctx.plans else ctx.dir("tokenize")
    return (run_on_ray if ctx.use_ray else run_in_process)(ctx.cfg, rows, ctx.out, ctx.info("tokenize"), ctx.clock)


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
    refreshed = stats.get("reference_refreshes")
    return ([f"train: {stats['steps']} steps, step-0 loss {stats['step0_loss']:.6f} (ln 2 = 0.693147), {evaluated}"]
            + ([f"TR-DPO: {len(refreshed['steps'])} reference refreshes (every {refreshed['steps'][0]} steps), "
                f"{refreshed['seconds']:.1f} s"] if refreshed and refreshed["steps"] else [])
            + [f"model: {stats['export']}"])


def refreshes(cfg: PipelineConfig, out: Loc) -> str | None:
    """TR-DPO's segments, as ``status`` shows them: the refreshes done, and their steps."""
    if not cfg.train.sync_ref_model:
        return None
    done = [r["step"] for r in read_metrics(out) if "reference_refresh" in r]
    last = f", the last at step {done[-1]}" if done else ""
    return f"TR-DPO: {len(done)} reference refreshes{last}, one every {cfg.train.ref_model_sync_steps} steps"


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
    progress=refreshes,
)
