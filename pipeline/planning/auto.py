"""Settings chosen from the plan, and the refusal before launch (docs/plan.md).

- ``zero_stage: auto`` (train's, sft's): the lowest ZeRO stage whose plan fits
  ``device.memory_gib``. It is resolved from the config alone (the model's config.json and
  the settings), never from what a cluster reports, so ``status``, ``plan`` and ``run``
  agree, and the resolved stage is what the fingerprints hold. With the memory unknown, or
  where no stage fits, ``auto`` is 3 (the default); where only ZeRO-3 can run (TR-DPO's
  reference held by the ranks, ``offload_param``) it is 3.
- ``over_memory``: before any stage runs, the stages whose plan exceeds the device's
  memory, with the plan and the settings to change. With the memory unknown: none.
"""

from __future__ import annotations

import dataclasses

from pipeline.core.config import ConfigError, PipelineConfig, TrainingSettings

from .memory import GiB, train_rank
from .model import ModelFacts, model_facts, read_config
from .plan import CPU_RANK_OVERHEAD, _peak, make_plan, memory_limit, train_shape
from .report import gib, stage_text

AUTO = "auto"


def _facts(cfg: PipelineConfig) -> ModelFacts:
    return model_facts(read_config(cfg.model.path, cfg.model), cfg.model.trust_remote_code)


def candidates(settings: TrainingSettings, tr_dpo: bool, group: str = "train") -> tuple[int, ...]:
    """The ZeRO stages this training group can run at, lowest first: the one its DeepSpeed
    JSON names, if it names one."""
    from cluster.deepspeed_config import offload_device

    ds = settings.deepspeed if isinstance(settings.deepspeed, dict) else {}
    named = (ds.get("zero_optimization") or {}).get("stage", "auto")
    if named != "auto":
        if named not in (0, 1, 2, 3):
            raise ConfigError(f"{group}.deepspeed: zero_optimization.stage is {named!r}; one of 0, 1, 2, 3 (or auto)")
        if tr_dpo and named != 3:
            raise ConfigError(f"{group}.deepspeed: zero_optimization.stage is {named}, and train.sync_ref_model needs "
                              f"ZeRO-3 (the ranks hold the reference partitioned like the policy)")
        return (named,)
    if tr_dpo or offload_device(ds, "offload_param"):
        return (3,)
    return (1, 2, 3) if offload_device(ds, "offload_optimizer") else (0, 1, 2, 3)


def fitting_stage(cfg: PipelineConfig, settings: TrainingSettings, facts: ModelFacts, tr_dpo: bool,
                  group: str = "train") -> int:
    """The lowest ZeRO stage whose plan fits device.memory_gib; the highest it can run at
    (3, or the JSON's) with the memory unknown, a model not modelled, or none fitting."""
    stages = candidates(settings, tr_dpo, group)
    if len(stages) == 1 or not cfg.device.memory_gib or not facts.modelled:
        return stages[-1]
    overhead = None if settings.use_gpu else CPU_RANK_OVERHEAD
    for z in stages:
        try:
            shape = train_shape(cfg, dataclasses.replace(settings, zero_stage=z), facts)
        except ConfigError:  # an offload this stage cannot take
            continue
        if _peak(train_rank(facts, shape), overhead, settings.use_gpu) <= cfg.device.memory_gib * GiB:
            return z
    return stages[-1]


def resolve(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with every ``zero_stage: auto`` resolved (the config itself when none is)."""
    if cfg.train.zero_stage != AUTO and not (cfg.sft.enabled and cfg.sft.zero_stage == AUTO):
        return cfg
    facts = _facts(cfg)
    train, sft = cfg.train, cfg.sft
    if train.zero_stage == AUTO:
        train = dataclasses.replace(train, zero_stage=fitting_stage(cfg, train, facts, train.sync_ref_model))
    if "zero_stage" in sft.from_train:  # sft follows train's stage, as its workers' config rebuilds it
        sft = dataclasses.replace(sft, zero_stage=train.zero_stage)
    elif sft.zero_stage == AUTO:  # its own auto: its own plan
        sft = dataclasses.replace(sft, zero_stage=fitting_stage(cfg, cfg.sft_training(), facts, False, "sft")
                                  if sft.enabled else 3)
    return dataclasses.replace(cfg, train=train, sft=sft)


def over_memory(cfg: PipelineConfig, outputs: dict, force: bool = False) -> str | None:
    """Why the run would not fit: the plan of each stage to run (``outputs``: the selected
    stages' output directories; one done already is skipped unless ``force``) whose peak
    exceeds device.memory_gib, and the settings to change; None when all fit or the memory
    is unknown."""
    from pipeline.core.rundir import stage_state

    if not cfg.device.memory_gib:
        return None
    stages = {name for name, out in outputs.items() if force or stage_state(out) != "done"}
    plan = make_plan(cfg)
    if not plan.facts.modelled:  # the plan prints "not modelled"; no refusal is made on its dense figures
        return None
    over = [s for s in plan.stages if s.stage in stages
            and _peak(s.memory, s.overhead, s.overhead is None) > memory_limit(cfg, s.stage)]
    if not over:
        return None
    lines = []
    for s in over:
        peak, limit = _peak(s.memory, s.overhead, s.overhead is None), memory_limit(cfg, s.stage)
        fits = [label for label, dev, _ in s.others if dev <= limit]
        change = ([f"{s.stage}.zero_stage / {s.stage}.deepspeed offload ({', '.join(fits)} fit)"] if fits else []) + \
            ([f"tokenize.max_tokens_per_row (at most {s.largest_row} fits)"] if s.largest_row else []) + \
            ([f"{s.stage}.gradient_checkpointing: true"] if _checkpointing_fits(cfg, s.stage, limit) else [])
        what = "an actor" if s.stage == "score" else "a rank"
        share = "" if limit == cfg.device.memory_gib * GiB else f" (its share: {gib(limit)} GiB)"
        lines.append(f"{s.stage}: the plan's peak {what} is {gib(peak)} GiB, over device.memory_gib "
                     f"{cfg.device.memory_gib:g}{share}; change " + (", ".join(change) or "the device (nothing in this config "
                                                                   "fits it: more memory a device, or more ranks)"))
    table = [line for s in over for line in stage_text(s, plan)]
    return "\n".join(lines + ["(or run with --skip-memory-check; docs/plan.md)", ""] + table)


def _checkpointing_fits(cfg: PipelineConfig, stage: str, limit: float) -> bool:
    """Whether turning gradient checkpointing on makes a training stage's plan fit."""
    if stage not in ("train", "sft"):
        return False
    settings = cfg.sft_training() if stage == "sft" else cfg.train
    if settings.gradient_checkpointing:
        return False
    on = dataclasses.replace(settings, gradient_checkpointing=True)
    overhead = None if settings.use_gpu else CPU_RANK_OVERHEAD
    facts = _facts(cfg)
    return _peak(train_rank(facts, train_shape(cfg, on, facts)), overhead, settings.use_gpu) <= limit
