"""The stage runner: fingerprint every stage, skip what is done, run the rest in order.

Fingerprints are computed up front from the config and the input files' contents, so
``status`` needs no Ray and a rerun with unchanged inputs touches nothing. Each stage
writes ``<run_dir>/<stage>/<fingerprint>/`` and commits it with ``_MANIFEST.json``.
A partial tokenize or train output is cleared and redone; a partial score output keeps
its committed shards and scores only the missing ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import yaml

from pipeline import models
from pipeline.config import ConfigError, PipelineConfig, as_written, build_loss, redact, to_dict
from pipeline.devices import check_ray_cluster_gpus
from pipeline.redaction import redact_text
from pipeline.rundir import HashCache, fingerprint, read_manifest, stage_state, write_manifest
from pipeline.storage import Loc

STAGES = ("tokenize", "sft", "score", "train")
# The model keys (ModelConfig) each stage loads; its manifest records where they came from.
STAGE_MODELS = {"tokenize": ("tokenizer_path",), "sft": ("path", "tokenizer_path"), "score": ("reference_path",),
                "train": ("path", "tokenizer_path")}
# Why a stage has no plan.
NOT_NEEDED = {"sft": "sft.enabled is false (the reference is model.reference_path or model.path)",
              "score": "the loss is reference-free"}


@dataclass
class StagePlan:
    name: str
    fingerprint: str
    dir: Loc  # a local path or a URI: the run directory may be on shared storage
    inputs: dict


def plan_stages(cfg: PipelineConfig) -> dict[str, StagePlan]:
    from stages import score, sft, tokenize, train

    run_dir = Loc(cfg.run_dir)
    cache = HashCache(run_dir / ".hash_cache.json")
    plans: dict[str, StagePlan] = {}

    def add(name: str, inputs: dict) -> str:
        fp = fingerprint(inputs)
        plans[name] = StagePlan(name, fp, run_dir / name / fp, inputs)
        return fp

    tok_fp = add("tokenize", tokenize.fingerprint_inputs(cfg, cache))
    # with sft, its export is the reference and the policy's start: its fingerprint stands for them
    sft_fp = add("sft", sft.fingerprint_inputs(cfg, cache, tok_fp)) if cfg.sft.enabled else None
    if build_loss(cfg.train).needs_reference:
        score_fp = add("score", score.fingerprint_inputs(cfg, cache, tok_fp, sft=sft_fp))
        add("train", train.fingerprint_inputs(cfg, cache, score_fp, sft=sft_fp))
    else:  # a reference-free loss trains on the tokenized rows: no score stage at all
        add("train", train.fingerprint_inputs(cfg, cache, tok_fp, sft=sft_fp))
    return plans


def select_stages(stages: list[str] | None, from_stage: str | None) -> list[str]:
    if stages and from_stage:
        raise ValueError("use --stages or --from, not both")
    if from_stage:
        if from_stage not in STAGES:
            raise ValueError(f"--from {from_stage!r}: not one of {list(STAGES)}")
        return list(STAGES[STAGES.index(from_stage):])
    if stages:
        for s in stages:
            if s not in STAGES:
                raise ValueError(f"--stages: {s!r} is not one of {list(STAGES)}")
        return [s for s in STAGES if s in stages]
    return list(STAGES)


def _run_stage(name: str, cfg: PipelineConfig, plans: dict[str, StagePlan], use_ray: bool, force: bool = False,
               models_used: dict | None = None):
    """Run one stage's core; returns (shards, stats). ``models_used``: where the models came
    from, recorded next to an exported model."""
    from stages import score, sft, tokenize, train

    plan = plans[name]
    if name == "tokenize":
        return (tokenize.run_on_ray if use_ray else tokenize.run_in_process)(cfg, plan.dir)
    info = {
        "fingerprints": {s: p.fingerprint for s, p in plans.items()},
        "config": redact(to_dict(cfg)),  # model names pinned: Hub ids at their commits
        "tokenized_dir": str(plans["tokenize"].dir),
        "inputs": plan.inputs,
        "force": force,
        "models": models_used or {},
    }
    if name == "sft":
        return sft.run(cfg, plans["tokenize"].dir, plan.dir, info, use_ray)
    if name == "score":
        upstream = plans["tokenize"]
        manifest = read_manifest(upstream.dir)
        return (score.run_on_ray if use_ray else score.run_in_process)(cfg, upstream.dir, manifest, plan.dir)
    rows_dir = plans["score"].dir if "score" in plans else plans["tokenize"].dir
    return (train.run_on_ray if use_ray else train.run_in_process)(cfg, rows_dir, plan.dir, info)


# The stages that load the SFT model, by the key they load it as; a stage's output records
# the SFT model's digest in its manifest, and while it is partial in SFT_MARKER.
SFT_LOADED = {"score": "model.reference_path", "train": "model.path"}
SFT_MARKER = "_SFT_MODEL.json"


def upstream(plans: dict[str, StagePlan], cfg: PipelineConfig) -> dict[str, set[str]]:
    """The stages each planned stage reads, directly or not (sft with data of its own reads
    no tokenize output)."""
    direct = {"tokenize": set(), "sft": {"tokenize"} if cfg.sft.data == "chosen" else set(),
              "score": {"tokenize"} | ({"sft"} & set(plans)),
              "train": {"score"} if "score" in plans else {"tokenize"} | ({"sft"} & set(plans))}
    out: dict[str, set[str]] = {}
    for name in STAGES:
        if name in plans:
            out[name] = set().union(*({d} | out[d] for d in direct[name]))
    return out


def made_from_sft(stage_dir: Loc, name: str) -> str | None:
    """The digest of the SFT model an output of ``name`` loaded: its manifest's record, or
    for a partial output the marker written when it started."""
    manifest = read_manifest(stage_dir)
    if manifest is not None:
        return manifest.get("models", {}).get(SFT_LOADED[name], {}).get("export_digest")
    marker = Loc(stage_dir) / SFT_MARKER
    return json.loads(marker.read_text())["export_digest"] if marker.is_file() else None


def stale_sft_output(name: str, plan: StagePlan, state: str, sft_model) -> str | None:
    """Why an output of score or train is not of the SFT model this run hands on, or None.
    A fingerprint names what was asked for, not the bytes that came out: sft rerun with
    --force (or on other hardware) keeps its fingerprint with other weights, and columns
    scored from the earlier ones would make train's step 0 something other than policy ==
    reference."""
    if state == "missing" or sft_model.export_digest is None:
        return None
    theirs = made_from_sft(plan.dir, name)
    if theirs == sft_model.export_digest:
        return None
    return (f"{name} ({plan.fingerprint}) was made from an SFT model with digest {theirs}, and the sft stage's "
            f"model is now {sft_model.export_digest} (sft ran again since)")


NO_EVAL = "no eval split (data.eval_fraction: 0), so no eval metrics"


def _redacting(log: Callable[[str], None]) -> Callable[[str], None]:
    return lambda line: log(redact_text(line))


def check_run_dir(run_dir: str, environ: dict | None = None) -> None:
    """Refuse a relative ``run_dir`` in a job submitted with ``ray job submit``: the job runs
    in Ray's temporary copy of its working directory, deleted when the job ends, so the
    outputs would be lost with it."""
    environ = os.environ if environ is None else environ
    job = environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray Jobs for the entrypoint
    if not job or "://" in run_dir or os.path.isabs(os.path.expanduser(run_dir)):
        return
    try:
        working_dir = (json.loads(job).get("runtime_env") or {}).get("working_dir")
    except ValueError:
        working_dir = None
    where = f"Ray's temporary copy of the job's working directory ({working_dir})" if working_dir else \
        "a directory Ray manages for the job"
    raise ConfigError(f"run_dir: {run_dir!r} is relative, and under `ray job submit` it would resolve inside "
                      f"{where}, which is deleted when the job ends: the outputs would be lost. Use an absolute "
                      f"path on storage every node sees, or a URI (s3://bucket/prefix)")


def run_pipeline(
    cfg: PipelineConfig,
    stages: list[str] | None = None,
    from_stage: str | None = None,
    force: bool = False,
    use_ray: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    check_run_dir(cfg.run_dir)
    log = _redacting(log)  # stage directories are printed: a run_dir URI may hold credentials
    selected = select_stages(stages, from_stage)
    written = as_written(cfg)  # the config as given (Hub ids, not the commits they resolved to)
    cfg, pinned = models.pin(cfg)  # once, on the driver: every worker loads the same files
    # the training stages' settings, checked before any stage runs (not on the ranks after hours of scoring)
    training = {name: train_cfg for name, train_cfg in (("sft", cfg.sft_training() if cfg.sft.enabled else None),
                                                         ("train", cfg.train)) if train_cfg and name in selected}
    for train_cfg in training.values():
        from stages import train

        train.preflight(train_cfg, cfg.model.dtype, "sft" if train_cfg is not cfg.train else "train")
    plans = plan_stages(cfg)
    for train_cfg in training.values():
        if train_cfg.report_to:
            from pipeline.tracking import check_ready

            # the ranks see runtime_env's env_vars only under Ray
            ranks_env = {**os.environ, **(cfg.cluster.runtime_env.get("env_vars", {}) if use_ray else {})}
            check_ready(train_cfg.report_to, ranks_env, on_ray=use_ray)
    run_dir = Loc(cfg.run_dir)
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=False))

    results: dict[str, dict] = {}
    connected = False
    base = None  # with sft: the model it started from
    needed = set().union(*(ups for s, ups in upstream(plans, cfg).items() if s in selected))
    for name in STAGES:
        if name not in plans:
            if name in selected and (name != "sft" or stages or from_stage):  # sft's absence is the default
                log(f"[{name}] not needed: {NOT_NEEDED[name]}")
            continue
        plan = plans[name]
        state = stage_state(plan.dir)
        stale = stale_sft_output(name, plan, state, pinned["path"]) if name in SFT_LOADED and "sft" in plans else None
        if stale and (state == "partial" or (force and name in selected)):
            log(f"[{name}] cleared: {stale}")  # a partial output is never resumed on another SFT model
            plan.dir.rmtree()
            state = "missing"
        elif stale and (name in selected or name in needed):
            raise RuntimeError(f"{stale}: rerun it, --from {name} --force")
        if name not in selected:
            if state != "done" and name in needed:
                raise RuntimeError(
                    f"stage {name} ({plan.fingerprint}) is {state}; "
                    f"run it first (--from {name})"
                )
        elif state == "done" and not force:
            manifest = read_manifest(plan.dir)
            log(f"[{name}] done already ({plan.dir}), skipped")
            results[name] = {"ran": False, "dir": str(plan.dir), **_figures(manifest)}
        else:
            if force or name == "tokenize":
                plan.dir.rmtree()  # a stale or partial output is never appended to
            # A partial score output keeps its committed shards; a partial train or sft output
            # keeps its complete checkpoints and resumes from the newest.
            plan.dir.mkdir()
            if name in SFT_LOADED and pinned["path"].export_digest:
                (plan.dir / SFT_MARKER).write_text(json.dumps({"export_digest": pinned["path"].export_digest}))
            if use_ray and not connected:
                from cluster.ray_cluster import connect

                connect(cfg.cluster, log)
                connected = True
                # before anything is placed: Ray waits forever for GPUs the cluster cannot have
                check_ray_cluster_gpus(cfg, [s for s in selected if s in plans])
            log(f"[{name}] running -> {plan.dir}")
            start = time.time()
            used = {p.key: p.record() for k, p in pinned.items() if k in STAGE_MODELS[name]}
            shards, stats = _run_stage(name, cfg, plans, use_ray, force,
                                       dict(used, **({"sft.base_model": base.record()} if name == "train" and base else {})))
            seconds = time.time() - start
            manifest = write_manifest(
                plan.dir, stage=name, fp=plan.fingerprint, inputs=plan.inputs,
                settings=written, shards=shards, stats=stats, seconds=seconds,
                models=used,
            )
            results[name] = {"ran": True, "dir": str(plan.dir), **_figures(manifest)}
            log(f"[{name}] done in {seconds:.1f}s")
        if name == "sft" and stage_state(plan.dir) == "done" and {"score", "train"} & set(selected):
            # the SFT model is the reference score loads and the policy train starts from
            from stages.sft import export_digest, export_dir

            base = pinned["path"]
            cfg, trained = models.pin_trained(cfg, str(export_dir(cfg, plan.dir)), export_digest(cfg, plan.dir))
            pinned = dict(pinned, path=trained, reference_path=dataclasses.replace(trained, key="model.reference_path"))
    if results:
        from pipeline.report import write_report

        log(f"[report] {write_report(run_dir, results)}")
    return results


def _figures(manifest: dict) -> dict:
    stats = manifest["stats"]
    return {"rows": stats["rows"], "tokens": stats["tokens"], "seconds": manifest["seconds"],
            "stats": stats}


def status(cfg: PipelineConfig) -> list[dict]:
    table = []
    plans = plan_stages(models.pin(cfg)[0])
    for name in STAGES:
        if name not in plans:
            table.append({"stage": name, "fingerprint": "-", "state": "not needed"})
            continue
        plan = plans[name]
        state = stage_state(plan.dir)
        manifest = read_manifest(plan.dir) if state == "done" else None
        figures = _figures(manifest) if manifest else {}
        if state == "partial" and name == "score":
            figures = {"rows": f"{len(plan.dir.glob('*.parquet'))} shards"}
        table.append({"stage": name, "fingerprint": plan.fingerprint, "state": state,
                      "rows": figures.get("rows", "-"), "tokens": figures.get("tokens", "-"),
                      "seconds": figures.get("seconds", "-"), "dir": redact_text(str(plan.dir))})
    return table


def format_table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, "-"))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "-")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def format_summary(results: dict[str, dict]) -> str:
    rows = [
        {"stage": name, "state": "ran" if r["ran"] else "skipped", "rows": r["rows"],
         "tokens": r["tokens"], "seconds": r["seconds"], "output": redact_text(r["dir"])}
        for name, r in results.items()
    ]
    text = format_table(rows, ["stage", "state", "rows", "tokens", "seconds", "output"])
    sft = results.get("sft")
    if sft:
        s = sft["stats"]
        logp = s["eval_chosen_logp_per_token"]
        evaluated = (f"eval split's mean chosen log-prob per token {logp['base']:.4f} under the base model, "
                     f"{logp['sft']:.4f} under the SFT model") if logp["sft"] is not None else NO_EVAL
        text += (f"\nsft: {s['steps']} steps, loss {s['step0_loss']:.4f} -> {s['final_loss']:.4f}, {evaluated}"
                 f"\nSFT model (the reference and the policy's start): {s['export']}")
    train = results.get("train")
    if train:
        s = train["stats"]
        final = s.get("final_eval", {})
        evaluated = (f"final eval rewards/accuracies {final['eval_rewards/accuracies']:.3f}, "
                     f"eval loss {final['eval_loss']:.4f}") if final else NO_EVAL
        text += (f"\ntrain: {s['steps']} steps, step-0 loss {s['step0_loss']:.6f} (ln 2 = 0.693147), "
                 f"{evaluated}\nmodel: {s['export']}")
    return text
