"""tokenize: preference files -> quarantine + packed rows in Parquet, split train/eval.

Core functions work on plain files and tables and run without Ray:

* ``plan_chunks``: split the input files into read units (JSONL line ranges, Parquet row
  groups), each with the source index of its first row;
* ``TokenizeChunk``: read a unit, normalise and tokenise every row (bad rows are returned
  with a quarantine reason, never dropped);
* ``pack_and_write``: on the driver, split by prompt, pack pairs into rows of
  ``max_tokens_per_row`` (first-fit-decreasing over the (pair, length) table), shuffle the
  rows with the seed and write the shards.

``run`` places ``TokenizeChunk`` on a Ray Data actor pool; ``run_local`` runs the same
code in-process.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import formats, packing
from pipeline.config import PipelineConfig
from pipeline.rundir import HashCache, ShardInfo, commit_file, hash_checkpoint, hash_tree, tmp_name

STAGE_VERSION = 1
ROW_GROUP_ROWS = 16  # small row groups: the trainer reads rows at random

PAIR_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row_index", pa.int64()),
        ("pair_id", pa.string()),
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

QUARANTINE_COLUMNS = ["source", "row_index", "reason", "detail", "raw"]


# ----------------------------------------------------------------------------- inputs


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files from paths, globs and directories, sorted; an empty match is an error."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        found = []
        for m in matches:
            if os.path.isdir(m):
                found += sorted(
                    str(p) for p in Path(m).rglob("*") if p.suffix in (".jsonl", ".parquet")
                )
            elif os.path.isfile(m):
                found.append(m)
        if not found:
            raise FileNotFoundError(f"data.train_files: {pattern!r} matches no file")
        files += found
    for f in files:
        if not f.endswith((".jsonl", ".parquet")):
            raise ValueError(f"data.train_files: {f!r} is not .jsonl or .parquet")
    return files


def plan_chunks(files: list[str], rows_per_task: int) -> list[dict]:
    """Read units: {path (as given: the rows' source), read_path (absolute: workers do not
    share the driver's working directory), kind, start, stop, first_row}. JSONL: byte ranges of
    ``rows_per_task`` lines; Parquet: row-group ranges."""
    chunks = []
    for path in files:
        if path.endswith(".jsonl"):
            offsets = [0]
            line = 0
            with open(path, "rb") as f:
                for raw in f:
                    line += 1
                    if line % rows_per_task == 0:
                        offsets.append(f.tell())
            size = os.path.getsize(path)
            if offsets[-1] != size:
                offsets.append(size)
            for i in range(len(offsets) - 1):
                chunks.append(
                    dict(path=path, read_path=os.path.abspath(path), kind="jsonl",
                         start=offsets[i], stop=offsets[i + 1], first_row=i * rows_per_task)
                )
        else:
            meta = pq.ParquetFile(path).metadata
            first, rows, start_group = 0, 0, 0
            for g in range(meta.num_row_groups):
                rows += meta.row_group(g).num_rows
                if rows >= rows_per_task or g == meta.num_row_groups - 1:
                    chunks.append(
                        dict(path=path, read_path=os.path.abspath(path), kind="parquet",
                             start=start_group, stop=g + 1, first_row=first)
                    )
                    first += rows
                    rows, start_group = 0, g + 1
    return chunks


def read_chunk(chunk: dict) -> list[tuple[int, dict | None, str | None]]:
    """[(row_index, row or None, raw text when unparseable)]"""
    out = []
    if chunk["kind"] == "jsonl":
        with open(chunk["read_path"], "rb") as f:
            f.seek(chunk["start"])
            data = f.read(chunk["stop"] - chunk["start"])
        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()
        for i, line in enumerate(lines):
            index = chunk["first_row"] + i
            text = line.decode("utf-8", errors="replace")
            if not text.strip():
                continue  # a blank line is not a row
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                out.append((index, None, text))
                continue
            out.append((index, row if isinstance(row, dict) else None, text))
    else:
        table = pq.ParquetFile(chunk["read_path"]).read_row_groups(
            list(range(chunk["start"], chunk["stop"]))
        )
        for i, row in enumerate(table.to_pylist()):
            out.append((chunk["first_row"] + i, row, None))
    return out


# ----------------------------------------------------------------------------- tokenising


class TokenizeChunk:
    """Callable over a batch of read units; loads the tokenizer once (per Ray actor)."""

    def __init__(self, cfg_dict: dict):
        from transformers import AutoTokenizer

        from pipeline.config import config_from_dict

        self.cfg = config_from_dict(cfg_dict)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.cfg.tokenizer_path, trust_remote_code=self.cfg.model.trust_remote_code
        )

    def __call__(self, batch: pa.Table | dict) -> pa.Table:
        chunks = batch.to_pylist() if isinstance(batch, pa.Table) else [
            dict(zip(batch, vals)) for vals in zip(*batch.values())
        ]
        records = [rec for chunk in chunks for rec in self.tokenize_chunk(chunk)]
        return pa.Table.from_pylist(records, schema=PAIR_SCHEMA)

    def tokenize_chunk(self, chunk: dict) -> list[dict]:
        d, t = self.cfg.data, self.cfg.tokenize
        records = []
        for index, row, text in read_chunk(chunk):
            rec = dict(source=str(chunk["path"]), row_index=int(index))
            try:
                if row is None:
                    raise formats.BadRow("invalid_json", "not a JSON object")
                pair = formats.normalize(row, d.prompt_key, d.chosen_key, d.rejected_key)
                tp = formats.tokenize_pair(
                    pair, self.tokenizer, max_length=t.max_length,
                    max_prompt_length=t.max_prompt_length, truncation_mode=t.truncation_mode,
                )
            except formats.BadRow as bad:
                raw = text if text is not None else json.dumps(row, default=str)
                records.append(dict(rec, reason=bad.reason, detail=bad.detail, raw=raw))
                continue
            records.append(
                dict(
                    rec,
                    pair_id=formats.pair_id(tp, rec["source"], index),
                    prompt_key=formats.prompt_key(tp),
                    chosen_ids=tp.chosen.input_ids,
                    chosen_prompt_len=tp.chosen.prompt_len,
                    rejected_ids=tp.rejected.input_ids,
                    rejected_prompt_len=tp.rejected.prompt_len,
                    truncated=tp.truncated,
                    prefix_mismatch=tp.prefix_mismatch,
                )
            )
        return records


# ----------------------------------------------------------------------------- packing


def assemble_rows(pairs: pa.Table, bins: list[list[int]], first_row_id: int) -> pa.Table:
    """Concatenate each bin's pairs (chosen, rejected, chosen, ...) into one packed row."""
    chosen = pairs.column("chosen_ids").to_pylist()
    rejected = pairs.column("rejected_ids").to_pylist()
    cp = pairs.column("chosen_prompt_len").to_pylist()
    rp = pairs.column("rejected_prompt_len").to_pylist()
    ids = pairs.column("pair_id").to_pylist()
    cols: dict[str, list] = {name: [] for name in ROW_SCHEMA.names}
    for k, members in enumerate(bins):
        input_ids, positions, seq_lens, prompt_lens = [], [], [], []
        for i in members:
            for seg, plen in ((chosen[i], cp[i]), (rejected[i], rp[i])):
                input_ids += seg
                positions += range(len(seg))
                seq_lens.append(len(seg))
                prompt_lens.append(plen)
        cols["row_id"].append(first_row_id + k)
        cols["input_ids"].append(input_ids)
        cols["position_ids"].append(positions)
        cols["seq_lens"].append(seq_lens)
        cols["prompt_lens"].append(prompt_lens)
        cols["pair_ids"].append([ids[i] for i in members])
        cols["num_tokens"].append(len(input_ids))
    return pa.table(cols, schema=ROW_SCHEMA)


def write_table_shards(
    table: pa.Table, out_dir: Path, prefix: str, rows_per_shard: int
) -> list[ShardInfo]:
    shards = []
    for k, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
        part = table.slice(start, rows_per_shard)
        final = out_dir / f"{prefix}-{k:05d}.parquet"
        tmp = tmp_name(final)
        pq.write_table(part, tmp, row_group_size=ROW_GROUP_ROWS)
        commit_file(tmp, final)
        shards.append(ShardInfo.of(final, part.num_rows))
    return shards


def pack_and_write(records: pa.Table, cfg: PipelineConfig, out_dir: Path) -> tuple[list[ShardInfo], dict]:
    """Quarantine file, packed train/eval shards and the stage's stats."""
    t, seed = cfg.tokenize, cfg.train.seed
    # Ray returns rows in any order: sort by source row so everything after is deterministic.
    records = records.sort_by([("source", "ascending"), ("row_index", "ascending")])
    bad_mask = records.column("reason").is_valid()
    quarantine = records.filter(bad_mask).select(QUARANTINE_COLUMNS)
    pairs = records.filter(pa.compute.invert(bad_mask))

    final = out_dir / "quarantine.parquet"
    tmp = tmp_name(final)
    pq.write_table(quarantine, tmp)
    commit_file(tmp, final)
    shards = [ShardInfo.of(final, quarantine.num_rows)]

    n_in = records.num_rows
    reasons = Counter(quarantine.column("reason").to_pylist())
    if n_in and quarantine.num_rows / n_in > t.max_bad_fraction:
        top = ", ".join(f"{r}: {c}" for r, c in reasons.most_common())
        raise ValueError(
            f"tokenize: {quarantine.num_rows} of {n_in} rows quarantined "
            f"({quarantine.num_rows / n_in:.1%} > tokenize.max_bad_fraction "
            f"{t.max_bad_fraction:.1%}): {top}; see {final}"
        )

    eval_mask = packing.is_eval(pairs.column("prompt_key").to_pylist(), cfg.data.eval_fraction, seed)
    lengths = np.array(
        [len(c) + len(r) for c, r in zip(pairs.column("chosen_ids").to_pylist(),
                                          pairs.column("rejected_ids").to_pylist())],
        dtype=np.int64,
    )
    stats: dict = {
        "input_rows": n_in,
        "pairs": pairs.num_rows,
        "quarantined": quarantine.num_rows,
        "quarantine_reasons": dict(sorted(reasons.items())),
        "truncated_pairs": int(np.sum(pairs.column("truncated").to_numpy(zero_copy_only=False))),
        "prefix_mismatch_pairs": int(
            np.sum(pairs.column("prefix_mismatch").to_numpy(zero_copy_only=False))
        ),
        "max_tokens_per_row": t.max_tokens_per_row,
    }
    row_id = 0
    for split, mask in (("train", ~eval_mask), ("eval", eval_mask)):
        index = np.nonzero(mask)[0]
        bins = packing.first_fit_decreasing(lengths[index], t.max_tokens_per_row)
        bins = packing.shuffled([[int(index[i]) for i in b] for b in bins], seed)
        rows = assemble_rows(pairs, bins, row_id)
        row_id += rows.num_rows
        if rows.num_rows:
            shards += write_table_shards(rows, out_dir, split, t.rows_per_shard)
        tokens = int(lengths[index].sum())
        capacity = rows.num_rows * t.max_tokens_per_row
        stats[split] = {
            "pairs": int(len(index)),
            "rows": rows.num_rows,
            "tokens": tokens,
            "waste_fraction": round(1 - tokens / capacity, 6) if capacity else 0.0,
        }
    stats["rows"] = stats["train"]["rows"] + stats["eval"]["rows"]
    stats["tokens"] = stats["train"]["tokens"] + stats["eval"]["tokens"]
    if stats["train"]["rows"] == 0:
        raise ValueError("tokenize: no training pairs left (all quarantined or in eval)")
    return shards, stats


# ----------------------------------------------------------------------------- entry points


def fingerprint_inputs(cfg: PipelineConfig, cache: HashCache) -> dict:
    """Everything that changes this stage's output (and nothing that does not)."""
    from dataclasses import asdict

    files = expand_inputs(cfg.data.train_files)
    return {
        "version": STAGE_VERSION,
        "data": hash_tree(files, cache),
        "tokenizer": hash_checkpoint(cfg.tokenizer_path, "tokenizer", cache),
        "data_settings": asdict(cfg.data) | {"train_files": None},
        "tokenize_settings": {
            k: v for k, v in asdict(cfg.tokenize).items()
            if k not in ("actors", "num_cpus_per_actor", "rows_per_task")
        },
        "seed": cfg.train.seed,
    }


def run_local(cfg: PipelineConfig, out_dir: Path) -> tuple[list[ShardInfo], dict]:
    from pipeline.config import to_dict

    tokenizer = TokenizeChunk(to_dict(cfg))
    chunks = plan_chunks(expand_inputs(cfg.data.train_files), cfg.tokenize.rows_per_task)
    records = [rec for chunk in chunks for rec in tokenizer.tokenize_chunk(chunk)]
    return pack_and_write(pa.Table.from_pylist(records, schema=PAIR_SCHEMA), cfg, out_dir)


def run(cfg: PipelineConfig, out_dir: Path) -> tuple[list[ShardInfo], dict]:
    import ray

    from pipeline.config import for_workers

    t = cfg.tokenize
    chunks = plan_chunks(expand_inputs(cfg.data.train_files), t.rows_per_task)
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
    return pack_and_write(records, cfg, out_dir)
