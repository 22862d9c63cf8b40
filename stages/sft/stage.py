"""The sft stage: the reference the DPO paper asks for when no SFT model exists,
pi_ref = argmax_pi E_(x, y_w) [log pi(y_w | x)], trained from ``model.path`` on the
preference pairs' prompts and chosen completions.

It runs between tokenize and score (``sft.enabled``). Its rows are the tokenize output
repacked with the chosen segments alone (no rejected segment is computed), in the same
token budget and by the same first-fit-decreasing packing. Training is the shared training
machinery's (``pipeline/training/``: the loop, engine, checkpoints, metrics and export) with
another objective
(``stages.sft.objective.SFTObjective``) and the ``sft`` group's settings. Its export (the
merged model with LoRA) is the reference ``score`` uses and the policy ``train`` starts
from (``pipeline.runner`` hands it on).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import packing
from pipeline.core.config import (DataConfig, PipelineConfig, RowSource, SFTDataConfig, for_workers,
                                  resume_location)
from pipeline.core.models import local_dir
from pipeline.core.phases import WORK, PhaseClock
from pipeline.core.rows import ROW_GROUP_ROWS, assemble_sequences, sequence_table, split_files
from pipeline.core.rundir import HashCache, ShardInfo, hash_checkpoint
from pipeline.core.sft_formats import SequenceRows
from pipeline.core.stage import Stage
from pipeline.core.storage import Loc
from pipeline.tokenizing import tokenize
from pipeline.training.export import EXPORT_DIR, merge_adapter
from pipeline.training.export import export_digest as digest_of_export
from pipeline.training.launch import (LOOP_VERSION, NO_EVAL, check_before_run, check_global_batch, launch, mark_phases,
                                      model_settings, summarize, training_settings)
from pipeline.training.loop import WorkerSpec
from pipeline.training.metrics import METRICS_FILE, read_metrics

from .objective import SFTObjective

STAGE_VERSION = 1
SPLITS = ("train", "eval")


def fingerprint_inputs(cfg: PipelineConfig, cache: HashCache, upstream: str) -> dict:
    """The tokenize output it repacks (or, with data of its own, what tokenizing that data
    depends on), the base model's files, the numerics and the sft settings that change what
    it trains; score and train fingerprint this one's in turn."""
    own = own_data(cfg)
    return {
        "version": STAGE_VERSION,
        "upstream": upstream if own is None else None,
        "data": cfg.sft.data if own is None else {"tokenize": tokenize.fingerprint_inputs(own[0], cache),
                                                  "rows": asdict(own[1])},
        "base_model": hash_checkpoint(local_dir(cfg.model.path, cfg.model), "model", cache),
        "model_settings": model_settings(cfg),
        "train_settings": training_settings(cfg.sft_training()),
        "loop_version": LOOP_VERSION,  # the training loop it shares with train
    }


def export_dir(cfg: PipelineConfig, out: Loc) -> Loc:
    """The model score and train load: the consolidated weights, or with LoRA the base model
    with the adapter merged (a reference must be a plain model)."""
    export = Loc(out) / EXPORT_DIR
    return export / "merged" if cfg.sft.peft is not None else export


def own_data(cfg: PipelineConfig) -> tuple[PipelineConfig, SequenceRows] | None:
    """With ``sft.data`` a dataset of its own: the config the tokenize stage's code reads it
    with (``data`` replaced by it) and how its rows become sequences; None for ``chosen``."""
    d = cfg.sft.data
    if not isinstance(d, SFTDataConfig):
        return None
    data = DataConfig(**{f.name: getattr(d, f.name) for f in fields(RowSource)})  # the source keys; pair columns unused
    return replace(cfg, data=data), SequenceRows(d.messages_key, d.prompt_key, d.completion_key)


def export_digest(cfg: PipelineConfig, out: Loc) -> str:
    """Which SFT model score and train loaded (``pipeline.training.export.export_digest``)."""
    return digest_of_export(out, export_dir(cfg, out))


# ----------------------------------------------------------------------------- rows


def chosen_segments(files: list[Loc]) -> pa.Table:
    """Every pair's chosen segment in the tokenized rows of ``files``, in row order:
    ``pair_id``, its tokens ``ids`` (prompt + completion: a chosen segment always stores its
    prompt, shared or not), ``prompt_len`` and ``length``. Arrow and numpy, no Python object
    per token."""
    parts = []
    for f in files:
        t = pq.read_table(Loc(f).open_input(), columns=["input_ids", "seq_lens", "prompt_lens", "pair_ids"])
        seq = pc.list_flatten(t["seq_lens"]).to_numpy().astype(np.int64)
        prompt = pc.list_flatten(t["prompt_lens"]).to_numpy().astype(np.int64)
        per_row = pc.list_value_length(t["seq_lens"]).to_numpy().astype(np.int64)
        in_row = np.arange(len(seq)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        chosen = in_row % 2 == 0  # segments go chosen, rejected, chosen, ...
        starts = (np.cumsum(seq) - seq)[chosen]  # in the shard's tokens, row after row
        lengths = seq[chosen]
        take = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths) \
            + np.repeat(starts, lengths)
        values = pc.list_flatten(t["input_ids"]).combine_chunks().take(pa.array(take))
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32())
        # large_list: a split's sequences together may hold more than 2^31 tokens
        ids = pa.ListArray.from_arrays(offsets, values).cast(pa.large_list(pa.int32()))
        parts.append(sequence_table(pc.list_flatten(t["pair_ids"]), ids, pa.array(prompt[chosen], pa.int32())))
    if not parts:
        return sequence_table(pa.array([], pa.string()), pa.array([], pa.large_list(pa.int32())),
                              pa.array([], pa.int32()))
    # one chunk: a take from a table of several copies all of it each time (pyarrow 26)
    return pa.concat_tables(parts).combine_chunks()


def first_of_each(segments: pa.Table) -> np.ndarray:
    """The index of the first of each distinct sequence (tokens and prompt length): a row
    with several rejected completions gives as many pairs with one chosen completion, which
    SFT trains on once. Each sequence's tokens are grouped as one binary value."""
    n = segments.num_rows
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = segments.column("length").to_numpy().astype(np.int64)
    flat = pc.list_flatten(segments.column("ids")).to_numpy().astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths) * 4]).astype(np.int64)
    keys = pa.LargeBinaryArray.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets.tobytes()),
                                                                   pa.py_buffer(flat.tobytes())])
    table = pa.table({"key": keys, "prompt_len": segments.column("prompt_len"), "index": np.arange(n)})
    first = table.group_by(["key", "prompt_len"], use_threads=False).aggregate([("index", "min")])
    return np.sort(first.column("index_min").to_numpy())


def write_chosen_rows(cfg: PipelineConfig, tokenized_dir: Loc, out: Loc) -> tuple[list[ShardInfo], dict]:
    """``<split>-NNNNN.parquet`` in ``out``: each split's chosen segments packed alone into
    ``tokenize.max_tokens_per_row`` rows, shuffled with ``data.seed`` as tokenize's are; a
    chosen completion that several pairs share (one row, several rejected completions) once.
    Holds one split's chosen tokens at a time (4 bytes a token, about twice that while its
    repeats are found)."""
    capacity, per_shard, seed = cfg.tokenize.max_tokens_per_row, cfg.tokenize.rows_per_shard, cfg.data.seed
    shards, stats, row_id = [], {}, 0
    for split in SPLITS:
        segments = chosen_segments(split_files(tokenized_dir, split))
        kept = first_of_each(segments)
        repeated = segments.num_rows - len(kept)
        segments = segments.take(pa.array(kept)).combine_chunks()
        lengths = segments.column("length").to_numpy().astype(np.int64)
        bins = packing.shuffled(packing.first_fit_decreasing(lengths, capacity), seed)
        for k, start in enumerate(range(0, len(bins), per_shard)):
            rows = assemble_sequences(segments, bins[start:start + per_shard], row_id + start)
            path = Loc(out) / f"{split}-{k:05d}.parquet"
            path.write_parquet(rows, row_group_size=ROW_GROUP_ROWS)
            shards.append(ShardInfo.of(path, rows.num_rows, base=Loc(out)))
        row_id += len(bins)
        tokens = int(lengths.sum())
        stats[split] = {"sequences": len(lengths), "repeated_chosen": repeated, "rows": len(bins), "tokens": tokens,
                        "completion_tokens": tokens - int(segments.column("prompt_len").to_numpy().sum()),
                        "waste_fraction": round(1 - tokens / (len(bins) * capacity), 6) if bins else 0.0}
    if not stats["train"]["rows"]:
        raise ValueError(f"sft: no training rows in {tokenized_dir}")
    return shards, stats


def tokenize_own(data_cfg: PipelineConfig, rows: SequenceRows, out: Loc, use_ray: bool) -> tuple[list, dict]:
    """The sft stage's own data, read, tokenised (as the pairs' chosen sides are),
    quarantined, split and packed by the tokenize stage's code into ``out``."""
    try:
        shards, stats = (tokenize.run_on_ray if use_ray else tokenize.run_in_process)(data_cfg, out, rows)
    except ValueError as e:  # tokenize's refusals (too many bad rows, nothing left) are about sft.data here
        text = str(e)
        if not text.startswith("tokenize: "):
            raise
        # the same error (a DataError ends the run in one line), said of sft.data's rows
        what, see, where = text[len("tokenize: "):].partition(" see ")  # the path after it stays as it is
        said = re.sub(r"\bpairs\b", "rows", what) + see + where.replace("data.eval_fraction", "sft.data.eval_fraction")
        raise type(e)("sft.data: " + said) from None
    for split in SPLITS:  # the counts of write_chosen_rows's stats
        stats[split] = {"sequences": stats[split].pop("pairs"), **stats[split]}
    return shards, stats


# ----------------------------------------------------------------------------- the stage


def run(cfg: PipelineConfig, tokenized_dir: Loc, out: Loc, info: dict, use_ray: bool, clock: PhaseClock | None = None):
    """Repack, train ``sft.num_workers`` ranks (one in this process without Ray), export;
    returns the shards the manifest commits (rows, metrics, the exported model) and the
    stats (the training summary, the packing and the eval split's mean chosen log-prob per
    completion token under the base model and under the SFT model). ``clock``: its phases,
    as its rank 0 recorded them (the rows written before the ranks start count as start-up)."""
    from pipeline.core.tracking import forwarded_env

    out = Loc(out)
    check_global_batch(out, info)  # before the rows: a refused run costs nothing
    own = own_data(cfg)
    if own is None:
        row_shards, row_stats = write_chosen_rows(cfg, tokenized_dir, out)
    else:  # the tokenize stage's code on the sft rows: quarantine.parquet and one-segment rows, here
        row_shards, row_stats = tokenize_own(*own, out, use_ray)
    train_cfg = cfg.sft_training()
    train_cfg = replace(train_cfg, resume_from_checkpoint=resume_location(train_cfg.resume_from_checkpoint))
    export_info = {k: v for k, v in info.items() if k not in ("inputs", "force")}
    spec = WorkerSpec(for_workers(cfg), SFTObjective(cfg.model.logp_chunk_tokens, train_cfg.router_aux_loss_coef),
                      str(out), str(out), export_info, on_ray=use_ray,
                      env=forwarded_env(train_cfg.report_to, os.environ), stage="sft", train_cfg=train_cfg)
    launch(spec, train_cfg, out)
    if clock is not None:
        mark_phases(clock, out)
    if train_cfg.peft is not None:
        merge_adapter(cfg, out)
        if clock is not None:
            clock.end(WORK)  # the merge is work
    files = [out / METRICS_FILE] + (out / EXPORT_DIR).files()
    summary = summarize(out)
    first = next((r for r in read_metrics(out) if r.get("step") == 0 and "eval_loss" in r), None)
    evals = first and first["eval_loss"], summary["final_eval"].get("eval_loss")  # step 0: the base model
    stats = dict(summary, export=str(export_dir(cfg, out)), packing=row_stats,
                 # the eval loss is the mean NLL per completion token: its negative is the mean log-prob
                 eval_chosen_logp_per_token={"base": None if evals[0] is None else -evals[0],
                                             "sft": None if evals[1] is None else -evals[1]})
    return row_shards + [ShardInfo.of(f, 0, base=out) for f in files], stats


# ----------------------------------------------------------------------------- the stage's door


def chosen_logps(logp: dict) -> str:
    """The eval split's mean chosen log-prob per token, under the base model (its eval at
    step 0; none with sft.eval_on_start false) and under the SFT model."""
    base = (f"{logp['base']:.4f} under the base model, " if logp["base"] is not None
            else "(no eval before the first step: sft.eval_on_start false) ")
    return f"{base}{logp['sft']:.4f} under the SFT model"


def summary_lines(stats: dict) -> list[str]:
    logp = stats["eval_chosen_logp_per_token"]
    evaluated = f"eval split's mean chosen log-prob per token {chosen_logps(logp)}" if logp["sft"] is not None else NO_EVAL
    return [f"sft: {stats['steps']} steps, loss {stats['step0_loss']:.4f} -> {stats['final_loss']:.4f}, {evaluated}",
            f"SFT model (the reference and the policy's start): {stats['export']}"]


STAGE = Stage(
    name="sft",
    fingerprint_inputs=lambda cfg, cache, fingerprints: fingerprint_inputs(cfg, cache, fingerprints["tokenize"]),
    run=lambda ctx: run(ctx.cfg, ctx.dir("tokenize"), ctx.out, ctx.info("tokenize"), ctx.use_ray, ctx.clock),
    needed=lambda cfg: None if cfg.sft.enabled else "sft.enabled is false (the reference is model.reference_path or "
                                                     "model.path)",
    optional=True,
    # with data of its own it reads no tokenize output (--stages sft needs none)
    reads=lambda cfg, planned: {"tokenize"} if cfg.sft.data == "chosen" else set(),
    models=("path", "tokenizer_path"),
    resumes=True,  # from its newest complete checkpoint
    export=lambda cfg, out: (export_dir(cfg, out), export_digest(cfg, out)),
    makes="an SFT model",
    hands_on=("path", "reference_path"),  # the reference score loads and the policy train starts from
    gpus=lambda cfg: {"sft.use_gpu": float(cfg.sft.num_workers)} if cfg.sft.use_gpu else {},
    preflight=lambda cfg, use_ray: check_before_run(cfg.sft_training(), cfg, "sft", use_ray),
    summary=summary_lines,
)
