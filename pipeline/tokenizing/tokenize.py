"""The tokenizing machinery's entry points: preference data -> quarantine + packed rows in
Parquet, split train/eval. The tokenize stage runs it (``stages/tokenize.py``), and the
sft stage on data of its own.

Its rooms work on plain files and tables and run without Ray:

* ``pipeline.core.sources.plan_chunks``: the inputs cut into read units with source row indices;
* ``chunk.TokenizeChunk``: a unit read, normalised and tokenised;
* ``pack.pack_and_write``: the dataset-wide checks (``checks``), the split, the packing,
  the shuffle and the plan of shards; ``pack.write_shard_group`` writes a group of them.

``run_on_ray`` places ``TokenizeChunk`` and the shard groups' writes on the run's warm actors
(``cluster.workers``); ``run_in_process`` runs the same code in-process. The driver never holds a token list.
"""

from __future__ import annotations

import json

from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import mixing, placement, sources
from pipeline.core.config import PipelineConfig, shares_prompt
from pipeline.core.models import local_dir
from pipeline.core.phases import STARTUP, WORK, PhaseClock
from pipeline.core.rundir import HashCache, ShardInfo, hash_checkpoint, hash_tree
from pipeline.core.sft_formats import SequenceRows
from pipeline.core.storage import Loc, is_uri

from .chunk import PAIR_META_SCHEMA, UNITS_DIR, TokenizeChunk
from .pack import pack_and_write, source_stats, write_groups_local, write_shard_group


STAGE_VERSION = 5  # 3: rows may share prompts; 4: data.seed seeds the split and shuffle; 5: split keyed on the row's prompt


# Settings added after the output format settled, with the default that reproduces the
# output from before them: fingerprinted only when set otherwise, so that a run directory
# made before they existed does not tokenize (and score) again.
ADDED_SETTINGS = {"prompt_too_long": "quarantine", "min_completion_tokens": 1}


def resolve_sources(cfg: PipelineConfig) -> list[sources.Source]:
    cache = Loc(cfg.run_dir) / "sources"
    if cfg.data.sources:
        found = [replace(s, group=mixing.source_name(spec)) for spec in cfg.data.sources
                 for s in ([sources.hf_dataset_source(spec["hf_dataset"], cache)] if spec.get("hf_dataset")
                           else sources.expand_inputs(mixing.files_of(spec)))]
        # a label two sources share (two hf_dataset json sources: "hf:json[train]"; one file in two
        # sources) is made the source's own, so that every record maps to its source
        groups: dict[str, set] = {}
        for s in found:
            groups.setdefault(s.label, set()).add(s.group)
        return [replace(s, label=f"{s.group}:{s.label}") if len(groups[s.label]) > 1 else s for s in found]
    if cfg.data.hf_dataset is not None:
        return [sources.hf_dataset_source(cfg.data.hf_dataset, cache)]
    return sources.expand_inputs(cfg.data.train_files)


def fingerprint_inputs(cfg: PipelineConfig, cache: HashCache) -> dict:
    """Everything that changes this stage's output (and nothing that does not)."""
    from dataclasses import asdict

    srcs = resolve_sources(cfg)
    return {
        "version": STAGE_VERSION,
        "data": {s.label: hash_tree([s.path if is_uri(s.path) else Path(s.path)], cache) for s in srcs},
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
                 sequences: bool = False, clock: PhaseClock | None = None) -> tuple[list[ShardInfo], dict]:
    """Plan the read units, tokenize them (``tokenize_units(chunks, units_dir)`` -> the
    per-pair tables), pack and write; the unit files (and inputs restaged for reading)
    are removed whatever happens. ``sequences``: the units hold one-sided pairs.
    ``clock``: the stage's phases (start-up ends when the first tokenizer is loaded,
    work when the shards are written)."""
    units_dir = Loc(out_dir) / UNITS_DIR
    try:
        chunks = sources.plan_chunks(resolve_sources(cfg), cfg.tokenize.rows_per_task, cfg.data.split,
                                     staging=units_dir / "inputs")
        drawn = None
        if cfg.data.sources:
            chunks, drawn = mixing.sample(chunks, cfg.data.sources, cfg.data.seed)
            own = mixing.columns(cfg.data.sources)  # a source's own column names travel with its units
            chunks = [dict(c, columns=json.dumps(own.get(c["group"]) or {})) for c in chunks]
        chunks = [dict(c, unit=i) for i, c in enumerate(chunks)]
        tables = tokenize_units(chunks, units_dir)
        ready = [min(tb.column("ready_at").to_pylist()) for tb in tables
                 if "ready_at" in tb.column_names and tb.num_rows]
        if clock is not None and ready:
            clock.end(STARTUP, min(ready))
        workers = [dict(zip(("node_id", "hostname"), w)) for tb in tables if "node_id" in tb.column_names
                   for w in zip(tb.column("node_id").to_pylist(), tb.column("hostname").to_pylist())]
        records = (pa.concat_tables([tb.select(PAIR_META_SCHEMA.names).cast(PAIR_META_SCHEMA) for tb in tables])
                   if tables else PAIR_META_SCHEMA.empty_table())
        shards, stats = pack_and_write(records, cfg, out_dir, chunks, write_groups, sequences)
        if clock is not None:
            clock.end(WORK)
        stats["workers"] = placement.by_node(workers or [placement.here()] * records.num_rows, "records")
        if drawn is not None:
            with (Loc(out_dir) / "quarantine.parquet").open_input() as f:
                stats["sources"] = source_stats(records, pq.read_table(f, columns=["source"]), chunks, drawn)
            for name, counts in stats["sources"].items():  # each source's own format
                counts["format"] = stats.get("source_formats", {}).get(name)  # None: no good row
        return shards, stats
    finally:
        units_dir.rmtree()


def run_in_process(cfg: PipelineConfig, out_dir: Loc, rows=None,
                   clock: PhaseClock | None = None) -> tuple[list[ShardInfo], dict]:
    """``rows``: as ``TokenizeChunk``'s (``SequenceRows``: the sft stage's own data)."""
    from pipeline.core.config import to_dict

    def tokenize_units(chunks, units_dir):
        worker = TokenizeChunk(to_dict(cfg), str(units_dir), rows)
        if clock is not None:
            clock.end(STARTUP)
        return [worker.tokenize_unit(chunk) for chunk in chunks]

    return tokenize_all(cfg, out_dir, tokenize_units, write_groups_local, sequences=isinstance(rows, SequenceRows),
                        clock=clock)


def run_on_ray(cfg: PipelineConfig, out_dir: Loc, rows=None,
               clock: PhaseClock | None = None) -> tuple[list[ShardInfo], dict]:
    from cluster import workers
    from pipeline.core.config import for_workers

    tokenize_cfg = cfg.tokenize
    shape = dict(actors=tokenize_cfg.actors, num_cpus=tokenize_cfg.num_cpus_per_actor)

    def tokenize_units(chunks, units_dir):
        with workers.current() as pool:  # per-pair columns only: the token lists stay in files
            return pool.map("tokenize", TokenizeChunk,
                            {"cfg_dict": for_workers(cfg), "units_dir": str(units_dir), "rows": rows},
                            "tokenize_item", chunks, **shape)

    def write_groups(groups):
        with workers.current() as pool:  # on the same actors, warm
            return pool.run("tokenize", write_shard_group, groups, **shape)

    return tokenize_all(cfg, out_dir, tokenize_units, write_groups, sequences=isinstance(rows, SequenceRows),
                        clock=clock)
