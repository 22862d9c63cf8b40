"""The tokenizing machinery: preference data -> quarantine + packed rows in Parquet,
split train/eval. The tokenize stage runs it (``stages/tokenize.py``), and the sft stage
on data of its own.

Core functions work on plain files and tables and run without Ray:

* ``pipeline.core.sources.plan_chunks``: the inputs cut into read units with source row indices;
* ``TokenizeChunk``: read a unit, normalise and tokenise every row (bad rows are returned
  with a quarantine reason, never dropped); the unit's token lists are written to
  ``_units/unit-NNNNN.parquet`` in the stage directory and only the per-pair columns
  (ids, keys, lengths, where the tokens are) come back;
* ``pack_and_write``: on the driver, over that per-pair table only: the dataset-wide
  checks (one format per dataset, duplicates), the split by prompt, packing into rows of
  ``max_tokens_per_row`` (first-fit-decreasing over the (pair, length) table), a seeded
  row shuffle, and the plan of shards;
* ``write_shard_group``: a group of shards whose token lists fit ``pack_buffer_tokens``,
  each unit file read once, rows assembled with Arrow and numpy.

``run_on_ray`` places ``TokenizeChunk`` on a Ray Data actor pool and the shard groups on Ray
tasks; ``run_in_process`` runs the same code in-process. The driver never holds a token list.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import formats, mixing, packing, placement, sources
from pipeline.core.config import PipelineConfig, shares_prompt
from pipeline.core.models import local_dir
from pipeline.core.rows import ROW_GROUP_ROWS, ROW_SCHEMA, assemble_sequences, sequence_table
from pipeline.core.rundir import HashCache, ShardInfo, hash_checkpoint, hash_tree
from pipeline.core.sft_formats import SequenceRows
from pipeline.core.storage import Loc
from pipeline.core.tokenizer import load_tokenizer

STAGE_VERSION = 5  # 3: rows may share prompts; 4: data.seed seeds the split and shuffle; 5: split keyed on the row's prompt

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
        ("prompt_truncated", pa.bool_()),
        ("reason", pa.string()),  # null for a good pair
        ("detail", pa.string()),
        ("raw", pa.string()),  # the input row as JSON, kept for quarantined rows only
    ]
)

QUARANTINE_COLUMNS = ["source", "row_index", "expansion", "reason", "detail", "raw"]
TOKEN_COLUMNS = ["chosen_ids", "rejected_ids"]
# Settings added after the output format settled, with the default that reproduces the
# output from before them: fingerprinted only when set otherwise, so that a run directory
# made before they existed does not tokenize (and score) again.
ADDED_SETTINGS = {"prompt_too_long": "quarantine", "min_completion_tokens": 1}
UNITS_DIR = "_units"  # the workers' token lists; removed when the stage ends

# What a worker returns per pair: PAIR_SCHEMA without the token lists, plus their lengths
# and where they are (row ``unit_row`` of ``_units/unit-<unit>.parquet``).
PAIR_META_SCHEMA = pa.schema(
    [f for f in PAIR_SCHEMA if f.name not in TOKEN_COLUMNS]
    + [("chosen_len", pa.int32()), ("rejected_len", pa.int32()), ("unit", pa.int32()), ("unit_row", pa.int32())]
)
WRITER_COLUMNS = ["pair_id", "chosen_prompt_len", "rejected_prompt_len", "unit", "unit_row"]


def unit_file(units_dir: Loc, unit: int) -> Loc:
    return Loc(units_dir) / f"unit-{unit:05d}.parquet"


# ----------------------------------------------------------------------------- tokenising


class TokenizeChunk:
    """Callable over a batch of read units; loads the tokenizer once (per Ray actor).

    ``units_dir`` (a path or URI every worker can write) receives each unit's token lists;
    without it only ``tokenize_chunk`` (records in memory) is available."""

    def __init__(self, cfg_dict: dict, units_dir: str | None = None, rows=None):
        """``rows``: how a row becomes pairs (``formats.PreferenceColumns``, from ``data``, by default;
        ``sft_formats.SequenceRows`` for the sft stage's own data: one-sided pairs)."""
        from pipeline.core.config import config_from_dict

        self.cfg = config_from_dict(cfg_dict)
        self.tokenizer = load_tokenizer(self.cfg)
        self.units_dir = Loc(units_dir) if units_dir is not None else None
        d = self.cfg.data
        self.rows = rows or formats.PreferenceColumns(d.prompt_key, d.chosen_key, d.rejected_key)

    def __call__(self, batch: pa.Table | dict) -> pa.Table:
        chunks = batch.to_pylist() if isinstance(batch, pa.Table) else [
            dict(zip(batch, vals)) for vals in zip(*batch.values())
        ]
        where = placement.here()
        tables = [self.tokenize_unit(chunk) for chunk in chunks]
        # where each unit was tokenised: one row of these per unit, dropped before packing
        return pa.concat_tables([t.append_column("node_id", pa.array([where["node_id"]] * t.num_rows, pa.string()))
                                 .append_column("hostname", pa.array([where["hostname"]] * t.num_rows, pa.string()))
                                 for t in tables])

    def tokenize_unit(self, chunk: dict) -> pa.Table:
        """Tokenise read unit ``chunk["unit"]``: its token lists are written to its unit
        file (row i = record i), its per-pair columns are returned (PAIR_META_SCHEMA)."""
        if self.units_dir is None:
            raise ValueError("TokenizeChunk: a units_dir is needed to write token lists")
        records = pa.Table.from_pylist(self.tokenize_chunk(chunk), schema=PAIR_SCHEMA)
        unit_file(self.units_dir, chunk["unit"]).write_parquet(records.select(TOKEN_COLUMNS))
        n = records.num_rows
        meta = records.drop_columns(TOKEN_COLUMNS)
        for name, column in (
            ("chosen_len", pc.fill_null(pc.list_value_length(records.column("chosen_ids")), 0)),
            ("rejected_len", pc.fill_null(pc.list_value_length(records.column("rejected_ids")), 0)),
            ("unit", pa.array(np.full(n, chunk["unit"]))),
            ("unit_row", pa.array(np.arange(n))),
        ):
            meta = meta.append_column(name, column.cast(pa.int32()))
        return meta

    def tokenize_chunk(self, chunk: dict) -> list[dict]:
        tokenize_cfg = self.cfg.tokenize
        records = []
        keep = set(chunk["keep"]) if chunk.get("keep") is not None else None  # a mixture's draw
        for index, row, text in sources.read_chunk(chunk):
            if keep is not None and index - chunk["first_row"] not in keep:
                continue
            base = dict(source=chunk["label"], row_index=int(index), expansion=0)
            raw = text if text is not None else json.dumps(row, default=str, ensure_ascii=False)
            try:
                if row is None:
                    raise formats.BadRow("invalid_json", "not a JSON object")
                pairs = self.rows.normalize(row)
            except formats.BadRow as bad:
                records.append(dict(base, reason=bad.reason, detail=bad.detail, raw=raw))
                continue
            for pair in pairs:
                rec = dict(base, expansion=pair.expansion, format=pair.format)
                try:
                    tp = formats.tokenize_pair(
                        pair, self.tokenizer, max_length=tokenize_cfg.max_length, max_prompt_length=tokenize_cfg.max_prompt_length,
                        truncation_mode=tokenize_cfg.truncation_mode, strict=tokenize_cfg.strict,
                        max_completion_length=tokenize_cfg.max_completion_length,
                        min_completion_tokens=tokenize_cfg.min_completion_tokens,
                        prompt_too_long=tokenize_cfg.prompt_too_long)
                except formats.BadRow as bad:
                    records.append(dict(rec, reason=bad.reason, detail=bad.detail, raw=raw))
                    continue
                records.append(dict(
                    rec,
                    pair_id=formats.pair_id(tp, rec["source"], index, pair.expansion),
                    content_key=formats.content_key(tp),
                    prompt_key=formats.prompt_key(pair),
                    chosen_ids=tp.chosen.input_ids,
                    chosen_prompt_len=tp.chosen.prompt_len,
                    rejected_ids=tp.rejected.input_ids if tp.rejected else [],  # none: an SFT sequence
                    rejected_prompt_len=tp.rejected.prompt_len if tp.rejected else 0,
                    truncated=tp.truncated,
                    prefix_mismatch=tp.prefix_mismatch,
                    prompt_truncated=tp.prompt_truncated,
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
    is the chosen segment's (``pipeline.core.logps.segment_layout``). Arrow and numpy
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


def write_shard_group(pairs: pa.Table, shards: list[dict], units_dir: str, out_dir: str,
                      share_prompt: bool = False, sequences: bool = False) -> list[ShardInfo]:
    """Write ``shards`` ({name, first_row_id, bins}; bins index ``pairs``, the group's pairs
    in WRITER_COLUMNS): the pairs' token lists are read from their unit files, each file
    once, and only the group's are kept; then each shard is assembled and written.
    ``sequences``: one-sided pairs (SFT rows), one segment each."""
    units_dir, out_dir = Loc(units_dir), Loc(out_dir)
    unit = pairs.column("unit").to_numpy()
    unit_row = pairs.column("unit_row").to_numpy()
    token_rows = np.empty(len(unit), dtype=np.int64)
    pieces, offset = [], 0
    for u in np.unique(unit):
        members = np.nonzero(unit == u)[0]
        with unit_file(units_dir, int(u)).open_input() as f:
            lists = pq.read_table(f, columns=TOKEN_COLUMNS)
        pieces.append(lists.take(pa.array(unit_row[members])))
        token_rows[members] = offset + np.arange(len(members))
        offset += len(members)
    tokens = pa.concat_tables(pieces) if pieces else PAIR_SCHEMA.empty_table().select(TOKEN_COLUMNS)
    written = []
    if sequences:
        segments = sequence_table(pairs.column("pair_id"), tokens.column("chosen_ids").take(pa.array(token_rows)),
                                  pairs.column("chosen_prompt_len"))
    for shard in shards:
        part = (assemble_sequences(segments, shard["bins"], shard["first_row_id"]) if sequences else
                assemble_rows(pairs, tokens, token_rows, shard["bins"], shard["first_row_id"], share_prompt))
        final = out_dir / shard["name"]
        final.write_parquet(part, row_group_size=ROW_GROUP_ROWS)
        written.append(ShardInfo.of(final, part.num_rows))
    return written


def shard_groups(pairs: pa.Table, shards: list[dict], held: np.ndarray, budget: int) -> list[dict]:
    """Consecutive shards grouped so that a group's token lists (``held`` per pair) stay
    within ``budget`` tokens (a shard over it is a group of its own). Each group carries
    its own pairs (WRITER_COLUMNS) and bins renumbered into them: the arguments of
    ``write_shard_group``."""
    groups, current, tokens = [], [], 0
    for shard in shards:
        need = int(held[np.concatenate(shard["bins"])].sum()) if shard["bins"] else 0
        if current and tokens + need > budget:
            groups.append(current)
            current, tokens = [], 0
        current.append(shard)
        tokens += need
    if current:
        groups.append(current)
    columns = pairs.select(WRITER_COLUMNS)
    out = []
    for group in groups:
        members = np.array([i for shard in group for b in shard["bins"] for i in b], dtype=np.int64)
        local = dict(zip(members.tolist(), range(len(members))))
        out.append({"pairs": columns.take(pa.array(members)),
                    "shards": [dict(shard, bins=[[local[i] for i in b] for b in shard["bins"]]) for shard in group]})
    return out


def length_histogram(lengths: np.ndarray, capacity: int) -> dict[str, int]:
    """Counts per power-of-two bucket, "<=64", "<=128", ... up to the row capacity."""
    edges = [64]
    while edges[-1] < capacity:
        edges.append(edges[-1] * 2)
    counts = np.bincount(np.searchsorted(edges, lengths), minlength=len(edges))
    return {f"<={e}": int(c) for e, c in zip(edges, counts[: len(edges)])}


def write_groups_local(groups: list[dict]) -> list[list[ShardInfo]]:
    return [write_shard_group(**group) for group in groups]


def pack_and_write(records: pa.Table, cfg: PipelineConfig, out_dir: Loc, chunks: list[dict] | None = None,
                   write_groups=write_groups_local, sequences: bool = False) -> tuple[list[ShardInfo], dict]:
    """Quarantine file, packed train/eval shards and the stage's stats.

    ``records`` is the per-pair table (PAIR_META_SCHEMA) of every read unit, whose token
    lists are in ``out_dir/_units``; ``write_groups`` runs ``write_shard_group`` over a
    list of its arguments and returns the written shards in order (in-process here, Ray
    tasks in ``run_on_ray``)."""
    tokenize_cfg, seed = cfg.tokenize, cfg.data.seed
    # Ray returns rows in any order: sort by source row so everything after is deterministic.
    order = pc.sort_indices(records, sort_keys=[("source", "ascending"), ("row_index", "ascending"),
                                                ("expansion", "ascending")])
    records = records.take(order)
    records, dataset_stats = dataset_checks(records, cfg)
    bad_mask = records.column("reason").is_valid()
    quarantine = fill_raw(records.filter(bad_mask).select(QUARANTINE_COLUMNS), chunks or [])
    pairs = records.filter(pc.invert(bad_mask))

    out_dir = Loc(out_dir)
    final = out_dir / "quarantine.parquet"
    final.write_parquet(quarantine)
    shards = [ShardInfo.of(final, quarantine.num_rows)]

    # A row with several rejected completions gives several records: count rows once.
    n_in = len(set(zip(records.column("source").to_pylist(), records.column("row_index").to_pylist())))
    reasons = Counter(quarantine.column("reason").to_pylist())
    n_bad = quarantine.num_rows
    # duplicates dropped as data.duplicates: drop asked are not bad rows: they do not count
    bad = {r: c for r, c in reasons.items() if r != "duplicate"}
    if n_in and sum(bad.values()) / records.num_rows > tokenize_cfg.max_bad_fraction:
        top = ", ".join(f"{r}: {c}" for r, c in Counter(bad).most_common())
        raise ValueError(
            f"tokenize: {sum(bad.values())} of {records.num_rows} pairs quarantined as bad "
            f"({sum(bad.values()) / records.num_rows:.1%} > tokenize.max_bad_fraction "
            f"{tokenize_cfg.max_bad_fraction:.1%}): {top}; see {final}"
        )

    eval_mask = packing.is_eval(pairs.column("prompt_key").to_pylist(), cfg.data.eval_fraction, seed)
    held = (pairs.column("chosen_len").to_numpy().astype(np.int64)
            + pairs.column("rejected_len").to_numpy().astype(np.int64))  # the lists a writer reads
    share = shares_prompt(cfg) and not sequences
    shared = pairs.column("rejected_prompt_len").to_numpy().astype(np.int64) if share else np.zeros_like(held)
    lengths = held - shared  # the tokens a pair takes in a row: its prompt once with share_prompt
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
        "prompt_truncated_pairs": int(np.sum(pairs.column("prompt_truncated").to_numpy(zero_copy_only=False))),
        "max_tokens_per_row": tokenize_cfg.max_tokens_per_row,
        "share_prompt": share,
    }
    row_id, plan = 0, []
    for split, mask in (("train", ~eval_mask), ("eval", eval_mask)):
        index = np.nonzero(mask)[0]
        bins = packing.first_fit_decreasing(lengths[index], tokenize_cfg.max_tokens_per_row)
        bins = packing.shuffled([[int(index[i]) for i in b] for b in bins], seed)
        plan += [{"name": f"{split}-{k:05d}.parquet", "first_row_id": row_id + start,
                  "bins": bins[start:start + tokenize_cfg.rows_per_shard]}
                 for k, start in enumerate(range(0, len(bins), tokenize_cfg.rows_per_shard))]
        row_id += len(bins)
        tokens = int(lengths[index].sum())
        capacity = len(bins) * tokenize_cfg.max_tokens_per_row
        stats[split] = {
            "pairs": int(len(index)),
            "rows": len(bins),
            "tokens": tokens,  # stored in rows (what the model computes)
            "shared_prompt_tokens": int(shared[index].sum()),  # not stored twice
            "waste_fraction": round(1 - tokens / capacity, 6) if capacity else 0.0,
            "pair_tokens_histogram": length_histogram(lengths[index], tokenize_cfg.max_tokens_per_row),
        }
    stats["rows"] = stats["train"]["rows"] + stats["eval"]["rows"]
    stats["tokens"] = stats["train"]["tokens"] + stats["eval"]["tokens"]
    if stats["train"]["rows"] == 0:
        raise ValueError("tokenize: no training pairs left (all quarantined or in eval)")
    groups = shard_groups(pairs, plan, held, tokenize_cfg.pack_buffer_tokens)
    stats["write_groups"] = len(groups)
    for group in groups:
        group.update(units_dir=str(out_dir / UNITS_DIR), out_dir=str(out_dir), share_prompt=share, sequences=sequences)
    shards += [shard for written in write_groups(groups) for shard in written]
    return shards, stats


def source_stats(records: pa.Table, quarantine: pa.Table, chunks: list[dict],
                 drawn: dict[str, dict]) -> dict[str, dict]:
    """Per mixture source: its rows, the rows drawn, the pairs they gave (packed) and the
    records quarantined (for any reason, the dataset-wide checks' included)."""
    group = {c["label"]: c["group"] for c in chunks}
    out = {name: dict(counts, pairs=0, quarantined=0) for name, counts in drawn.items()}
    for label, n in Counter(records.column("source").to_pylist()).items():
        out[group[label]]["pairs"] += n
    for label, n in Counter(quarantine.column("source").to_pylist()).items():
        out[group[label]]["pairs"] -= n
        out[group[label]]["quarantined"] += n
    return out


# ----------------------------------------------------------------------------- entry points


def resolve_sources(cfg: PipelineConfig) -> list[sources.Source]:
    cache = Loc(cfg.run_dir) / "sources"
    if cfg.data.sources:
        return [replace(s, group=mixing.source_name(spec)) for spec in cfg.data.sources
                for s in ([sources.hf_dataset_source(spec["hf_dataset"], cache)] if spec.get("hf_dataset")
                          else sources.expand_inputs(mixing.files_of(spec)))]
    if cfg.data.hf_dataset is not None:
        return [sources.hf_dataset_source(cfg.data.hf_dataset, cache)]
    return sources.expand_inputs(cfg.data.train_files)


def fingerprint_inputs(cfg: PipelineConfig, cache: HashCache) -> dict:
    """Everything that changes this stage's output (and nothing that does not)."""
    from dataclasses import asdict

    srcs = resolve_sources(cfg)
    return {
        "version": STAGE_VERSION,
        "data": {s.label: hash_tree([s.path if sources.is_uri(s.path) else Path(s.path)], cache) for s in srcs},
        "tokenizer": hash_checkpoint(local_dir(cfg.tokenizer_path, cfg.model, "tokenizer"), "tokenizer", cache),
        "chat_template": hash_tree([Path(cfg.tokenize.chat_template)], cache) if cfg.tokenize.chat_template else None,
        "data_settings": {k: v for k, v in asdict(cfg.data).items() if k != "sources"}
        | {"train_files": None, "hf_dataset": None},
        **({"mixture": mixing.settings(cfg.data.sources)} if cfg.data.sources else {}),
        "tokenize_settings": {
            k: v for k, v in asdict(cfg.tokenize).items()
            if k not in ("actors", "num_cpus_per_actor", "rows_per_task", "chat_template", "pack_buffer_tokens")
            and not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])
        } | {"share_prompt": shares_prompt(cfg)},  # resolved: null's meaning follows the attention
    }


def tokenize_all(cfg: PipelineConfig, out_dir: Loc, tokenize_units, write_groups,
                 sequences: bool = False) -> tuple[list[ShardInfo], dict]:
    """Plan the read units, tokenize them (``tokenize_units(chunks, units_dir)`` -> the
    per-pair tables), pack and write; the unit files (and inputs restaged for reading)
    are removed whatever happens. ``sequences``: the units hold one-sided pairs."""
    units_dir = Loc(out_dir) / UNITS_DIR
    try:
        chunks = sources.plan_chunks(resolve_sources(cfg), cfg.tokenize.rows_per_task, cfg.data.split,
                                     staging=units_dir / "inputs")
        drawn = None
        if cfg.data.sources:
            chunks, drawn = mixing.sample(chunks, cfg.data.sources, cfg.data.seed)
        chunks = [dict(c, unit=i) for i, c in enumerate(chunks)]
        tables = tokenize_units(chunks, units_dir)
        workers = [dict(zip(("node_id", "hostname"), w)) for tb in tables if "node_id" in tb.column_names
                   for w in zip(tb.column("node_id").to_pylist(), tb.column("hostname").to_pylist())]
        records = (pa.concat_tables([tb.select(PAIR_META_SCHEMA.names).cast(PAIR_META_SCHEMA) for tb in tables])
                   if tables else PAIR_META_SCHEMA.empty_table())
        shards, stats = pack_and_write(records, cfg, out_dir, chunks, write_groups, sequences)
        stats["workers"] = placement.by_node(workers or [placement.here()] * records.num_rows, "records")
        if drawn is not None:
            with (Loc(out_dir) / "quarantine.parquet").open_input() as f:
                stats["sources"] = source_stats(records, pq.read_table(f, columns=["source"]), chunks, drawn)
        return shards, stats
    finally:
        units_dir.rmtree()


def run_in_process(cfg: PipelineConfig, out_dir: Loc, rows=None) -> tuple[list[ShardInfo], dict]:
    """``rows``: as ``TokenizeChunk``'s (``SequenceRows``: the sft stage's own data)."""
    from pipeline.core.config import to_dict

    def tokenize_units(chunks, units_dir):
        worker = TokenizeChunk(to_dict(cfg), str(units_dir), rows)
        return [worker.tokenize_unit(chunk) for chunk in chunks]

    return tokenize_all(cfg, out_dir, tokenize_units, write_groups_local, sequences=isinstance(rows, SequenceRows))


def run_on_ray(cfg: PipelineConfig, out_dir: Loc, rows=None) -> tuple[list[ShardInfo], dict]:
    import ray

    from pipeline.core.config import for_workers

    tokenize_cfg = cfg.tokenize

    def tokenize_units(chunks, units_dir):
        if not chunks:
            return []
        ds = ray.data.from_items(chunks).map_batches(
            TokenizeChunk,
            fn_constructor_kwargs={"cfg_dict": for_workers(cfg), "units_dir": str(units_dir), "rows": rows},
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=min(tokenize_cfg.actors, len(chunks))),
            num_cpus=tokenize_cfg.num_cpus_per_actor,
        )
        return ray.get(ds.to_arrow_refs())  # per-pair columns only: the token lists stay in files

    def write_groups(groups):
        task = ray.remote(num_cpus=tokenize_cfg.num_cpus_per_actor)(write_shard_group)
        return ray.get([task.remote(**group) for group in groups])

    return tokenize_all(cfg, out_dir, tokenize_units, write_groups, sequences=isinstance(rows, SequenceRows))
