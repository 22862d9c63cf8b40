"""The dataset-wide checks, on the driver over the per-pair table: one format per
dataset, duplicates, the bad-row fraction; and the quarantined rows' raw input filled in."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa

from pipeline.core import mixing, sources
from pipeline.core.config import PipelineConfig


def dataset_checks(records: pa.Table, cfg: PipelineConfig, chunks: list[dict] | None = None) -> tuple[pa.Table, dict]:
    """Quarantine what only the whole dataset reveals: rows whose format is not their
    source's (each source of a mixture, ``data.sources``, has its own: the format most of
    its good rows have), and (with ``data.duplicates: drop``) repeated pairs. ``records``
    is sorted; ``chunks`` map each record's file to its mixture source."""
    # a mixture's sources (data.sources); a plain run's files are one dataset
    group = {c["label"]: c.get("group") or "" for c in chunks or []} if cfg.data.sources else {}
    good = records.column("reason").is_null().to_pylist()
    fmts = records.column("format").to_pylist()
    labels = records.column("source").to_pylist()
    groups = [group.get(label, "") for label in labels]
    counts = Counter(f for f, ok in zip(fmts, good) if ok)
    by_group: dict[str, Counter] = {}
    for f, ok, g in zip(fmts, good, groups):
        if ok:
            by_group.setdefault(g, Counter())[f] += 1
    formats = {g: c.most_common(1)[0][0] for g, c in by_group.items()}
    dataset_format = counts.most_common(1)[0][0] if counts else None
    reasons = records.column("reason").to_pylist()
    details = records.column("detail").to_pylist()
    one = len(cfg.data.sources or []) <= 1
    prompt_key = {name: cols.get("prompt_key", cfg.data.prompt_key)
                  for name, cols in mixing.columns(cfg.data.sources or []).items()}
    for i, (fmt, ok, g) in enumerate(zip(fmts, good, groups)):
        if ok and fmt != formats[g]:
            theirs = f"the dataset is {formats[g]}" if one else f"source {g} is {formats[g]}"
            explicit = not formats[g].startswith("implicit")
            reasons[i] = "missing_field" if explicit and fmt.startswith("implicit") else "mixed_formats"
            details[i] = (f"{prompt_key.get(g, cfg.data.prompt_key)} ({theirs})" if reasons[i] == "missing_field"
                          else f"{theirs}, this row is {fmt}")
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
                     **({"source_formats": dict(sorted(formats.items()))} if cfg.data.sources else {}),
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
