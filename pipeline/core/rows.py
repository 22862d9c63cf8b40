"""The packed-row contract every stage shares: the Parquet schema the tokenize and sft
stages write (``ROW_SCHEMA``, in row groups of ``ROW_GROUP_ROWS``), the columns the
training objectives read (``ROW_COLUMNS``), random access to the rows (``RowReader``)
and the assembly of one-segment-per-sequence rows (the sft stage's)."""

from __future__ import annotations

import bisect
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.storage import Loc

ROW_GROUP_ROWS = 16  # small row groups: the trainer reads rows at random

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

ROW_COLUMNS = ["input_ids", "position_ids", "seq_lens", "prompt_lens", "num_tokens"]


class RowReader:
    """Random access to packed rows across Parquet shards, one row group at a time.

    Ranks read only the rows their plan names (no full copy of the dataset per worker)."""

    def __init__(self, files: list[Loc], columns: list[str] | None = None):
        """``columns``: the ones to read (None: all the shards have)."""
        self.files = [pq.ParquetFile(Loc(f).open_input()) for f in files]
        self.columns = columns
        self.groups: list[tuple[int, int]] = []  # (file, row group) in row order
        self.starts: list[int] = []
        n = 0
        for fi, pf in enumerate(self.files):
            for g in range(pf.metadata.num_row_groups):
                self.groups.append((fi, g))
                self.starts.append(n)
                n += pf.metadata.row_group(g).num_rows
        self.num_rows = n
        self._group = lru_cache(maxsize=4)(self._read_group)

    def read_column(self, name: str) -> list:
        """One column of every row, in row order (a small one: lengths, counts)."""
        return [v for pf in self.files for v in pf.read(columns=[name]).column(0).to_pylist()]

    def _read_group(self, k: int) -> list[dict]:
        fi, g = self.groups[k]
        return self.files[fi].read_row_group(g, columns=self.columns).to_pylist()

    def __getitem__(self, row: int) -> dict:
        k = bisect.bisect_right(self.starts, row) - 1
        return self._group(k)[row - self.starts[k]]


def split_files(rows_dir: Loc, split: str) -> list[Loc]:
    return Loc(rows_dir).glob(f"{split}-*.parquet")


def _array(values) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def sequence_table(pair_ids, ids, prompt_lens) -> pa.Table:
    """Sequences to pack one segment each: ``pair_id``, ``ids`` (prompt + completion),
    ``prompt_len``, ``length`` (Arrow arrays or chunked arrays, one entry per sequence)."""
    ids = _array(ids)
    return pa.table({"pair_id": _array(pair_ids), "ids": ids, "prompt_len": _array(prompt_lens).cast(pa.int32()),
                     "length": pc.list_value_length(ids).cast(pa.int32())})


def assemble_sequences(segments: pa.Table, bins: list[list[int]], first_row_id: int) -> pa.Table:
    """Packed rows (ROW_SCHEMA) of one segment per sequence (``sequence_table``): ``bins``
    index ``segments``; positions restart at 0 for each. The sft stage's rows."""
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
