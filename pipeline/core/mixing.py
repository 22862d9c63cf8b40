"""Dataset mixtures: ``data.sources``, as open-instruct's ``dataset_mixer_list``.

A mixture is a list of sources, each ``{name, files | hf_dataset, weight | max_pairs}``
(and, where a source's columns are named otherwise than ``data``'s, ``prompt_key``,
``chosen_key``, ``rejected_key``; each source's format is its own):

* ``files`` (a path, glob or directory, or a list of them) or ``hf_dataset`` (a
  ``datasets.load_dataset`` spec), read as ``data.train_files`` / ``data.hf_dataset`` are;
* ``weight``: the fraction of the source's rows kept (0 < weight <= 1, default 1), or
  ``max_pairs``: at most this many of its rows (a row with several rejected completions
  gives several pairs);
* ``name``: how the manifest and the report count it (default: the dataset's path, or the
  first file's name without its suffix).

Which rows are kept is drawn once on the driver, after the read plan, with
``data.seed``: ``round(weight * rows)`` (or ``min(max_pairs, rows)``) row positions
drawn without replacement from the source's rows, in the plan's order. Each read unit
carries the positions it keeps (``keep``), so the workers tokenise only those (a unit
that keeps none is not read at all), and the draw does not depend on how many workers
there are or on ``rows_per_task``.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath
from typing import Any, Callable

import numpy as np

COLUMN_KEYS = ("prompt_key", "chosen_key", "rejected_key")  # a source's own column names (default data's)
KEYS = ("name", "files", "hf_dataset", "weight", "max_pairs") + COLUMN_KEYS
CHECKS_VERSION = 2  # 2: a format per source, the quarantine's source_name


def source_name(src: dict) -> str:
    if src.get("name"):
        return str(src["name"])
    if src.get("hf_dataset"):
        return str(src["hf_dataset"].get("path"))
    first = files_of(src)[0]
    return PurePosixPath(first.rstrip("/")).name.split(".")[0] or first


def files_of(src: dict) -> list[str]:
    return [str(f) for f in (src["files"] if isinstance(src["files"], list) else [src["files"]])]


def check(sources: Any, need: Callable[[bool, str], None], check_hf_dataset: Callable[[Any, str], None]) -> None:
    """Config errors, each naming its key (``need(cond, message)`` raises)."""
    need(isinstance(sources, list) and len(sources) > 0, "data.sources: a non-empty list of sources")
    names: set[str] = set()
    for i, src in enumerate(sources):
        key = f"data.sources[{i}]"
        need(isinstance(src, dict), f"{key}: a mapping of {', '.join(KEYS)}")
        bad = sorted(set(src) - set(KEYS))
        need(not bad, f"{key}: unknown key {bad[0] if bad else ''}; valid keys: {list(KEYS)}")
        need(bool(src.get("files")) != bool(src.get("hf_dataset")), f"{key}: exactly one of files and hf_dataset")
        if src.get("files"):
            need(all(isinstance(f, str) and f for f in ([src["files"]] if isinstance(src["files"], str)
                                                       else src["files"])),
                 f"{key}.files: a path, glob or directory, or a list of them")
        else:
            check_hf_dataset(src["hf_dataset"], f"{key}.hf_dataset")
        need(not ("weight" in src and "max_pairs" in src), f"{key}: weight or max_pairs, not both")
        if "weight" in src:
            w = src["weight"]
            need(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w <= 1,
                 f"{key}.weight: the fraction of the source's rows kept, in (0, 1] (got {w!r}); a source is not "
                 "repeated (more epochs: train.num_train_epochs)")
        if "max_pairs" in src:
            m = src["max_pairs"]
            need(isinstance(m, int) and not isinstance(m, bool) and m >= 1, f"{key}.max_pairs: an integer >= 1 (got {m!r})")
        for column in COLUMN_KEYS:
            need(column not in src or (isinstance(src[column], str) and src[column]),
                 f"{key}.{column}: a column name (got {src.get(column)!r})")
        name = source_name(src)
        need(name not in names, f"{key}.name: {name!r} names two sources (give each a name)")
        names.add(name)


def settings(sources: list[dict]) -> list[dict]:
    """What the tokenize fingerprint keeps of a mixture besides the files' contents (a
    source's column names only where it sets them)."""
    return [{"name": source_name(s), "weight": s.get("weight"), "max_pairs": s.get("max_pairs"),
             "files": files_of(s) if s.get("files") else None, "hf_dataset": s.get("hf_dataset"),
             **{k: s[k] for k in COLUMN_KEYS if k in s},
             # each source its own format, source_name in the quarantine (mixtures made before re-tokenize)
             "checks": CHECKS_VERSION} for s in sources]


def columns(sources: list[dict]) -> dict[str, dict]:
    """{source name: the column names it sets}: what its read units are read by."""
    return {source_name(s): {k: s[k] for k in COLUMN_KEYS if k in s} for s in sources}


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")])


def sample(chunks: list[dict], sources: list[dict], seed: int) -> tuple[list[dict], dict[str, dict]]:
    """The read units with the positions each keeps (``keep``; units that keep none are
    left out), and per source its rows and the rows kept. ``chunks`` carry ``group`` (the
    source's name) and ``rows``, in plan order."""
    keep_of: dict[int, list[int] | None] = {}
    counts = {}
    for name, src in ((source_name(s), s) for s in sources):
        mine = [i for i, c in enumerate(chunks) if c["group"] == name]
        total = sum(chunks[i]["rows"] for i in mine)
        if "max_pairs" in src:
            k = min(int(src["max_pairs"]), total)
        else:
            k = int(round(float(src.get("weight", 1.0)) * total))
        picked = np.sort(_rng(seed, name).choice(total, size=k, replace=False)) if k < total else None
        counts[name] = {"rows": total, "sampled_rows": k}
        offset = 0
        for i in mine:
            rows = chunks[i]["rows"]
            if picked is None:
                keep_of[i] = None
            else:
                lo, hi = np.searchsorted(picked, [offset, offset + rows])
                if hi > lo:  # a unit that keeps no row is not read at all
                    keep_of[i] = (picked[lo:hi] - offset).tolist()
            offset += rows
    kept = [chunks[i] if keep is None else dict(chunks[i], keep=keep) for i, keep in sorted(keep_of.items())]
    return kept, counts
