"""tokenize: preference data -> quarantine + packed rows in Parquet, split train/eval.

Core functions work on plain files and tables and run without Ray:

* ``pipeline.sources.plan_chunks``: the inputs cut into read units with source row indices;
* ``TokenizeChunk``: read a unit, normalise and tokenise every row (bad rows are returned
  with a quarantine reason, never dropped);
* ``pack_and_write``: on the driver, the dataset-wide checks (one format per dataset,
  duplicates), the split by prompt, packing into rows of ``max_tokens_per_row``
  (first-fit-decreasing over the (pair, length) table), a seeded row shuffle, the shards.

``run`` places ``TokenizeChunk`` on a Ray Data actor pool; ``run_local`` runs the same
code in-process.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import formats, packing, sources
from pipeline.config import PipelineConfig, shares_prompt
from pipeline.rundir import HashCache, ShardInfo, hash_checkpoint, hash_tree
from pipeline.storage import Loc

STAGE_VERSION = 3  # 3: rows may share prompts
ROW_GROUP_ROWS = 16  # small row groups: the trainer reads rows at random

PAIR_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row_index", pa.int64()),
        ("expansion", pa.int32()),  # which rejected completion of the row
        ("format", pa.string()),
        ("pair_id", pa.string()),
        ("content_key", pa.string()),  # hash of the tokens only: equal for duplicates
        ("prompt_key", pa.binary()),
        ("chosen_ids", pa.list_(pa.int32())),
        ("chosen_prompt_len", pa.int32()),
        ("rejected_ids", pa.list_(pa.int32())),
        ("rejected_prompt_len", pa.int32()),
        ("truncated", pa.bool_()),
        ("prefix_mismatch", pa.bool_()),
        ("reason", pa.string()),  # null for a good pair
        ("detail", pa.string()),
        ("raw", pa.string()),  # the input row as JSON, kept for quarantined rows only
    ]
)

ROW_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("seq_lens", pa.list_(pa.int32())),  # segments: chosen, rejected, chosen, ...
        ("prompt_lens", pa.list_(pa.int32())),
        ("pair_ids", pa.list_(pa.string())),  # one per pair, in segment order
        ("num_tokens", pa.int32()),
    ]
)

QUARANTINE_COLUMNS = ["source", "row_index", "expansion", "reason", "detail", "raw"]
TOKEN_COLUMNS = ["chosen_ids", "rejected_ids"]


# ----------------------------------------------------------------------------- tokenising


def load_tokenizer(cfg: PipelineConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.tokenize.chat_template:
        tokenizer.chat_template = Path(cfg.tokenize.chat_template).read_text()
    return tokenizer


class TokenizeChunk:
    """Callable over a batch of read units; loads the tokenizer once (per Ray actor)."""

    def __init__(self, cfg_dict: dict):
        from pipeline.config import config_from_dict

        self.cfg = config_from_dict(cfg_dict)
        self.tokenizer = load_tokenizer(self.cfg)

    def __call__(self, batch: pa.Table | dict) -> pa.Table:
        chunks = batch.to_pylist() if isinstance(batch, pa.Table) else [
            dict(zip(batch, vals)) for vals in zip(*batch.values())
        ]
        records = [rec for chunk in chunks for rec in self.tokenize_chunk(chunk)]
        return pa.Table.from_pylist(records, schema=PAIR_SCHEMA)

    def tokenize_chunk(self, chunk: dict) -> list[dict]:
        d, t = self.cfg.data, self.cfg.tokenize
        records = []
        for index, row, text in sources.read_chunk(chunk):
            base = dict(source=chunk["label"], row_index=int(index), expansion=0)
            raw = text if text is not None else json.dumps(row, default=str, ensure_ascii=False)
            try:
                if row is None:
                    raise formats.BadRow("invalid_json", "not a JSON object")
                pairs = formats.normalize(row, d.prompt_key, d.chosen_key, d.rejected_key)
            except formats.BadRow as bad:
                records.append(dict(base, reason=bad.reason, detail=bad.detail, raw=raw))
                continue
            for pair in pairs:
                rec = dict(base, expansion=pair.expansion, format=pair.format)
                try:
                    tp = formats.tokenize_pair(
                        pair, self.tokenizer, max_length=t.max_length, max_prompt_length=t.max_prompt_length,
                        truncation_mode=t.truncation_mode, strict=t.strict,
                        max_completion_length=t.max_completion_length)
                except formats.BadRow as bad:
                    records.append(dict(rec, reason=bad.reason, detail=bad.detail, raw=raw))
                    continue
                records.append(dict(
                    rec,
                    pair_id=formats.pair_id(tp, rec["source"], index, pair.expansion),
                    content_key=formats.content_key(tp),
                    prompt_key=formats.prompt_key(tp),
                    chosen_ids=tp.chosen.input_ids,
                    chosen_prompt_len=tp.chosen.prompt_len,
                    rejected_ids=tp.rejected.input_ids,
                    rejected_prompt_len=tp.rejected.prompt_len,
                    truncated=tp.truncated,
                    prefix_mismatch=tp.prefix_mismatch,
                ))
        return records


# ----------------------------------------------------------------------------- dataset checks


def dataset_checks(records: pa.Table, cfg: PipelineConfig) -> tuple[pa.Table, dict]:
    """Quarantine what only the whole dataset reveals: rows whose format is not the
    dataset's, and (with ``data.duplicates: drop``) repeated pairs. ``records`` is sorted."""
    good = records.column("reason").is_null().to_pylist()
    fmts = records.column("format").to_pylist()
    counts = Counter(f for f, ok in zip(fmts, good) if ok)
    dataset_format = counts.most_common(1)[0][0] if counts else None
    reasons = records.column("reason").to_pylist()
    details = records.column("detail").to_pylist()
    for i, (fmt, ok) in enumerate(zip(fmts, good)):
        if ok and fmt != dataset_format:
            explicit = not dataset_format.startswith("implicit")
            reasons[i] = "missing_field" if explicit and fmt.startswith("implicit") else "mixed_formats"
            details[i] = (f"{cfg.data.prompt_key} (the dataset is {dataset_format})" if reasons[i] == "missing_field"
                          else f"the dataset is {dataset_format}, this row is {fmt}")
            good[i] = False
    first_seen: dict[str, int] = {}
    duplicates = 0
    sources_ = records.column("source").to_pylist()
    rows_ = records.column("row_index").to_pylist()
    for i, key in enumerate(records.column("content_key").to_pylist()):
        if not good[i]:
            continue
        if key in first_seen:
            duplicates += 1
            if cfg.data.duplicates == "drop":
                j = first_seen[key]
                reasons[i], details[i] = "duplicate", f"same tokens as {sources_[j]} row {rows_[j]}"
        else:
            first_seen[key] = i
    records = records.set_column(records.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
    records = records.set_column(records.schema.get_field_index("detail"), "detail", pa.array(details, pa.string()))
    return records, {"format": dataset_format, "formats_seen": dict(sorted(counts.items())),
                     "duplicate_pairs": duplicates, "duplicates": cfg.data.duplicates}


def fill_raw(quarantine: pa.Table, chunks: list[dict]) -> pa.Table:
    """The raw rows of entries quarantined on the driver (workers keep raw only for the
    rows they reject), read back from their sources."""
    missing = {(s, r) for s, r, raw in zip(quarantine.column("source").to_pylist(),
                                           quarantine.column("row_index").to_pylist(),
                                           quarantine.column("raw").to_pylist()) if raw is None}
    if not missing:
        return quarantine
    found = {}
    for chunk in chunks:
        if not any(s == chunk["label"] for s, _ in missing):
            continue
        for index, row, text in sources.read_chunk(chunk):
            if (chunk["label"], index) in missing:
                found[(chunk["label"], index)] = text if text is not None else json.dumps(row, default=str)
    raws = [raw if raw is not None else found.get((s, r)) for s, r, raw in zip(
        quarantine.column("source").to_pylist(), quarantine.column("row_index").to_pylist(),
        quarantine.column("raw").to_pylist())]
    return quarantine.set_column(quarantine.schema.get_field_index("raw"), "raw", pa.array(raws, pa.string()))


# ----------------------------------------------------------------------------- packing


def assemble_rows(pairs: pa.Table, tokens: pa.Table, token_rows: np.ndarray, bins: list[list[int]],
                  first_row_id: int, share_prompt: bool = False) -> pa.Table:
    """Concatenate each bin's pairs (chosen, rejected, chosen, ...) into one packed row.

    ``bins`` index ``pairs`` (the per-pair columns); pair i's token lists are row
    ``token_rows[i]`` of ``tokens``. With ``share_prompt`` a rejected segment keeps only its
    completion (prompt_len 0, positions continuing from the prompt's length): its prompt
    is the chosen segment's (``pipeline.logps.segment_layout``). Arrow and numpy
    throughout, never a Python object per token; called one shard of rows at a time, so
    the int32 list offsets stay small and so does the memory it takes.
    """
    if not bins:
        return ROW_SCHEMA.empty_table()
    members = np.concatenate([np.asarray(b, dtype=np.int64) for b in bins])
    pairs_per_row = np.array([len(b) for b in bins], dtype=np.int64)
    take = pa.array(members)
    token_take = pa.array(token_rows[members])
    m = len(members)
    order = pa.array(np.stack([np.arange(m), np.arange(m) + m], axis=1).ravel())  # c0, r0, c1, r1, ...
    segments = pa.concat_arrays([tokens.column("chosen_ids").take(token_take).combine_chunks(),
                                 tokens.column("rejected_ids").take(token_take).combine_chunks()]).take(order)
    prompt_lens = pa.concat_arrays([pairs.column("chosen_prompt_len").take(take).combine_chunks(),
                                    pairs.column("rejected_prompt_len").take(take).combine_chunks()]).take(order)
    prompt_lens = prompt_lens.to_numpy().astype(np.int64)
    full_lens = pc.list_value_length(segments).to_numpy().astype(np.int64)
    values = pc.list_flatten(segments)
    skip = np.zeros_like(full_lens)  # leading tokens a segment does not store
    if share_prompt:
        skip[1::2] = prompt_lens[1::2]
        prompt_lens[1::2] = 0
    seq_lens = full_lens - skip
    seg_starts = np.cumsum(seq_lens) - seq_lens
    positions = np.arange(int(seq_lens.sum()), dtype=np.int64) - np.repeat(seg_starts - skip, seq_lens)
    if share_prompt:
        values = values.take(pa.array(positions + np.repeat(np.cumsum(full_lens) - full_lens, seq_lens)))
    seg_offsets = np.concatenate([[0], np.cumsum(2 * pairs_per_row)])
    row_tokens = np.add.reduceat(seq_lens, seg_offsets[:-1])
    tok_offsets = pa.array(np.concatenate([[0], np.cumsum(row_tokens)]), pa.int32())
    seg_offsets = pa.array(seg_offsets, pa.int32())
    return pa.table({
        "row_id": pa.array(np.arange(first_row_id, first_row_id + len(bins)), pa.int64()),
        "input_ids": pa.ListArray.from_arrays(tok_offsets, values),
        "position_ids": pa.ListArray.from_arrays(tok_offsets, pa.array(positions, pa.int32())),
        "seq_lens": pa.ListArray.from_arrays(seg_offsets, pa.array(seq_lens, pa.int32())),
        "prompt_lens": pa.ListArray.from_arrays(seg_offsets, pa.array(prompt_lens, pa.int32())),
        "pair_ids": pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(pairs_per_row)]), pa.int32()),
                                             pairs.column("pair_id").take(take).combine_chunks()),
        "num_tokens": pa.array(row_tokens, pa.int32()),
    }, schema=ROW_SCHEMA)


def write_row_shards(pairs: pa.Table, tokens: pa.Table, token_rows: np.ndarray, bins: list[list[int]],
                     first_row_id: int, out_dir: Loc, prefix: str, rows_per_shard: int,
                     share_prompt: bool = False) -> list[ShardInfo]:
    """The packed rows of ``bins``, assembled and written one shard at a time."""
    shards = []
    for k, start in enumerate(range(0, len(bins), rows_per_shard)):
        part = assemble_rows(pairs, tokens, token_rows, bins[start:start + rows_per_shard], first_row_id + start,
                             share_prompt)
        final = out_dir / f"{prefix}-{k:05d}.parquet"
        final.write_parquet(part, row_group_size=ROW_GROUP_ROWS)
        shards.append(ShardInfo.of(final, part.num_rows))
    return shards


def length_histogram(lengths: np.ndarray, capacity: int) -> dict[str, int]:
    """Counts per power-of-two bucket, "<=64", "<=128", ... up to the row capacity."""
    edges = [64]
    while edges[-1] < capacity:
        edges.append(edges[-1] * 2)
    counts = np.bincount(np.searchsorted(edges, lengths), minlength=len(edges))
    return {f"<={e}": int(c) for e, c in zip(edges, counts[: len(edges)])}


def pack_and_write(records: pa.Table, cfg: PipelineConfig, out_dir: Loc,
                   chunks: list[dict] | None = None) -> tuple[list[ShardInfo], dict]:
    """Quarantine file, packed train/eval shards and the stage's stats."""
    t, seed = cfg.tokenize, cfg.train.seed
    # Ray returns rows in any order: sort by source row so everything after is deterministic.
    # Only the per-pair columns are sorted and filtered; the token lists stay where they
    # are (``token_lists``, the largest part by far) and are taken a shard of rows at a time.
    order = pc.sort_indices(records, sort_keys=[("source", "ascending"), ("row_index", "ascending"),
                                                ("expansion", "ascending")])
    token_lists = records.select(TOKEN_COLUMNS)
    records = records.drop_columns(TOKEN_COLUMNS).take(order)
    records, dataset_stats = dataset_checks(records, cfg)
    bad_mask = records.column("reason").is_valid()
    quarantine = fill_raw(records.filter(bad_mask).select(QUARANTINE_COLUMNS), chunks or [])
    pairs = records.filter(pc.invert(bad_mask))
    token_rows = order.filter(pc.invert(bad_mask)).to_numpy()  # pairs[i]'s lists: token_lists[token_rows[i]]

    out_dir = Loc(out_dir)
    final = out_dir / "quarantine.parquet"
    final.write_parquet(quarantine)
    shards = [ShardInfo.of(final, quarantine.num_rows)]

    # A row with several rejected completions gives several records: count rows once.
    n_in = len(set(zip(records.column("source").to_pylist(), records.column("row_index").to_pylist())))
    reasons = Counter(quarantine.column("reason").to_pylist())
    n_bad = quarantine.num_rows
    if n_in and n_bad / records.num_rows > t.max_bad_fraction:
        top = ", ".join(f"{r}: {c}" for r, c in reasons.most_common())
        raise ValueError(
            f"tokenize: {n_bad} of {records.num_rows} pairs quarantined "
            f"({n_bad / records.num_rows:.1%} > tokenize.max_bad_fraction "
            f"{t.max_bad_fraction:.1%}): {top}; see {final}"
        )

    eval_mask = packing.is_eval(pairs.column("prompt_key").to_pylist(), cfg.data.eval_fraction, seed)
    lengths = (pc.list_value_length(token_lists.column("chosen_ids")).to_numpy().astype(np.int64)
               + pc.list_value_length(token_lists.column("rejected_ids")).to_numpy().astype(np.int64))[token_rows]
    share = shares_prompt(cfg)
    shared = pairs.column("rejected_prompt_len").to_numpy().astype(np.int64) if share else np.zeros_like(lengths)
    lengths -= shared  # the tokens a pair takes in a row: its prompt once with share_prompt
    stats: dict = {
        "input_rows": n_in,
        "records": records.num_rows,  # rows, with each extra rejected completion counted
        "pairs": pairs.num_rows,
        "quarantined": n_bad,
        **dataset_stats,
        "quarantine_reasons": dict(sorted(reasons.items())),
        "truncated_pairs": int(np.sum(pairs.column("truncated").to_numpy(zero_copy_only=False))),
        "prefix_mismatch_pairs": int(
            np.sum(pairs.column("prefix_mismatch").to_numpy(zero_copy_only=False))
        ),
        "max_tokens_per_row": t.max_tokens_per_row,
        "share_prompt": share,
    }
    row_id = 0
    for split, mask in (("train", ~eval_mask), ("eval", eval_mask)):
        index = np.nonzero(mask)[0]
        bins = packing.first_fit_decreasing(lengths[index], t.max_tokens_per_row)
        bins = packing.shuffled([[int(index[i]) for i in b] for b in bins], seed)
        shards += write_row_shards(pairs, token_lists, token_rows, bins, row_id, out_dir, split, t.rows_per_shard,
                                   share)
        row_id += len(bins)
        tokens = int(lengths[index].sum())
        capacity = len(bins) * t.max_tokens_per_row
        stats[split] = {
            "pairs": int(len(index)),
            "rows": len(bins),
            "tokens": tokens,  # stored in rows (what the model computes)
            "shared_prompt_tokens": int(shared[index].sum()),  # not stored twice
            "waste_fraction": round(1 - tokens / capacity, 6) if capacity else 0.0,
            "pair_tokens_histogram": length_histogram(lengths[index], t.max_tokens_per_row),
        }
    stats["rows"] = stats["train"]["rows"] + stats["eval"]["rows"]
    stats["tokens"] = stats["train"]["tokens"] + stats["eval"]["tokens"]
    if stats["train"]["rows"] == 0:
        raise ValueError("tokenize: no training pairs left (all quarantined or in eval)")
    return shards, stats


# ----------------------------------------------------------------------------- entry points


def resolve_sources(cfg: PipelineConfig) -> list[sources.Source]:
    if cfg.data.hf_dataset is not None:
        return [sources.hf_dataset_source(cfg.data.hf_dataset, Loc(cfg.run_dir) / "sources")]
    return sources.expand_inputs(cfg.data.train_files)


def fingerprint_inputs(cfg: PipelineConfig, cache: HashCache) -> dict:
    """Everything that changes this stage's output (and nothing that does not)."""
    from dataclasses import asdict

    srcs = resolve_sources(cfg)
    return {
        "version": STAGE_VERSION,
        "data": {s.label: hash_tree([s.path if sources.is_uri(s.path) else Path(s.path)], cache) for s in srcs},
        "tokenizer": hash_checkpoint(cfg.tokenizer_path, "tokenizer", cache),
        "chat_template": hash_tree([Path(cfg.tokenize.chat_template)], cache) if cfg.tokenize.chat_template else None,
        "data_settings": asdict(cfg.data) | {"train_files": None, "hf_dataset": None},
        "tokenize_settings": {
            k: v for k, v in asdict(cfg.tokenize).items()
            if k not in ("actors", "num_cpus_per_actor", "rows_per_task", "chat_template")
        } | {"share_prompt": shares_prompt(cfg)},  # resolved: null's meaning follows the attention
        "seed": cfg.train.seed,
    }


def run_local(cfg: PipelineConfig, out_dir: Loc) -> tuple[list[ShardInfo], dict]:
    from pipeline.config import to_dict

    tokenizer = TokenizeChunk(to_dict(cfg))
    chunks = sources.plan_chunks(resolve_sources(cfg), cfg.tokenize.rows_per_task, cfg.data.split)
    records = [rec for chunk in chunks for rec in tokenizer.tokenize_chunk(chunk)]
    return pack_and_write(pa.Table.from_pylist(records, schema=PAIR_SCHEMA), cfg, out_dir, chunks)


def run(cfg: PipelineConfig, out_dir: Loc) -> tuple[list[ShardInfo], dict]:
    import ray

    from pipeline.config import for_workers

    t = cfg.tokenize
    chunks = sources.plan_chunks(resolve_sources(cfg), t.rows_per_task, cfg.data.split)
    ds = ray.data.from_items(chunks).map_batches(
        TokenizeChunk,
        fn_constructor_kwargs={"cfg_dict": for_workers(cfg)},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(t.actors, len(chunks))),
        num_cpus=t.num_cpus_per_actor,
    )
    tables = ray.get(ds.to_arrow_refs())
    records = pa.concat_tables([tb.cast(PAIR_SCHEMA) for tb in tables]) if tables else PAIR_SCHEMA.empty_table()
    return pack_and_write(records, cfg, out_dir, chunks)
