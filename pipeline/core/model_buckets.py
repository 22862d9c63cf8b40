"""A model in a bucket (``s3://bucket/model``) on this node: its files downloaded once into
``model.cache_dir`` under a file lock (the processes of one node never download side by
side), hashed as they stream, checked against the digest the driver pinned, and swapped in
only when complete; the marker (names, stamps, sha256) is written last."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs

from pipeline.core.config import ConfigError, ModelConfig
from pipeline.core.redaction import redact_text
from pipeline.core.storage import Loc

MARKER = ".dpo_pipeline_model.json"  # written last into a downloaded copy: its files and their hashes


def cache_root(mcfg: ModelConfig) -> Path:
    """``model.cache_dir`` on this node: ``~`` and ``$VARS`` expanded here, so that each node
    can put it on its own local disk."""
    raw = mcfg.cache_dir
    expanded = os.path.expanduser(os.path.expandvars(raw))
    if "$" in expanded:
        raise ConfigError(f"model.cache_dir: {raw!r}: an environment variable in it is not set on this node "
                          f"({os.uname().nodename})")
    return Path(expanded)


def files_digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def fetch_uri(key: str, uri: str, mcfg: ModelConfig, expect: Optional[str]) -> tuple[Path, dict[str, str]]:
    """The files under ``uri`` (top level) in this node's cache, and their sha256,
    downloaded once: a lock keeps the processes of one node from downloading side by side.
    ``expect``: the digest the driver pinned. A copy that has it is used without asking the
    bucket again; otherwise the files are downloaded into a new directory, checked, and
    only then swapped in, so a copy in use is never replaced by files that are refused."""
    from filelock import FileLock

    source = Loc(uri)
    label = redact_text(uri, env_values=[])
    root = cache_root(mcfg)
    root.mkdir(parents=True, exist_ok=True)
    local = root / (hashlib.sha256(label.encode()).hexdigest()[:16] + "-" + (source.name or "model"))
    with FileLock(str(local) + ".lock"):
        cached = _read_marker(local)
        if cached is not None and expect is not None and files_digest(_hashes(cached)) == expect:
            return local, _hashes(cached)
        listing = _listing(key, source, label.split("?", 1)[0])
        if cached is not None and expect is None and _stamps(cached) == listing:
            return local, _hashes(cached)
        for stale in root.glob(f"{local.name}.tmp-*"):  # left by a process killed while downloading
            shutil.rmtree(stale, ignore_errors=True)
        tmp = local.with_name(f"{local.name}.tmp-{os.getpid()}")
        files = _download(source, listing, tmp)
        if expect is not None and files_digest(files) != expect:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"{label.split('?', 1)[0]}: its files changed after the driver hashed them (digest "
                               f"{files_digest(files)}, pinned {expect}); rerun the pipeline so that every stage sees one "
                               f"version")
        if local.exists():
            shutil.rmtree(local)
        os.replace(tmp, local)
        return local, files


def _listing(key: str, source: Loc, label: str) -> dict[str, list]:
    """{name: [size, mtime_ns]} of the files directly under the URI, hidden ones left out
    (a model directory's subfolders, checkpoints or a merged copy, are not the model)."""
    try:
        entries = source.iterdir()
        out = {}
        for f in entries:
            info = f.info()
            if info.type == pafs.FileType.File and not f.name.startswith("."):
                out[f.name] = [info.size, info.mtime_ns]
    except OSError as e:
        raise ConfigError(f"{key}: {label}: cannot list it ({e})") from None
    if "config.json" not in out and not any(n.startswith("tokenizer") for n in out):
        raise ConfigError(f"{key}: {label}: no config.json or tokenizer files under it "
                          f"(found {sorted(out)[:5] or 'nothing'})")
    return out


def _read_marker(local: Path) -> Optional[dict]:
    try:
        return json.loads((local / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _stamps(marker: dict) -> dict:
    return {n: f["stamp"] for n, f in marker["files"].items()}


def _hashes(marker: dict) -> dict:
    return {n: f["sha256"] for n, f in marker["files"].items()}


def _download(source: Loc, listing: dict[str, list], tmp: Path) -> dict[str, str]:
    """Copy the files into ``tmp``, hashing as they stream; the marker (names, stamps,
    sha256) is written last."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hashes = {}
    for name in sorted(listing):
        h = hashlib.sha256()
        with (source / name).fs.open_input_stream((source / name).path) as f, open(tmp / name, "wb") as out:
            while chunk := f.read(1 << 24):
                h.update(chunk)
                out.write(chunk)
        hashes[name] = h.hexdigest()
    marker = {"source": redact_text(str(source), env_values=[]), "downloaded_at": time.time(),
              "files": {n: {"stamp": listing[n], "sha256": hashes[n]} for n in sorted(listing)}}
    (tmp / MARKER).write_text(json.dumps(marker, indent=1))
    return hashes
