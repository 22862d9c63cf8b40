"""score: packed rows -> the same rows plus reference log-prob columns.

Each input shard maps to one output shard of the same name, committed whole (a local
file is renamed into place; an object-store PUT is atomic), so a crashed run leaves only
whole shards and the next run scores only the missing ones: a shard counts when its
Parquet footer reads and has the input's row count. The scorer is a callable class (Ray's batch-inference
shape): the reference model is loaded once in ``__init__``, in eval mode with dropout
off, and ``__call__`` scores one shard per call.

Columns added: ``ref_logps`` (float32 per token, aligned with ``input_ids``, 0 outside
completions) and ``ref_seq_logps`` (float32 per segment: the completion's sum), so the
trainer can change the aggregation without re-scoring.

With TR-DPO (``train.sync_ref_model``) only the rows the steps before the first reference
refresh train on, and the eval rows, are scored; the other train rows hold nulls in both
columns, since the train ranks rescore each later segment's rows with the refreshed
reference before its steps (docs/tr-dpo.md). Each train row is then scored once an epoch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.core.config import PipelineConfig, config_from_dict, for_workers, to_dict
from pipeline.core.devices import require_gpu
from pipeline.core.logps import packed_token_logps
from pipeline.core.segments import segment_sums
from pipeline.core import placement
from pipeline.core.modeling import load_causal_lm, row_inputs
from pipeline.core.models import local_dir
from pipeline.core.rundir import HashCache, ShardInfo, hash_checkpoint, read_manifest
from pipeline.core.stage import RunContext, Stage
from pipeline.core.storage import Loc
from pipeline.core.rows import ROW_GROUP_ROWS
from pipeline.training.plan import first_segment_rows, first_segment_settings

STAGE_VERSION = 1

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

    def score_shard(self, src: str, dst: str, wanted: list[int] | None = None) -> dict:
        src_loc, final = Loc(src), Loc(dst)
        with src_loc.open_input() as f:
            table = pq.read_table(f)
        scored = self.score_table(table, wanted)
        final.write_parquet(scored, row_group_size=ROW_GROUP_ROWS)
        return {"name": final.name, "rows": scored.num_rows, **placement.here()}

    def __call__(self, batch: dict) -> dict:
        results = [self.score_shard(s, d, json.loads(w))
                   for s, d, w in zip(batch["src"], batch["dst"], batch["wanted"])]
        return {k: [r[k] for r in results] for k in ("name", "rows", "node_id", "hostname")}


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


def _todo(in_dir: Loc, in_manifest: dict, out_dir: Loc, wanted: dict[str, list[int]]) -> list[dict]:
    """The shards to score, each with the rows of it to score (JSON; null: all)."""
    todo = []
    for shard in in_manifest["shards"]:
        if shard["name"] == "quarantine.parquet":
            continue
        dst = out_dir / shard["name"]
        if not _is_complete(dst, shard["rows"]):
            todo.append({"src": str(in_dir / shard["name"]), "dst": str(dst),
                         "wanted": json.dumps(wanted.get(shard["name"]))})
    return todo


def _finish(in_manifest: dict, out_dir: Loc, scored: list[dict]) -> tuple[list[ShardInfo], dict]:
    """The manifest's shards and stats; ``scored``: what this attempt scored, and where
    (shards committed by an earlier, interrupted attempt are counted as such)."""
    for leftover in out_dir.iterdir():  # half-written files of actors that were killed
        if ".tmp-" in leftover.name:
            leftover.unlink()
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
        "workers": placement.by_node(scored, "shards"),
        "shards_from_earlier_attempts": len(shards) - len({s["name"] for s in scored}),
    }
    return shards, stats


def run_in_process(cfg: PipelineConfig, in_dir: Loc, in_manifest: dict, out_dir: Loc):
    in_dir, out_dir = Loc(in_dir), Loc(out_dir)
    todo = _todo(in_dir, in_manifest, out_dir, rows_to_score(cfg, in_manifest))
    scored = []
    if todo:
        scorer = ShardScorer(to_dict(cfg))
        scored = [scorer.score_shard(item["src"], item["dst"], json.loads(item["wanted"])) for item in todo]
    return _finish(in_manifest, out_dir, scored)


def run_on_ray(cfg: PipelineConfig, in_dir: Loc, in_manifest: dict, out_dir: Loc):
    import ray

    in_dir, out_dir = Loc(in_dir), Loc(out_dir)
    todo = _todo(in_dir, in_manifest, out_dir, rows_to_score(cfg, in_manifest))
    scored = []
    if todo:
        score_cfg = cfg.score
        ds = ray.data.from_items(todo).map_batches(
            ShardScorer,
            fn_constructor_kwargs={"cfg_dict": for_workers(cfg)},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(score_cfg.actors, len(todo))),
            num_cpus=score_cfg.num_cpus_per_actor,
            num_gpus=score_cfg.num_gpus_per_actor,
        )
        scored = ds.take_all()  # shards are committed by the actors; this drives them and says where
    return _finish(in_manifest, out_dir, scored)


# ----------------------------------------------------------------------------- the stage's door


def _run(ctx: RunContext):
    rows = ctx.dir("tokenize")
    return (run_on_ray if ctx.use_ray else run_in_process)(ctx.cfg, rows, read_manifest(rows), ctx.out)


def _needed(cfg: PipelineConfig) -> str | None:
    from pipeline.core.config import build_loss

    return None if build_loss(cfg.train).needs_reference else "the loss is reference-free"


STAGE = Stage(
    name="score",
    # with sft, its export is the reference: its fingerprint stands for it
    fingerprint_inputs=lambda cfg, cache, fingerprints: fingerprint_inputs(cfg, cache, fingerprints["tokenize"],
                                                                           sft=fingerprints.get("sft")),
    run=_run,
    needed=_needed,
    reads=lambda cfg, planned: {"tokenize"} | ({"sft"} & planned),
    models=("reference_path",),
    loads={"sft": "reference_path"},
    gpus=lambda cfg: ({"score.num_gpus_per_actor": float(cfg.score.num_gpus_per_actor)}
                      if cfg.score.num_gpus_per_actor > 0 else {}),  # at least one actor's worth
    resumes=True,
    # a partial output keeps its committed shards and scores only the missing ones
    partial=lambda out: {"rows": f"{len(out.glob('*.parquet'))} shards"},
)
