"""The score stage's work: which shards and rows to score, the actors over them (on Ray, or
one in this process), and the stats of what was scored."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import placement
from pipeline.core.config import PipelineConfig, for_workers, to_dict
from pipeline.core.models import local_dir
from pipeline.core.phases import STARTUP, WORK, PhaseClock
from pipeline.core.rundir import HashCache, ShardInfo, hash_checkpoint
from pipeline.core.storage import Loc
from pipeline.training.plan import first_segment_rows, first_segment_settings

from .scorer import PARTS_DIR, ShardScorer, join_parts, part_path

STAGE_VERSION = 1


def fingerprint_inputs(cfg: PipelineConfig, cache: HashCache, upstream: str, sft: str | None = None) -> dict:
    """``sft``: the sft stage's fingerprint when its export is the reference. With TR-DPO,
    what decides the train rows scored (``first_segment``)."""
    inputs = {
        "version": STAGE_VERSION,
        "upstream": upstream,
        "reference_model": hash_checkpoint(local_dir(cfg.reference_path, cfg.model), "model", cache) if sft is None
        else {"sft": sft},
        "dtype": cfg.model.dtype,
        "attn_implementation": cfg.model.attn_implementation,
    }
    if cfg.train.sync_ref_model:
        inputs["first_segment"] = first_segment_settings(cfg.train)
    return inputs


def rows_to_score(cfg: PipelineConfig, in_manifest: dict) -> dict[str, list[int]]:
    """TR-DPO: for each train shard, the indexes within it of the first segment's rows (the
    train rows are the train shards' rows in name order, as the ranks read them). Empty
    without TR-DPO, and for eval shards: every row is scored."""
    if not cfg.train.sync_ref_model:
        return {}
    shards = sorted((s for s in in_manifest["shards"] if s["name"].startswith("train-")), key=lambda s: s["name"])
    wanted = first_segment_rows(sum(s["rows"] for s in shards), cfg.train)
    out, start, k = {}, 0, 0
    for shard in shards:
        end = start + shard["rows"]
        out[shard["name"]] = []
        while k < len(wanted) and wanted[k] < end:
            out[shard["name"]].append(wanted[k] - start)
            k += 1
        start = end
    return out


def _is_complete(path: Loc, rows: int) -> bool:
    """A committed shard: readable Parquet footer with the input's row count."""
    try:
        if not path.is_file():
            return False
        with path.open_input() as f:
            return pq.ParquetFile(f).metadata.num_rows == rows
    except (OSError, pa.ArrowInvalid):
        return False


WHOLE_SHARDS_AN_ACTOR = 4  # at least this many shards an actor to score: whole shards (score.rows_per_task null)


def split_rows(shard_rows: list[int], actors: int | None, rows_per_task: int | None) -> list[list[tuple[int, int]]]:
    """Each shard's pieces, [start, stop) row ranges. ``rows_per_task`` null: whole shards when
    there are at least ``WHOLE_SHARDS_AN_ACTOR`` an actor (the last round of shards leaves
    some actors idle, a quarter of the stage at most), else pieces of (rows / 4 x actors), so
    that the actors finish together; ``actors`` None (one scorer in this process): whole."""
    if rows_per_task is None:
        if actors is None or len(shard_rows) >= WHOLE_SHARDS_AN_ACTOR * actors:
            return [[(0, n)] for n in shard_rows]
        rows_per_task = max(1, math.ceil(sum(shard_rows) / (WHOLE_SHARDS_AN_ACTOR * actors)))
    return [[(a, min(a + rows_per_task, n)) for a in range(0, n, rows_per_task)] or [(0, 0)] for n in shard_rows]


def _todo(in_dir: Loc, in_manifest: dict, out_dir: Loc, wanted: dict[str, list[int]], actors: int | None,
          rows_per_task: int | None) -> tuple[list[dict], dict[str, list]]:
    """What to score: one item a shard not yet committed, or a piece of it (``split_rows``) not
    yet written by an earlier attempt; each with the shard's rows to score (JSON; null: all)
    and its pieces' bounds (JSON; null: whole). And the split shards: {dst: bounds}."""
    shards = [s for s in in_manifest["shards"] if s["name"] != "quarantine.parquet"]
    todo, split = [], {}
    # split over every shard, done or not: the same pieces in every attempt (with the same
    # score.actors), so that pieces an interrupted attempt wrote are found again
    for shard, bounds in zip(shards, split_rows([s["rows"] for s in shards], actors, rows_per_task)):
        dst = out_dir / shard["name"]
        if _is_complete(dst, shard["rows"]):
            continue
        if len(bounds) > 1:
            split[str(dst)] = bounds
        for piece, (start, stop) in enumerate(bounds):
            if len(bounds) > 1 and _is_complete(part_path(dst, start, stop), stop - start):
                continue
            todo.append({"src": str(in_dir / shard["name"]), "dst": str(dst),
                         "wanted": json.dumps(wanted.get(shard["name"])),
                         "bounds": json.dumps(bounds if len(bounds) > 1 else None), "piece": piece})
    return todo, split


def _join_left(split: dict[str, list]) -> None:
    """After the actors: join the split shards no actor joined (every piece written by an
    earlier attempt, or the joining actor killed)."""
    for dst, bounds in split.items():
        if not Loc(dst).is_file() and not join_parts(Loc(dst), bounds):
            raise RuntimeError(f"score: {dst}: a piece was not scored (pieces {bounds}; see {PARTS_DIR}/)")


def _finish(in_manifest: dict, out_dir: Loc, scored: list[dict]) -> tuple[list[ShardInfo], dict]:
    """The manifest's shards and stats; ``scored``: what this attempt scored, and where
    (shards committed by an earlier, interrupted attempt are counted as such)."""
    for leftover in out_dir.iterdir():  # half-written files of actors that were killed
        if ".tmp-" in leftover.name:
            leftover.unlink()
    (out_dir / PARTS_DIR).rmtree()  # pieces of an earlier attempt's other split
    shards, rows, scored_rows, tokens, completion_tokens, logp_sum = [], 0, 0, 0, 0, 0.0
    for shard in in_manifest["shards"]:
        if shard["name"] == "quarantine.parquet":
            continue
        path = out_dir / shard["name"]
        with path.open_input() as f:
            table = pq.read_table(f, columns=["num_tokens", "ref_seq_logps", "seq_lens", "prompt_lens"])
        shards.append(ShardInfo.of(path, table.num_rows))
        rows += table.num_rows
        tokens += int(pa.compute.sum(table.column("num_tokens")).as_py() or 0)
        table = table.filter(pa.compute.is_valid(table.column("ref_seq_logps")))  # TR-DPO leaves rows unscored
        scored_rows += table.num_rows
        seq = pa.compute.list_flatten(table.column("seq_lens")).to_numpy()
        prm = pa.compute.list_flatten(table.column("prompt_lens")).to_numpy()
        completion_tokens += int((seq - prm).sum())
        logp_sum += float(pa.compute.list_flatten(table.column("ref_seq_logps")).to_numpy().astype(np.float64).sum())
    stats = {
        "rows": rows,
        "rows_scored": scored_rows,
        "tokens": tokens,
        "completion_tokens": completion_tokens,
        "mean_ref_logp_per_token": logp_sum / completion_tokens if completion_tokens else math.nan,
        "workers": _workers(scored),
        "shards_from_earlier_attempts": len(shards) - len({s["name"] for s in scored}),
    }
    counted = [s for s in scored if s["peak_tflops"]]  # actors with a known peak (and a dense model)
    capacity = sum(s["seconds"] * s["peak_tflops"] * 1e12 for s in counted)  # their busy seconds at their share of it
    if capacity:
        stats["mfu"] = sum(s["flops"] for s in counted) / capacity
    return shards, stats


def _workers(scored: list[dict]) -> list[dict]:
    """Each node that scored: its shards (a split shard counted on each node that scored a
    piece of it) and its rows."""
    workers = placement.by_node({(s["node_id"], s["name"]): s for s in scored}.values(), "shards")
    for w in workers:
        w["rows"] = sum(s["rows"] for s in scored if s["node_id"] == w["node_id"])
    return workers


def _mark(clock: PhaseClock | None, scored: list[dict]) -> None:
    """Start-up ended when the first actor had its model loaded; work, now."""
    if clock is not None and scored:
        clock.end(STARTUP, min(s["ready_at"] for s in scored))
        clock.end(WORK)


def run_in_process(cfg: PipelineConfig, in_dir: Loc, in_manifest: dict, out_dir: Loc, clock: PhaseClock | None = None):
    in_dir, out_dir = Loc(in_dir), Loc(out_dir)
    todo, split = _todo(in_dir, in_manifest, out_dir, rows_to_score(cfg, in_manifest), None, cfg.score.rows_per_task)
    scored = []
    if todo:
        scorer = ShardScorer(to_dict(cfg))
        scored = [scorer.score_item(item) for item in todo]
    _join_left(split)
    _mark(clock, scored)
    return _finish(in_manifest, out_dir, scored)


def run_on_ray(cfg: PipelineConfig, in_dir: Loc, in_manifest: dict, out_dir: Loc, clock: PhaseClock | None = None):
    from cluster import workers

    in_dir, out_dir = Loc(in_dir), Loc(out_dir)
    todo, split = _todo(in_dir, in_manifest, out_dir, rows_to_score(cfg, in_manifest), cfg.score.actors,
                        cfg.score.rows_per_task)
    scored = []
    if todo:  # shards are committed by the actors; this drives them and says where
        with workers.current() as pool:
            scored = pool.map("score", ShardScorer, {"cfg_dict": for_workers(cfg)}, "score_item", todo,
                              actors=cfg.score.actors, num_cpus=cfg.score.num_cpus_per_actor,
                              num_gpus=cfg.score.num_gpus_per_actor)
    _join_left(split)
    _mark(clock, scored)
    return _finish(in_manifest, out_dir, scored)

