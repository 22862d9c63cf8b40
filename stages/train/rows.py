"""The rows a rank trains on: random access to packed rows in Parquet shards, and the
seeded step plan that tells each rank which rows each step uses."""

from __future__ import annotations

import bisect
import math
from functools import lru_cache

import pyarrow.parquet as pq

from pipeline.packing import epoch_plan
from pipeline.storage import Loc

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


def steps_per_epoch(num_rows: int, world: int, grad_accum: int) -> int:
    return math.ceil(num_rows / (world * grad_accum))


def planned_steps(num_rows: int, world: int, grad_accum: int, seed: int, total_steps: int, done: int = 0):
    """(step number from 1, the step's plan) for every step after ``done``, epoch after
    epoch. The plans are a function of (seed, epoch), so a resumed run replays none."""
    per_epoch = steps_per_epoch(num_rows, world, grad_accum)
    step = 0
    for epoch in range(math.ceil(total_steps / per_epoch)):
        if (epoch + 1) * per_epoch <= done:
            step += per_epoch
            continue
        for step_plan in epoch_plan(num_rows, world, grad_accum, seed, epoch):
            if step == total_steps:
                return
            step += 1
            if step > done:
                yield step, step_plan

