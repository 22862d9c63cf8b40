"""tokenize: preference data -> quarantine + packed rows in Parquet, split train/eval.
The stage's door; the work is the tokenizing machinery's (pipeline/tokenizing/)."""

from __future__ import annotations

from pipeline.core.rundir import ShardInfo
from pipeline.core.stage import RunContext, Stage
from pipeline.tokenizing.tokenize import fingerprint_inputs, run_in_process, run_on_ray


def _run(ctx: RunContext) -> tuple[list[ShardInfo], dict]:
    return (run_on_ray if ctx.use_ray else run_in_process)(ctx.cfg, ctx.out, clock=ctx.clock)


STAGE = Stage(
    name="tokenize",
    fingerprint_inputs=lambda cfg, cache, fingerprints: fingerprint_inputs(cfg, cache),
    run=_run,
    models=("tokenizer_path",),  # a partial output is cleared (resumes: False): the rows depend on every read unit
)
