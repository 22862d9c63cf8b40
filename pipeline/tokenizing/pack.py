"""Packing and writing, on the driver over the per-pair table only (``pack_and_write``):
the split by prompt, first-fit-decreasing packing into rows of ``max_tokens_per_row``, a
seeded row shuffle and the plan of shards; then each group of shards whose token lists fit
``pack_buffer_tokens`` written with each unit file read once (``write_shard_group``)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import packing
from pipeline.core.config import DataError, PipelineConfig, shares_prompt
from pipeline.core.rows import ROW_GROUP_ROWS, ROW_SCHEMA, assemble_sequences, sequence_table
from pipeline.core.rundir import ShardInfo
from pipeline.core.storage import Loc

from .checks import dataset_checks, fill_raw
from .chunk import PAIR_SCHEMA, QUARANTINE_COLUMNS, TOKEN_COLUMNS, UNITS_DIR, WRITER_COLUMNS, unit_file


def assemble_rows(pairs: pa.Table, tokens: pa.Table, token_rows: np.ndarray, bins: list[list[int]],
                  first_row_id: int, share_prompt: bool = False) -> pa.Table:
    """Concatenate each bin's pairs (chosen, rejected, chosen, ...) into one packed row.

    ``bins`` index ``pairs`` (the per-pair columns); pair i's token lists are row
    ``token_rows[i]`` of ``tokens``. With ``share_prompt`` a rejected segment keeps only its
    completion (prompt_len 0, positions continuing from the prompt's length): its prompt
    is the chosen segment's (``pipeline.core.segments.segment_layout``). Arrow and numpy
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
    records, dataset_stats = dataset_checks(records, cfg, chunks)
    bad_mask = records.column("reason").is_valid()
    quarantine = fill_raw(records.filter(bad_mask).select(QUARANTINE_COLUMNS), chunks or [])
    group = {c["label"]: c.get("group") for c in chunks or []}
    if cfg.data.sources:  # a mixture: each entry names its source too, not only its file
        quarantine = quarantine.append_column("source_name", pa.array(
            [group.get(label) for label in quarantine.column("source").to_pylist()], pa.string()))
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
        raise DataError(
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
        raise DataError(f"tokenize: no training pairs left (all quarantined or in eval): see {final} and "
                        f"data.eval_fraction")
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
