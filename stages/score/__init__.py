"""score: packed rows -> the same rows plus reference log-prob columns.

Each input shard maps to one output shard of the same name, committed whole (a local
file is renamed into place; an object-store PUT is atomic), so a crashed run leaves only
whole shards and the next run scores only the missing ones: a shard counts when its
Parquet footer reads and has the input's row count. The scorer is a callable class (Ray's batch-inference
shape): the reference model is loaded once in ``__init__``, in eval mode with dropout
off, and ``__call__`` scores one shard per call.

Columns added: ``ref_logps`` (float32 per token, aligned with ``input_ids``, 0 outside
completions) and ``ref_seq_logps`` (float32 per segment: the completion's sum), so the
trainer can change the aggregation without re-scoring.

With TR-DPO (``train.sync_ref_model``) only the rows the steps before the first reference
refresh train on, and the eval rows, are scored; the other train rows hold nulls in both
columns, since the train ranks rescore each later segment's rows with the refreshed
reference before its steps (docs/tr-dpo.md). Each train row is then scored once an epoch.
"""

from pipeline.core.config import PipelineConfig
from pipeline.core.rundir import read_manifest
from pipeline.core.stage import RunContext, Stage

from .scorer import SCORE_FIELDS, ShardScorer, iter_rows
from .stage import fingerprint_inputs, rows_to_score, run_in_process, run_on_ray

def _run(ctx: RunContext):
    rows = ctx.dir("tokenize")
    return (run_on_ray if ctx.use_ray else run_in_process)(ctx.cfg, rows, read_manifest(rows), ctx.out, ctx.clock)


def _needed(cfg: PipelineConfig) -> str | None:
    from pipeline.core.config import build_loss

    return None if build_loss(cfg.train).needs_reference else "the loss is reference-free"


STAGE = Stage(
    name="score",
    # with sft, its export is the reference: its fingerprint stands for it
    fingerprint_inputs=lambda cfg, cache, fingerprints: fingerprint_inputs(cfg, cache, fingerprints["tokenize"],
                                                                           sft=fingerprints.get("sft")),
    run=_run,
    needed=_needed,
    reads=lambda cfg, planned: {"tokenize"} | ({"sft"} & planned),
    models=("reference_path",),
    loads={"sft": "reference_path"},
    gpus=lambda cfg: ({"score.num_gpus_per_actor": float(cfg.score.num_gpus_per_actor)}
                      if cfg.score.num_gpus_per_actor > 0 else {}),  # at least one actor's worth
    resumes=True,
    # a partial output keeps its committed shards and scores only the missing ones
    partial=lambda out: {"rows": f"{len(out.glob('*.parquet'))} shards"},
)

__all__ = ["SCORE_FIELDS", "STAGE", "ShardScorer", "iter_rows", "rows_to_score"]
