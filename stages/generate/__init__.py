"""generate: after train, the trained policy and the reference answer the same prompts,
side by side, judged by a reward model where one is given (docs/generate.md).

Rooms: ``prompts`` (the eval split's prompts, or a file's), ``engines`` (HF generate, vLLM),
``judge`` (a reward model, win rates and Wilson intervals), ``stage`` (the actors, shards,
resume and stats), ``report`` (its section of report.md); the door is ``STAGE``."""

from pipeline.core.config import PipelineConfig
from pipeline.core.stage import RunContext, Stage

from .report import section
from .stage import fingerprint_inputs, preflight, run, summary_lines


def _run(ctx: RunContext):
    return run(ctx.cfg, ctx.dir("tokenize"), ctx.out, ctx.use_ray, ctx.clock)


def _needed(cfg: PipelineConfig) -> str | None:
    return None if cfg.generate.enabled else "generate.enabled is false"


STAGE = Stage(
    name="generate",
    fingerprint_inputs=fingerprint_inputs,
    run=_run,
    needed=_needed,
    optional=True,
    reads=lambda cfg, planned: {"tokenize", "train"},
    models=("path", "reference_path", "tokenizer_path", "reward_model"),  # the manifest records each pinned
    loads={"train": "path"},  # the trained policy; the reference stays what score scored with
    resumes=True,  # committed shards are kept, the missing ones generated
    gpus=lambda cfg: ({"generate.num_gpus_per_actor": float(cfg.generate.num_gpus_per_actor)}
                      if cfg.generate.num_gpus_per_actor > 0 else {}),
    preflight=preflight,
    summary=summary_lines,
    partial=lambda out: {"rows": f"{len(out.glob('samples-*.parquet'))} shards"},
    report=section,
)

__all__ = ["STAGE"]
