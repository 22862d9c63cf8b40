"""The sft stage: the reference the DPO paper asks for when no SFT model exists,
pi_ref = argmax_pi E_(x, y_w) [log pi(y_w | x)], trained from ``model.path`` on the
preference pairs' prompts and chosen completions.

It runs between tokenize and score (``sft.enabled``). Its rows are the tokenize output
repacked with the chosen segments alone (no rejected segment is computed), in the same
token budget and by the same first-fit-decreasing packing. Training is the train stage's
loop, engine, checkpoints, metrics and export with another objective
(``stages.train.sft.SFTObjective``) and the ``sft`` group's settings. Its export (the
merged model with LoRA) is the reference ``score`` uses and the policy ``train`` starts
from (``pipeline.runner`` hands it on).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import packing
from pipeline.config import SFT_TRAINING_KEYS, PipelineConfig, for_workers
from pipeline.models import local_dir
from pipeline.rundir import HashCache, ShardInfo, hash_checkpoint
from pipeline.storage import Loc
from stages.tokenize import ROW_GROUP_ROWS, ROW_SCHEMA
from stages.train.driver import check_global_batch, launch, model_settings, summarize, training_settings
from stages.train.export import EXPORT_DIR, merge_adapter
from stages.train.loop import WorkerSpec
from stages.train.metrics import METRICS_FILE
from stages.train.rows import split_files
from stages.train.sft import SFTObjective

STAGE_VERSION = 1
SPLITS = ("train", "eval")


def fingerprint_inputs(cfg: PipelineConfig, cache: HashCache, upstream: str) -> dict:
    """The tokenize output it repacks, the base model's files, the numerics and the sft
    settings that change what it trains; score and train fingerprint this one's in turn."""
    return {
        "version": STAGE_VERSION,
        "upstream": upstream,
        "data": cfg.sft.data,
        "base_model": hash_checkpoint(local_dir(cfg.model.path, cfg.model), "model", cache),
        "model_settings": model_settings(cfg),
        "train_settings": training_settings(cfg.sft_training(), SFT_TRAINING_KEYS),
    }


def export_dir(cfg: PipelineConfig, out: Loc) -> Loc:
    """The model score and train load: the consolidated weights, or with LoRA the base model
    with the adapter merged (a reference must be a plain model)."""
    export = Loc(out) / EXPORT_DIR
    return export / "merged" if cfg.sft.peft is not None else export


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
        parts.append(pa.table({
            "pair_id": pc.list_flatten(t["pair_ids"]).combine_chunks(),
            "ids": pa.ListArray.from_arrays(offsets, values),
            "prompt_len": pa.array(prompt[chosen], pa.int32()),
            "length": pa.array(lengths, pa.int32()),
        }))
    return pa.concat_tables(parts) if parts else pa.table({
        "pair_id": pa.array([], pa.string()), "ids": pa.array([], pa.list_(pa.int32())),
        "prompt_len": pa.array([], pa.int32()), "length": pa.array([], pa.int32())})


def assemble_sequences(segments: pa.Table, bins: list[list[int]], first_row_id: int) -> pa.Table:
    """Packed rows (the tokenize schema) of one segment per sequence: ``bins`` index
    ``segments``; positions restart at 0 for each."""
    if not bins:
        return ROW_SCHEMA.empty_table()
    members = pa.array(np.concatenate([np.asarray(b, dtype=np.int64) for b in bins]))
    per_row = np.array([len(b) for b in bins], dtype=np.int64)
    chosen = segments.take(members)
    lengths = chosen.column("length").to_numpy().astype(np.int64)
    positions = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    seg_offsets = np.concatenate([[0], np.cumsum(per_row)])
    row_tokens = np.add.reduceat(lengths, seg_offsets[:-1])
    tok_offsets = pa.array(np.concatenate([[0], np.cumsum(row_tokens)]), pa.int32())
    seg_offsets = pa.array(seg_offsets, pa.int32())
    return pa.table({
        "row_id": pa.array(np.arange(first_row_id, first_row_id + len(bins)), pa.int64()),
        "input_ids": pa.ListArray.from_arrays(tok_offsets, pc.list_flatten(chosen.column("ids")).combine_chunks()),
        "position_ids": pa.ListArray.from_arrays(tok_offsets, pa.array(positions, pa.int32())),
        "seq_lens": pa.ListArray.from_arrays(seg_offsets, pa.array(lengths, pa.int32())),
        "prompt_lens": pa.ListArray.from_arrays(seg_offsets, chosen.column("prompt_len").combine_chunks()),
        "pair_ids": pa.ListArray.from_arrays(seg_offsets, chosen.column("pair_id").combine_chunks()),
        "num_tokens": pa.array(row_tokens, pa.int32()),
    }, schema=ROW_SCHEMA)


def write_chosen_rows(cfg: PipelineConfig, tokenized_dir: Loc, out: Loc) -> tuple[list[ShardInfo], dict]:
    """``<split>-NNNNN.parquet`` in ``out``: each split's chosen segments packed alone into
    ``tokenize.max_tokens_per_row`` rows, shuffled with ``data.seed`` as tokenize's are.
    Holds one split's chosen tokens at a time (4 bytes a token)."""
    capacity, per_shard, seed = cfg.tokenize.max_tokens_per_row, cfg.tokenize.rows_per_shard, cfg.data.seed
    shards, stats, row_id = [], {}, 0
    for split in SPLITS:
        segments = chosen_segments(split_files(tokenized_dir, split))
        lengths = segments.column("length").to_numpy().astype(np.int64)
        bins = packing.shuffled(packing.first_fit_decreasing(lengths, capacity), seed)
        for k, start in enumerate(range(0, len(bins), per_shard)):
            rows = assemble_sequences(segments, bins[start:start + per_shard], row_id + start)
            path = Loc(out) / f"{split}-{k:05d}.parquet"
            path.write_parquet(rows, row_group_size=ROW_GROUP_ROWS)
            shards.append(ShardInfo.of(path, rows.num_rows, base=Loc(out)))
        row_id += len(bins)
        tokens = int(lengths.sum())
        stats[split] = {"sequences": len(lengths), "rows": len(bins), "tokens": tokens,
                        "completion_tokens": tokens - int(segments.column("prompt_len").to_numpy().sum()),
                        "waste_fraction": round(1 - tokens / (len(bins) * capacity), 6) if bins else 0.0}
    if not stats["train"]["rows"]:
        raise ValueError(f"sft: no training rows in {tokenized_dir}")
    return shards, stats


# ----------------------------------------------------------------------------- the stage


def run(cfg: PipelineConfig, tokenized_dir: Loc, out: Loc, info: dict, use_ray: bool):
    """Repack, train ``sft.num_workers`` ranks (one in this process without Ray), export;
    returns the shards the manifest commits (rows, metrics, the exported model) and the
    stats (the training summary, the packing and the eval split's mean chosen log-prob per
    completion token under the base model and under the SFT model)."""
    from pipeline.tracking import forwarded_env

    out = Loc(out)
    row_shards, row_stats = write_chosen_rows(cfg, tokenized_dir, out)
    train_cfg = cfg.sft_training()
    check_global_batch(out, info)
    export_info = {k: v for k, v in info.items() if k not in ("inputs", "force")}
    spec = WorkerSpec(for_workers(cfg), SFTObjective(cfg.model.logp_chunk_tokens, train_cfg.router_aux_loss_coef),
                      str(out), str(out), export_info, ray_train=use_ray,
                      env=forwarded_env(train_cfg.report_to, os.environ), stage="sft", train_cfg=train_cfg)
    launch(spec, train_cfg, out)
    if train_cfg.peft is not None:
        merge_adapter(cfg, out)
    files = [out / METRICS_FILE] + (out / EXPORT_DIR).files()
    summary = summarize(out)
    evals = summary["eval_step0_loss"], summary["final_eval"].get("eval_loss")
    stats = dict(summary, export=str(export_dir(cfg, out)), packing=row_stats,
                 # the eval loss is the mean NLL per completion token: its negative is the mean log-prob
                 eval_chosen_logp_per_token={"base": None if evals[0] is None else -evals[0],
                                             "sft": None if evals[1] is None else -evals[1]})
    return row_shards + [ShardInfo.of(f, 0, base=out) for f in files], stats
