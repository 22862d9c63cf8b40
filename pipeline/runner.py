"""The stage runner: fingerprint every stage, skip what is done, run the rest in order.

It knows no stage by name: it loops over the registered stages (``pipeline.registry``), each
of which declares what it reads, loads, hands on and how it runs. Fingerprints are
computed up front from the config and the input files' contents, so ``status`` needs no
Ray and a rerun with unchanged inputs touches nothing. Each stage writes
``<run_dir>/<stage>/<fingerprint>/`` and commits it with ``_MANIFEST.json``. A partial
output is resumed where the stage can (``Stage.resumes``: scoring keeps its committed
shards, training its complete checkpoints) and cleared and redone where it cannot.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable

import yaml

from cluster.ray_cluster import stop_local
from cluster.workers import warm_pool
from pipeline import planning
from pipeline.core import models
from pipeline.core.config import ConfigError, PipelineConfig, as_written
from pipeline.core.devices import check_ray_cluster_gpus
from pipeline.core.phases import PhaseClock, phases_line, run_line
from pipeline.core.redaction import redact_text
from pipeline.core.rundir import HashCache, check_run_dir, fingerprint, read_manifest, stage_state, write_manifest
from pipeline.core.stage import RunContext, Stage, StagePlan, model_marker
from pipeline.registry import names, registered, stage
from pipeline.core.storage import Loc


def plan_stages(cfg: PipelineConfig, weightless: bool = False) -> dict[str, StagePlan]:
    """Every registered stage the config needs, in order, each fingerprinted from the config
    (``zero_stage: auto`` resolved) and the fingerprints of the stages planned before it.
    ``weightless``: only those that load no model's weights (nothing downloaded or hashed)."""
    cfg = planning.resolve(cfg)
    run_dir = Loc(cfg.run_dir)
    cache = HashCache(run_dir / ".hash_cache.json")
    plans: dict[str, StagePlan] = {}
    for s in registered():
        if weightless and set(s.models) - {"tokenizer_path"}:  # the first that loads a model ends a weightless plan
            break
        if s.needed(cfg) is None:
            inputs = s.fingerprint_inputs(cfg, cache, {name: p.fingerprint for name, p in plans.items()})
            fp = fingerprint(inputs)
            plans[s.name] = StagePlan(s.name, fp, run_dir / s.name / fp, inputs)
    return plans


def select_stages(stages: list[str] | None, from_stage: str | None) -> list[str]:
    order = names()
    if stages and from_stage:
        raise ValueError("use --stages or --from, not both")
    if from_stage:
        if from_stage not in order:
            raise ValueError(f"--from {from_stage!r}: not one of {order}")
        return order[order.index(from_stage):]
    if stages:
        for s in stages:
            if s not in order:
                raise ValueError(f"--stages: {s!r} is not one of {order}")
        return [s for s in order if s in stages]
    return order


def upstream(plans: dict[str, StagePlan], cfg: PipelineConfig) -> dict[str, set[str]]:
    """The stages each planned stage reads, directly or not."""
    out: dict[str, set[str]] = {}
    for s in registered():
        if s.name in plans:
            out[s.name] = set().union(*({d} | out[d] for d in s.reads(cfg, set(plans))))
    return out


# ----------------------------------------------------------------------------- models one stage hands on


def made_from(stage_dir: Loc, key: str, producer: str) -> str | None:
    """The digest of ``producer``'s model that an output loaded as ``key``: its manifest's
    record, or for a partial output the marker written when it started."""
    manifest = read_manifest(stage_dir)
    if manifest is not None:
        return manifest.get("models", {}).get(key, {}).get("export_digest")
    marker = Loc(stage_dir) / model_marker(producer)
    return json.loads(marker.read_text())["export_digest"] if marker.is_file() else None


def stale_output(name: str, plan: StagePlan, state: str, model, producer: str | None = None) -> str | None:
    """Why an output of stage ``name`` is not of the build of ``producer``'s model (``model``,
    pinned) this run hands on, or None. A fingerprint names what was asked for, not the
    bytes that came out: a stage rerun with --force (or on other hardware) keeps its
    fingerprint with other weights, and an output made from the earlier ones would not be
    what the stages after it assume (the reference columns of an SFT model, say)."""
    loads = stage(name).loads
    producer = producer or next(iter(loads))
    if state == "missing" or model.export_digest is None:
        return None
    theirs = made_from(plan.dir, f"model.{loads[producer]}", producer)
    if theirs == model.export_digest:
        return None
    return (f"{name} ({plan.fingerprint}) was made from {stage(producer).makes} with digest {theirs}, and the "
            f"{producer} stage's model is now {model.export_digest} ({producer} ran again since)")


def hand_on(cfg: PipelineConfig, pinned: dict, producer: Stage, plan: StagePlan):
    """The config and pinned models with ``producer``'s export in place of the model keys
    it hands on (``Stage.hands_on``), for the stages after it, and the export, pinned."""
    export, digest = producer.export(cfg, plan.dir)
    cfg, trained = models.pin_trained(cfg, str(export), digest, producer.hands_on)
    return cfg, dict(pinned, **{k: dataclasses.replace(trained, key=f"model.{k}") for k in producer.hands_on}), trained


def _redacting(log: Callable[[str], None]) -> Callable[[str], None]:
    return lambda line: log(redact_text(line))


def run_pipeline(
    cfg: PipelineConfig,
    stages: list[str] | None = None,
    from_stage: str | None = None,
    force: bool = False,
    use_ray: bool = True,
    log: Callable[[str], None] = print,
    memory_check: bool = True,
    started: float | None = None,
) -> dict[str, dict]:
    """``started``: when the run began for the ``[run]`` line (the CLI: its process's start)."""
    started = time.time() if started is None else started
    check_run_dir(cfg.run_dir)
    log = _redacting(log)  # stage directories are printed: a run_dir URI may hold credentials
    selected = select_stages(stages, from_stage)
    written = as_written(cfg)  # the config as given (Hub ids, not the commits they resolved to)
    cfg, pinned = models.pin(cfg)  # once, on the driver: every worker loads the same files
    cfg = planning.resolve(cfg)  # zero_stage: auto, from the config alone (as status and plan resolve it)
    for s in registered():  # checked before any stage runs, not on the ranks after hours of scoring
        if s.name in selected and s.needed(cfg) is None:
            s.preflight(cfg, use_ray)
    plans = plan_stages(cfg)
    if memory_check and (why := planning.over_memory(cfg, {n: p.dir for n, p in plans.items() if n in selected}, force)):
        raise ConfigError(why)  # device.memory_gib given, and a stage to run does not fit: refused before launch
    run_dir = Loc(cfg.run_dir)
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=False))

    run = _Run(cfg, pinned, plans, selected, use_ray, force, log)
    with warm_pool(log, cfg.cluster.progress_bars):  # actors one stage leaves warm for the next; all gone after
        for s in registered():
            if s.name not in plans:
                if s.name in selected and (not s.optional or stages or from_stage):  # an optional stage's absence is the default
                    log(f"[{s.name}] not needed: {s.needed(cfg)}")
                continue
            run.stage(s, written)
    from pipeline.report import report_aside

    report = report_aside(run_dir, run.results, log)
    if run.connected:
        stop_local()  # beside the report: no stage needs the cluster any more
    report()
    log(run_line(started, run.ran, sum(r["seconds"] for r in run.results.values() if r["ran"]),
                 run.ray_start if run.connected else None))
    return run.results


class _Run:
    """One ``run``'s state as it goes from stage to stage: the config and pinned models (with
    the models earlier stages handed on), the results, whether Ray is connected."""

    def __init__(self, cfg, pinned, plans, selected, use_ray, force, log):
        self.cfg, self.pinned, self.plans, self.selected = cfg, pinned, plans, selected
        self.use_ray, self.force, self.log = use_ray, force, log
        self.results: dict[str, dict] = {}
        self.exports: dict[str, object] = {}  # each producer's model as handed on (Pinned, with its digest)
        self.bases: dict[str, object] = {}  # the policy each producer started from (recorded with later exports)
        self.connected = False
        self.ray_start, self.ran = 0.0, []  # seconds in ray.init; when the stages that ran started, and the last ended
        self.needed = set().union(*(ups for name, ups in upstream(plans, cfg).items() if name in selected))

    def stage(self, s: Stage, written: dict) -> None:
        """Skip, refuse, clear or run one planned stage, then hand its model on."""
        plan = self.plans[s.name]
        state = self.check_loaded_models(s, plan, stage_state(plan.dir))
        if s.name not in self.selected:
            if state != "done" and s.name in self.needed:
                raise RuntimeError(f"stage {s.name} ({plan.fingerprint}) is {state}; run it first (--from {s.name})")
        elif state == "done" and not self.force:
            self.log(f"[{s.name}] done already ({plan.dir}), skipped")
            self.results[s.name] = {"ran": False, "dir": str(plan.dir), **_figures(read_manifest(plan.dir))}
        else:
            self.execute(s, plan, written)
        # its model, to the stages after it that load it and run or are read in this run
        later = [t for t in registered() if s.name in t.loads and t.name in self.plans
                 and (t.name in self.selected or t.name in self.needed)]
        if s.export is not None and later and stage_state(plan.dir) == "done":
            self.bases[s.name] = self.pinned["path"]
            self.cfg, self.pinned, self.exports[s.name] = hand_on(self.cfg, self.pinned, s, plan)

    def check_loaded_models(self, s: Stage, plan: StagePlan, state: str) -> str:
        """An output made from another build of a model an earlier stage of this run makes:
        a partial one (or one rerun with --force) is cleared, a complete one refused."""
        for producer in s.loads:
            if producer not in self.exports:  # not made in this run, or not handed on: nothing to compare
                continue
            stale = stale_output(s.name, plan, state, self.exports[producer], producer)
            if stale and (state == "partial" or (self.force and s.name in self.selected)):
                self.log(f"[{s.name}] cleared: {stale}")  # a partial output is never resumed on another model
                plan.dir.rmtree()
                state = "missing"
            elif stale and (s.name in self.selected or s.name in self.needed):
                raise RuntimeError(f"{stale}: rerun it, --from {s.name} --force")
        return state

    def execute(self, s: Stage, plan: StagePlan, written: dict) -> None:
        if self.force or not s.resumes:
            plan.dir.rmtree()  # a stale or partial output is never appended to
        plan.dir.mkdir()
        for producer in s.loads:  # which build of a model it loads, while it is partial
            if producer in self.exports:
                marker = {"export_digest": self.exports[producer].export_digest}
                (plan.dir / model_marker(producer)).write_text(json.dumps(marker))
        if self.use_ray and not self.connected:
            from cluster.ray_cluster import connect

            started = time.time()
            connect(self.cfg.cluster, self.log)
            self.connected, self.ray_start = True, time.time() - started
            # before anything is placed: Ray waits forever for GPUs the cluster cannot have
            check_ray_cluster_gpus(self.cfg, [stage(name) for name in self.selected if name in self.plans])
        self.log(f"[{s.name}] running -> {plan.dir}")
        clock = PhaseClock()
        used = {p.key: p.record() for k, p in self.pinned.items() if k in s.models}
        # with a model another stage made as its policy (model.path), the policy that stage started from
        bases = {f"{producer}.base_model": self.bases[producer].record() for producer, key in s.loads.items()
                 if key == "path" and producer in self.bases}
        shards, stats = s.run(RunContext(self.cfg, self.plans, s.name, self.use_ray, self.force, dict(used, **bases),
                                         clock))
        finished = time.time()
        seconds = finished - clock.started
        manifest = write_manifest(plan.dir, stage=s.name, fp=plan.fingerprint, inputs=plan.inputs, settings=written,
                                  shards=shards, stats=stats, seconds=seconds, models=used, phases=clock.seconds(finished))
        self.results[s.name] = {"ran": True, "dir": str(plan.dir), **_figures(manifest)}
        self.ran = [self.ran[0] if self.ran else clock.started, finished]
        self.log(f"[{s.name}] done in {seconds:.1f}s")


def _figures(manifest: dict) -> dict:
    stats = manifest["stats"]
    return {"rows": stats["rows"], "tokens": stats["tokens"], "seconds": manifest["seconds"], "stats": stats,
            "phases": manifest.get("phases")}


def status(cfg: PipelineConfig) -> list[dict]:
    table = []
    plans = plan_stages(models.pin(cfg)[0])
    for s in registered():
        if s.name not in plans:
            table.append({"stage": s.name, "fingerprint": "-", "state": "not needed", "dir": f"({s.needed(cfg)})"})
            continue
        plan = plans[s.name]
        state = stage_state(plan.dir)
        manifest = read_manifest(plan.dir) if state == "done" else None
        figures = _figures(manifest) if manifest else s.partial(plan.dir) if state == "partial" else {}
        progress = s.progress(cfg, plan.dir)
        table.append({"stage": s.name, "fingerprint": plan.fingerprint,
                      "state": f"{state} ({progress})" if progress else state,
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
    lines = [format_table(rows, ["stage", "state", "rows", "tokens", "seconds", "output"])]
    ran = [phases_line(name, r["phases"]) for name, r in results.items() if r["ran"] and r.get("phases")]
    lines += ["phases: " + "; ".join(ran)] if ran else []  # under the table: its seconds, split
    for name, r in results.items():
        lines += stage(name).summary(r["stats"])
    return "\n".join(lines)
