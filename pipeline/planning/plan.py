"""``pipeline plan``: a config's per-rank memory and its FLOPs, before launch.

Loads no weights and starts no Ray: the model's config.json, its parameters counted on the
meta device, the settings, and (where the tokenize stage has run) its rows' lengths.
Prints, for each training stage (sft, train) and for score: the per-rank lines with their
formulas (``memory.py``), the totals of the two phases, the fixed overhead, the peak
against ``device.memory_gib``, the same peak under the other ZeRO stages and offloads, the
largest ``tokenize.max_tokens_per_row`` that fits, and the FLOPs of a step and of the run
with the time they take at a stated MFU."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import ConfigError, PipelineConfig, TrainingSettings
from pipeline.core.flops import RowWork, forward_flops, row_work, train_flops

from .memory import GiB, RankMemory, TrainShape, score_actor, train_rank
from .model import ModelFacts, model_facts, read_config

# A CPU rank's memory before its model's: torch, transformers, DeepSpeed and gloo loaded,
# the engine built, two steps taken, on the demo's 140k-parameter model with a 64-token row
# (bench/plan_memory.py: 509 MiB at ZeRO-0, 556 MiB at ZeRO-3, one rank). On a GPU the
# CUDA context and NCCL's workspace come on top and are not modelled.
CPU_RANK_OVERHEAD = 540 * 2**20
NOT_MODELLED = ("CUDA context and NCCL workspace (GPU ranks)", "MoE routing buffers")


@dataclass
class StagePlan:
    stage: str
    memory: RankMemory
    overhead: int | None  # None: a GPU rank's, not modelled
    others: list[tuple[str, int, int]] = field(default_factory=list)  # (setting, device peak, host) per rank
    limit: float | None = None  # the memory one rank or actor has (memory_limit)
    largest_row: int | None = None  # the largest max_tokens_per_row whose peak fits device.memory_gib
    flops_step: int | None = None
    flops_run: int | None = None
    world: int = 1


@dataclass
class Plan:
    facts: ModelFacts
    dtype: str
    memory_gib: float | None
    peak_tflops: float | None
    mfu: float
    stages: list[StagePlan]
    rows_known: bool
    notes: list[str] = field(default_factory=list)


def train_shape(cfg: PipelineConfig, settings: TrainingSettings, facts: ModelFacts, **over) -> TrainShape:
    from cluster.deepspeed_config import build_ds_config, offload_device

    settings = dataclasses.replace(settings, **{k: v for k, v in over.items() if k in ("zero_stage", "deepspeed")})
    ds = build_ds_config(settings, cfg.model.dtype, settings.num_workers, facts.shape.hidden)
    return TrainShape(
        zero_stage=settings.zero_stage, world=settings.num_workers, dtype=cfg.model.dtype,
        tokens=over.get("tokens", cfg.tokenize.max_tokens_per_row), chunk=cfg.model.logp_chunk_tokens,
        gradient_checkpointing=settings.gradient_checkpointing, activation_offloading=settings.activation_offloading,
        optimizer=settings.optimizer,
        lora_params=facts.lora_params(settings.peft) if settings.peft is not None else None,
        offload_optimizer=offload_device(ds, "offload_optimizer") is not None,
        offload_param=offload_device(ds, "offload_param") is not None,
        on_gpu=settings.use_gpu, ds=ds["zero_optimization"], attention=cfg.model.attn_implementation,
        accumulation=settings.gradient_accumulation_steps)


def _peak(memory: RankMemory, overhead: int | None, on_gpu: bool) -> int:
    # a CPU rank's device is its host: offloaded states are the same memory
    return memory.peak(place="device" if on_gpu else None)[0] + (overhead or 0)


def _largest_row(fits) -> int | None:
    """The largest T in [1, 2^22] with fits(T), by bisection (peaks grow with T)."""
    if not fits(1):
        return 0
    lo, hi = 1, 1 << 22
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


OTHER_SETTINGS = (
    ("ZeRO-0", 0, None), ("ZeRO-1", 1, None), ("ZeRO-2", 2, None), ("ZeRO-3", 3, None),
    ("ZeRO-1 + offload_optimizer", 1, ("optimizer",)), ("ZeRO-2 + offload_optimizer", 2, ("optimizer",)),
    ("ZeRO-3 + offload_optimizer", 3, ("optimizer",)), ("ZeRO-3 + offload_optimizer + offload_param", 3,
                                                      ("optimizer", "param")),
)


def training_plan(cfg: PipelineConfig, stage: str, settings: TrainingSettings, facts: ModelFacts) -> StagePlan:
    shape = train_shape(cfg, settings, facts)
    overhead = None if settings.use_gpu else CPU_RANK_OVERHEAD
    plan = StagePlan(stage, train_rank(facts, shape), overhead, world=settings.num_workers,
                     limit=memory_limit(cfg, stage))
    user = settings.deepspeed if isinstance(settings.deepspeed, dict) else {}
    kept = {k: v for k, v in (user.get("zero_optimization") or {}).items()
            if k not in ("offload_optimizer", "offload_param", "stage")}  # each choice sets these itself
    for label, z, offloads in OTHER_SETTINGS:
        zero = dict(kept, **{f"offload_{w}": {"device": "cpu"} for w in offloads or ()})
        try:
            other = train_rank(facts, train_shape(cfg, settings, facts, zero_stage=z,
                                                  deepspeed=dict(user, zero_optimization=zero)))
        except ConfigError:  # a choice these settings cannot take (offload with RMSprop ...)
            continue
        plan.others.append((label, _peak(other, overhead, settings.use_gpu), other.peak(place="host")[0]))
    if cfg.device.memory_gib:
        limit = cfg.device.memory_gib * GiB
        plan.largest_row = _largest_row(lambda t: _peak(train_rank(facts, train_shape(cfg, settings, facts, tokens=t)),
                                                        overhead, settings.use_gpu) <= limit)
    return plan


def memory_limit(cfg: PipelineConfig, stage: str) -> float | None:
    """The memory one rank or actor of ``stage`` has: device.memory_gib, or a score actor's
    share of a GPU it shares (score.num_gpus_per_actor < 1)."""
    if not cfg.device.memory_gib:
        return None
    gpus = cfg.score.num_gpus_per_actor
    return cfg.device.memory_gib * GiB * (gpus if stage == "score" and 0 < gpus < 1 else 1.0)


def score_plan(cfg: PipelineConfig, facts: ModelFacts) -> StagePlan:
    on_gpu = cfg.score.num_gpus_per_actor > 0
    overhead = None if on_gpu else CPU_RANK_OVERHEAD
    T, C = cfg.tokenize.max_tokens_per_row, cfg.model.logp_chunk_tokens
    plan = StagePlan("score", score_actor(facts, cfg.model.dtype, T, C), overhead, world=cfg.score.actors,
                     limit=memory_limit(cfg, "score"))
    if cfg.device.memory_gib:
        limit = memory_limit(cfg, "score")
        plan.largest_row = _largest_row(lambda t: _peak(score_actor(facts, cfg.model.dtype, t, C), overhead, True)
                                        <= limit)
    return plan


def row_works(tokenized: Path | None, cfg: PipelineConfig) -> tuple[list[RowWork], list[RowWork]] | None:
    """The train and eval rows' work, where the tokenize stage's output exists."""
    if tokenized is None:
        return None
    import pyarrow.parquet as pq

    out = []
    for split in ("train", "eval"):
        works = []
        for f in sorted(Path(tokenized).glob(f"{split}-*.parquet")):
            t = pq.read_table(f, columns=["seq_lens", "prompt_lens"])
            works += [row_work(s, p) for s, p in zip(t.column("seq_lens").to_pylist(), t.column("prompt_lens").to_pylist())]
        out.append(works)
    return out[0], out[1]


def full_row(cfg: PipelineConfig) -> RowWork:
    """A row filled to max_tokens_per_row with segments of tokenize.max_length, every token
    scored: the most a row can cost."""
    T, S = cfg.tokenize.max_tokens_per_row, max(1, min(cfg.tokenize.max_length, cfg.tokenize.max_tokens_per_row))
    full, rest = divmod(T, S)
    return RowWork(tokens=T, scored=T, pairs=full * S * (S + 1) // 2 + rest * (rest + 1) // 2)


def add_flops(plan: StagePlan, facts: ModelFacts, cfg: PipelineConfig, settings, rows) -> None:
    frozen = settings is not None and settings.peft is not None
    cost = (lambda w: train_flops(facts.shape, w, frozen)) if settings is not None else \
        (lambda w: forward_flops(facts.shape, w))
    per_step_rows = plan.world * settings.gradient_accumulation_steps if settings is not None else 1
    plan.flops_step = per_step_rows * cost(full_row(cfg))
    if rows is not None:
        train, evals = rows
        if settings is None:  # score: every row once
            plan.flops_run = sum(cost(w) for w in train + evals)
        else:
            import math

            steps_per_epoch = math.ceil(len(train) / per_step_rows) if train else 0
            epochs = settings.max_steps / max(steps_per_epoch, 1) if settings.max_steps > 0 else settings.num_train_epochs
            plan.flops_run = int(epochs * sum(cost(w) for w in train))


def make_plan(cfg: PipelineConfig, done: dict[str, Path] | None = None, mfu: float = 0.4) -> Plan:
    """``done``: the local output directories of the stages already done; the tokenize
    stage's rows give the run's FLOPs. ``zero_stage: auto`` is resolved here, and said."""
    from .auto import resolve

    given, cfg = cfg, resolve(cfg)
    notes = [f"{group}.zero_stage: auto -> {getattr(cfg, group).zero_stage} (docs/plan.md: the lowest ZeRO stage whose "
             f"plan fits device.memory_gib, or the one its DeepSpeed JSON names; sft follows train's unless it "
             f"sets its own)"
             for group in ("train", "sft") if getattr(given, group).zero_stage == "auto"
             and (group == "train" or cfg.sft.enabled)]
    facts = model_facts(read_config(cfg.model.path, cfg.model), cfg.model.trust_remote_code)
    rows = row_works((done or {}).get("tokenize"), cfg)
    stages = []
    if cfg.sft.enabled:
        settings = cfg.sft_training()
        stages.append(training_plan(cfg, "sft", settings, facts))
        add_flops(stages[-1], facts, cfg, settings, None)  # its rows are its own, made when it runs
    from pipeline.core.config import build_loss

    if build_loss(cfg.train).needs_reference:
        ref = facts if cfg.model.reference_path is None or cfg.sft.enabled else \
            model_facts(read_config(cfg.model.reference_path, cfg.model, "model.reference_path"), cfg.model.trust_remote_code)
        stages.append(score_plan(cfg, ref))
        add_flops(stages[-1], ref, cfg, None, rows)
        if cfg.train.sync_ref_model:
            notes.append("TR-DPO: score scores the eval rows and the first segment's; the ranks score the rest with "
                         "the refreshed reference (a forward a row, once an epoch), counted in neither stage's FLOPs")
    stages.append(training_plan(cfg, "train", cfg.train, facts))
    add_flops(stages[-1], facts, cfg, cfg.train, rows)
    return Plan(facts, cfg.model.dtype, cfg.device.memory_gib, cfg.device.peak_tflops, mfu, stages, rows is not None,
                notes)
