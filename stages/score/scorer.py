"""The score stage's actor: the reference model loaded once, each call one shard of packed
rows scored and committed whole, or a piece of one (``ShardScorer``), with what the rows
cost (its FLOPs and seconds, for the stage's mfu). A split shard's pieces are written under
``_parts/<shard>/`` and joined into the shard by the actor that finds them all written
(``join_parts``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.core import placement
from pipeline.core.config import config_from_dict
from pipeline.core.devices import peak_tflops, require_gpu
from pipeline.core.flops import dense_shape, forward_flops, row_work
from pipeline.core.logps import packed_token_logps
from pipeline.core.modeling import load_causal_lm, row_inputs
from pipeline.core.rows import ROW_GROUP_ROWS
from pipeline.core.segments import segment_sums
from pipeline.core.storage import Loc

SCORE_FIELDS = [
    pa.field("ref_logps", pa.list_(pa.float32())),
    pa.field("ref_seq_logps", pa.list_(pa.float32())),
]


@dataclass
class _InFlight:
    """A row whose forward has been queued; its results land in host memory later."""

    row_id: int
    logps: torch.Tensor  # (T,) on the host once ``done`` has fired
    sums: torch.Tensor  # (S,)
    done: "torch.cuda.Event | None"  # None on CPU, where everything ran already


def iter_rows(table: pa.Table):
    """A shard's rows with their token lists as numpy slices (no Python lists of tokens)."""
    lists = {}
    for name in ("input_ids", "position_ids", "seq_lens", "prompt_lens"):
        col = table.column(name).combine_chunks()
        lists[name] = (col.values.to_numpy(), col.offsets.to_numpy())  # offsets index the unsliced values
    for i, row_id in enumerate(table.column("row_id").to_pylist()):
        yield {"row_id": row_id, **{n: v[o[i]:o[i + 1]] for n, (v, o) in lists.items()}}


class ShardScorer:
    def __init__(self, cfg_dict: dict):
        self.cfg = config_from_dict(cfg_dict, handed_on=True)
        require_gpu(self.cfg.score.num_gpus_per_actor > 0, "score.num_gpus_per_actor")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(self.cfg.score.cpu_threads)
        self.model = load_causal_lm(self.cfg.reference_path, self.cfg.model, self.device)
        self.model.eval()
        # a row's FLOPs and this device's peak, for the stage's mfu
        self.shape = dense_shape(self.model.config, sum(p.numel() for p in self.model.parameters()))  # None: MoE
        # an actor's share of its device's peak: a fraction of a GPU (num_gpus_per_actor < 1) is that share
        gpus = self.cfg.score.num_gpus_per_actor
        share = gpus if self.device.type == "cuda" and 0 < gpus < 1 else 1.0
        peak = peak_tflops(self.cfg.device.peak_tflops, self.device, self.cfg.model.dtype)
        self.peak = peak * share if peak and self.shape is not None else 0.0
        self.ready_at = time.time()  # the stage's start-up ends when its first actor gets here
        placement.settle()

    @torch.inference_mode()
    def launch(self, row: dict) -> _InFlight:
        """Queue one row's forward and the copy of its results to the host; on a GPU this
        returns before the kernels have run (nothing here waits on the device)."""
        input_ids, position_ids, layout = row_inputs(row, self.device)
        per_token = packed_token_logps(
            self.model, input_ids, position_ids, layout, self.cfg.model.logp_chunk_tokens
        ).logps
        sums = segment_sums(per_token, layout)
        if self.device.type == "cpu":
            return _InFlight(row["row_id"], per_token, sums, None)
        host = per_token.to("cpu", non_blocking=True), sums.to("cpu", non_blocking=True)  # pinned
        done = torch.cuda.Event()
        done.record()
        return _InFlight(row["row_id"], *host, done)

    @staticmethod
    def collect(row: _InFlight) -> tuple[np.ndarray, np.ndarray]:
        if row.done is not None:
            row.done.synchronize()
        tok = row.logps.numpy()
        bad = ~np.isfinite(tok) | (tok > 0)
        if bad.any():
            raise ValueError(
                f"score: row {row.row_id} has {int(bad.sum())} reference log-probs that "
                "are NaN, inf or positive; the reference model or dtype is broken"
            )
        return tok, row.sums.numpy()

    def score_table(self, table: pa.Table, wanted: list[int] | None = None) -> pa.Table:
        """Rows go one step ahead: row k+1 is queued before row k's results are read, so the
        GPU starts on it while the host waits for row k and converts it. ``wanted``: the
        shard's rows to score (None: all); the others get nulls."""
        keep = None if wanted is None else set(wanted)
        results, in_flight = {}, None
        for i, row in enumerate(iter_rows(table)):
            if keep is not None and i not in keep:
                continue
            queued = (i, self.launch(row))
            if in_flight is not None:
                results[in_flight[0]] = self.collect(in_flight[1])
            in_flight = queued
        if in_flight is not None:
            results[in_flight[0]] = self.collect(in_flight[1])
        rows = [results.get(i) for i in range(table.num_rows)]
        return table.append_column(
            SCORE_FIELDS[0], pa.array([r and r[0] for r in rows], type=SCORE_FIELDS[0].type)
        ).append_column(SCORE_FIELDS[1], pa.array([r and r[1] for r in rows], type=SCORE_FIELDS[1].type))

    def score_shard(self, src: str, dst: str, wanted: list[int] | None = None,
                    bounds: list[tuple[int, int]] | None = None, piece: int = 0) -> dict:
        """Score shard ``src`` into ``dst``; ``wanted``: its rows to score (None: all). With
        ``bounds`` (the shard's pieces, [start, stop) row ranges), only piece ``piece``: written
        to its part file, and the shard joined once every piece is written."""
        final = Loc(dst)
        start, stop = bounds[piece] if bounds else (0, None)
        table = read_rows(Loc(src), start, stop)
        if stop is None:
            stop = table.num_rows
        elif table.num_rows != stop - start:
            raise ValueError(f"score: {src} holds {start + table.num_rows} rows, fewer than its manifest's: "
                             f"rows {start}-{stop} of it are missing; rerun tokenize (--stages tokenize --force)")
        if wanted is not None:
            wanted = [i - start for i in wanted if start <= i < stop]
        began = time.perf_counter()
        scored = self.score_table(table, wanted)
        seconds = time.perf_counter() - began
        rows = range(table.num_rows) if wanted is None else wanted
        seq, prm = table.column("seq_lens").to_pylist(), table.column("prompt_lens").to_pylist()
        flops = sum(forward_flops(self.shape, row_work(seq[i], prm[i])) for i in rows) if self.peak else 0
        if bounds:
            part_path(final, start, stop).write_parquet(scored)
            join_parts(final, bounds)
        else:
            final.write_parquet(scored, row_group_size=ROW_GROUP_ROWS)
        return {"name": final.name, "rows": scored.num_rows, "flops": flops, "seconds": seconds,
                "peak_tflops": self.peak, "ready_at": self.ready_at, **placement.here()}

    def score_item(self, item: dict) -> dict:
        """One item of the stage's list (``stage._todo``: its rows and pieces as JSON)."""
        return self.score_shard(item["src"], item["dst"], json.loads(item["wanted"]), json.loads(item["bounds"]),
                                item["piece"])


PARTS_DIR = "_parts"  # a split shard's scored pieces, until joined into the shard


def read_rows(src: Loc, start: int = 0, stop: int | None = None) -> pa.Table:
    """Rows [start, stop) of a Parquet file (stop None: to the end), reading only the row
    groups that hold them: a piece of a shard in a bucket downloads its part of the shard."""
    with src.open_input() as f:
        if start == 0 and stop is None:
            return pq.read_table(f)
        pf = pq.ParquetFile(f)
        stop = pf.metadata.num_rows if stop is None else stop
        groups, first, at = [], 0, 0
        for i in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(i).num_rows
            if at < stop and at + rows > start:
                first = first if groups else at
                groups.append(i)
            at += rows
        table = pf.read_row_groups(groups)
    return table.slice(start - first, stop - start)


def part_path(final: Loc, start: int, stop: int) -> Loc:
    return final.parent / PARTS_DIR / final.name / f"rows-{start:08d}-{stop:08d}.parquet"


def join_parts(final: Loc, bounds: list[tuple[int, int]]) -> bool:
    """Join a split shard's pieces, in row order, into the shard once every piece is written
    (each part file is written whole, under a temporary name first). Two actors finishing the
    last two pieces may both join it: the same bytes, each write atomic; the one that finds
    the parts already removed finds the shard written. False while a piece is missing."""
    parts = [part_path(final, a, b) for a, b in bounds]
    if not all(p.is_file() for p in parts):
        return False
    try:
        tables = []
        for p in parts:
            with p.open_input() as f:
                tables.append(pq.read_table(f))
    except (OSError, pa.ArrowInvalid):
        if final.is_file():  # joined by the other actor, which removed the parts
            return True
        raise
    table = pa.concat_tables(tables).combine_chunks()
    # the scores' list type as scored (Parquet reads a list's item back as "element")
    by_name = {f.name: f for f in SCORE_FIELDS}
    table = table.cast(pa.schema([by_name.get(f.name, f) for f in table.schema], metadata=table.schema.metadata))
    final.write_parquet(table, row_group_size=ROW_GROUP_ROWS)
    folder = final.parent / PARTS_DIR / final.name
    try:
        folder.rmtree()
    except OSError:  # the other actor joining it removed them first
        pass
    return True
