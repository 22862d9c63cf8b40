"""Where preference rows come from: files, globs, directories, HF datasets.

An input is ``Source(label, path, kind)``: ``label`` names the rows' source in quarantine
and pair ids, ``path`` is what is read (absolute: Ray workers do not share the driver's
working directory). Kinds: ``jsonl``, ``json`` (an array of objects, or JSON Lines named
.json), ``parquet``, ``csv``, ``hf_disk`` (a directory written by ``save_to_disk``).
A ``datasets.load_dataset`` spec is loaded once on the driver and exported to Parquet
under the run directory, then read like any Parquet file.

Inputs are cut into read units (``plan_chunks``) of about ``rows_per_task`` rows, each
with the index of its first row in its source, so every row keeps its source row index
whichever worker reads it. A unit is read without parsing the rest of its file: JSON
Lines, JSON arrays and CSV by byte ranges found in one streaming pass on the driver
(``text_units``),
Parquet by row groups (a file of huge row groups is rewritten once, streamed, in smaller
ones), ``save_to_disk`` datasets by memory-mapped row ranges.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.core.config import DataError
from pipeline.core.redaction import redact_text
from pipeline.core.storage import is_uri, open_input
from pipeline.core.text_units import UTF8_BOM, _csv_chunks, _json_array_chunks, _read_csv_unit

KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Source:
    label: str
    path: str
    kind: str
    group: str | None = None  # the data.sources entry it belongs to (pipeline/core/mixing.py)


def _expand_uri(pattern: str) -> list[str]:
    """Files under a URI: the file itself, everything below a directory, or a glob's matches."""
    from pyarrow import fs

    scheme = pattern.split("://", 1)[0] + "://"
    has_glob = glob.has_magic(pattern)
    base = pattern.split("*", 1)[0].rsplit("/", 1)[0] if has_glob else pattern
    filesystem, inner = fs.FileSystem.from_uri(base)
    info = filesystem.get_file_info(inner)
    if info.type == fs.FileType.File and not has_glob:
        return [pattern]
    if info.type != fs.FileType.Directory:
        return []
    found = filesystem.get_file_info(fs.FileSelector(inner, recursive=True))
    files = sorted(f.path for f in found if f.type == fs.FileType.File)
    uris = [scheme + f for f in files]
    if has_glob:
        return [u for u in uris if fnmatch.fnmatch(u, pattern)]
    return [u for u in uris if Path(u).suffix in KINDS]


def is_hf_disk(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())


def expand_inputs(patterns: list[str]) -> list[Source]:
    """Sources from paths, globs and directories, in a stable order; an empty match or an
    unknown file type is an error naming the setting."""
    sources: list[Source] = []
    for pattern in patterns:
        if is_uri(pattern):
            found = _expand_uri(pattern)
            if not found:
                raise FileNotFoundError(f"data.train_files: {redact_text(pattern)!r} matches no file")
            for f in found:
                kind = KINDS.get(Path(f).suffix)
                if kind is None:
                    raise DataError(f"data.train_files: {redact_text(f)!r} is not .jsonl, .json, .parquet or .csv")
                sources.append(Source(redact_text(f), f, kind))  # the label is written down
            continue
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        found: list[str] = []
        for m in matches:
            if is_hf_disk(m):
                found.append(m)
            elif os.path.isdir(m):
                found += sorted(str(p) for p in Path(m).rglob("*") if p.suffix in KINDS and p.is_file())
            elif os.path.isfile(m):
                found.append(m)
        if not found:
            raise FileNotFoundError(f"data.train_files: {pattern!r} matches no file")
        for f in found:
            kind = "hf_disk" if is_hf_disk(f) else KINDS.get(Path(f).suffix)
            if kind is None:
                raise DataError(f"data.train_files: {f!r} is not .jsonl, .json, .parquet, .csv "
                                 "or a save_to_disk directory")
            sources.append(Source(f, os.path.abspath(f), kind))
    return sources


def hf_dataset_source(spec: dict, cache_dir) -> Source:
    """``datasets.load_dataset(**spec)`` exported to Parquet once (content-named), under
    ``cache_dir`` (a ``Loc`` in the run directory, so Ray workers on any node read it)."""
    import tempfile

    import datasets

    split = spec.get("split", "train")
    ds = datasets.load_dataset(spec["path"], name=spec.get("name"), split=split,
                               data_files=spec.get("data_files"), revision=spec.get("revision"))
    digest = hashlib.sha256(json.dumps([spec, ds._fingerprint], sort_keys=True, default=str).encode()).hexdigest()[:16]
    out = cache_dir / f"{digest}.parquet"
    if not out.exists():
        with tempfile.TemporaryDirectory() as tmp:
            ds.to_parquet(os.path.join(tmp, out.name))
            out.upload(Path(tmp) / out.name)
    return Source(f"hf:{spec['path']}[{split}]", str(out), "parquet")


def _load_hf_disk(path: str, split: str):
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data.split: {path} has splits {sorted(ds)}, not {split!r}")
        ds = ds[split]
    return ds


def _jsonl_chunks(source: Source, rows_per_task: int) -> list[dict]:
    offsets, line, size = [0], 0, 0
    with open_input(source.path) as f:
        for raw in io.BufferedReader(f) if is_uri(source.path) else f:
            line += 1
            size += len(raw)
            if line % rows_per_task == 0:
                offsets.append(size)
    if offsets[-1] != size:
        offsets.append(size)
    return [dict(start=offsets[i], stop=offsets[i + 1], first_row=i * rows_per_task,
                 rows=min(rows_per_task, line - i * rows_per_task), kind="jsonl") for i in range(len(offsets) - 1)]


def _range_chunks(n: int, rows_per_task: int, kind: str) -> list[dict]:
    return [dict(start=s, stop=min(s + rows_per_task, n), first_row=s, rows=min(rows_per_task, n - s), kind=kind)
            for s in range(0, n, rows_per_task)]


def _parquet_chunks(path: str, rows_per_task: int, staging) -> list[dict]:
    """Read units of whole row groups. A file whose row groups are much larger than a unit
    (a file written as one row group) is first rewritten under ``staging`` with row groups
    of ``rows_per_task`` rows, streamed a batch at a time, so its units can run in parallel."""
    pf = pq.ParquetFile(open_input(path))
    meta = pf.metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    if staging is not None and max(sizes, default=0) > 2 * rows_per_task:
        staged = staging / f"{hashlib.sha256(path.encode()).hexdigest()[:16]}.parquet"

        def rewrite(loc) -> None:
            with pq.ParquetWriter(loc.path, pf.schema_arrow, filesystem=loc.fs) as writer:
                for batch in pf.iter_batches(batch_size=rows_per_task):
                    writer.write_batch(batch)

        staged.write_with(rewrite)
        path = str(staged)
        meta = pq.ParquetFile(open_input(path)).metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    parts, first, rows, start = [], 0, 0, 0
    for g, size in enumerate(sizes):
        rows += size
        if rows >= rows_per_task or g == len(sizes) - 1:
            parts.append(dict(start=start, stop=g + 1, first_row=first, rows=rows, kind="parquet", path=path))
            first, rows, start = first + rows, 0, g + 1
    return parts


def plan_chunks(sources: list[Source], rows_per_task: int, split: str = "train", staging=None) -> list[dict]:
    """Read units: {label, path, kind, start, stop, first_row, rows, split, group}, each read without
    parsing the rest of its file. ``staging`` (a ``Loc``) is where a Parquet file of huge
    row groups is rewritten in smaller ones; without it such a file is one unit per group."""
    chunks = []
    for src in sources:
        if src.kind == "jsonl":
            parts = _jsonl_chunks(src, rows_per_task)
        elif src.kind == "json":
            parts = _json_array_chunks(src.path, rows_per_task)
            if parts is None:  # JSON Lines named .json
                parts = _jsonl_chunks(src, rows_per_task)
        elif src.kind == "parquet":
            parts = _parquet_chunks(src.path, rows_per_task, staging)
        elif src.kind == "csv":
            parts = _csv_chunks(src.path, rows_per_task)
        else:
            parts = _range_chunks(len(_load_hf_disk(src.path, split)), rows_per_task, "hf_disk")
        chunks += [dict(dict(label=src.label, path=src.path, split=split, group=src.group or src.label), **p)
                   for p in parts]
    return chunks


def read_chunk(chunk: dict) -> list[tuple[int, dict | None, str | None]]:
    """[(source row index, row or None when unparseable, raw text when there is one)]"""
    kind, start, stop, first = chunk["kind"], chunk["start"], chunk["stop"], chunk["first_row"]
    if kind == "jsonl":
        with open_input(chunk["path"]) as f:
            f.seek(start)
            data = f.read(stop - start)
        if start == 0 and data.startswith(UTF8_BOM):
            data = data[len(UTF8_BOM):]
        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()
        out = []
        for i, line in enumerate(lines):
            text = line.decode("utf-8", errors="replace")
            if not text.strip():
                continue  # a blank line is not a row
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                row = None
            out.append((first + i, row if isinstance(row, dict) else None, text))
        return out
    if kind == "parquet":
        rows = pq.ParquetFile(open_input(chunk["path"])).read_row_groups(list(range(start, stop))).to_pylist()
    elif kind == "json":
        with open_input(chunk["path"]) as f:
            f.seek(start)
            rows = json.loads(b"[" + f.read(stop - start) + b"]")
    elif kind == "csv":
        rows = _read_csv_unit(chunk).to_pylist()
    else:
        rows = _load_hf_disk(chunk["path"], chunk["split"]).select(range(start, stop)).to_list()
    return [(first + i, row if isinstance(row, dict) else None, None) for i, row in enumerate(rows)]
