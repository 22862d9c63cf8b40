"""Reading and tokenising one read unit (``TokenizeChunk``): every row normalised and
tokenised (bad rows returned with a quarantine reason, never dropped); the unit's token
lists written to ``_units/unit-NNNNN.parquet`` in the stage directory, and only the
per-pair columns (ids, keys, lengths, where the tokens are) returned."""

from __future__ import annotations

import dataclasses

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import formats, placement, sources
from pipeline.core.storage import Loc
from pipeline.core.tokenizer import load_tokenizer


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


class TokenizeChunk:
    """Tokenises read units; loads the tokenizer once (per Ray actor).

    ``units_dir`` (a path or URI every worker can write) receives each unit's token lists;
    without it only ``tokenize_chunk`` (records in memory) is available."""

    def __init__(self, cfg_dict: dict, units_dir: str | None = None, rows=None):
        """``rows``: how a row becomes pairs (``formats.PreferenceColumns``, from ``data``, by default;
        ``sft_formats.SequenceRows`` for the sft stage's own data: one-sided pairs)."""
        from pipeline.core.config import config_from_dict

        self.cfg = config_from_dict(cfg_dict, handed_on=True)
        self.tokenizer = load_tokenizer(self.cfg)
        self.units_dir = Loc(units_dir) if units_dir is not None else None
        d = self.cfg.data
        self.rows = rows or formats.PreferenceColumns(d.prompt_key, d.chosen_key, d.rejected_key)
        self.ready_at = time.time()  # the stage's start-up ends when its first actor gets here
        placement.settle()

    def tokenize_item(self, chunk: dict) -> pa.Table:
        """``tokenize_unit`` on an actor: its per-pair columns, and where and when its actor
        was ready (one row of these a pair, dropped before packing)."""
        where = placement.here()
        t = self.tokenize_unit(chunk)
        return (t.append_column("node_id", pa.array([where["node_id"]] * t.num_rows, pa.string()))
                .append_column("hostname", pa.array([where["hostname"]] * t.num_rows, pa.string()))
                .append_column("ready_at", pa.array([self.ready_at] * t.num_rows, pa.float64())))

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
        own = json.loads(chunk.get("columns") or "{}")  # a mixture source's own column names
        rows = dataclasses.replace(self.rows, **own) if own else self.rows
        for index, row, text in sources.read_chunk(chunk):
            if keep is not None and index - chunk["first_row"] not in keep:
                continue
            base = dict(source=chunk["label"], row_index=int(index), expansion=0)
            raw = text if text is not None else json.dumps(row, default=str, ensure_ascii=False)
            try:
                if row is None:
                    raise formats.BadRow("invalid_json", "not a JSON object")
                pairs = rows.normalize(row)
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
