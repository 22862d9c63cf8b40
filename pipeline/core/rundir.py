"""Run directory layout, content fingerprints and manifests.

``<run_dir>/<stage>/<fingerprint>/`` holds a stage's shards and, written last, its
``_MANIFEST.json``: the only commit marker. A stage is done when its manifest exists and
every shard it lists has the recorded size. The run directory is a local path or a URI
(``pipeline.core.storage.Loc``); on a local path files are written to a temporary name and
renamed, so a reader never sees half a shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pipeline.core.redaction import redact_text, redact_values
from pipeline.core.storage import Loc

MANIFEST = "_MANIFEST.json"


# ----------------------------------------------------------------------------- hashing


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class HashCache:
    """Content hashes of large files cached by (path, size, mtime_ns).

    A rerun does not re-read gigabytes of weights; any change of size or mtime re-hashes.
    """

    def __init__(self, path: Loc):
        self.path = Loc(path)
        try:
            self.entries: dict[str, Any] = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.entries = {}

    def file(self, path: Path | str) -> str:
        if "://" in str(path):
            return self.uri(str(path))
        path = Path(path)
        st = path.stat()
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self.entries.get(key)
        if hit and hit["stamp"] == stamp:
            return hit["sha256"]
        digest = sha256_file(path)
        self.entries[key] = {"stamp": stamp, "sha256": digest}
        self.save()
        return digest

    def uri(self, uri: str) -> str:
        """The same for a pyarrow-filesystem URI, keyed by (uri, size, mtime)."""
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(inner)
        stamp = [info.size, info.mtime_ns]
        key = redact_text(uri)  # the cache file is written: no credential in it
        hit = self.entries.get(key)
        if hit and hit["stamp"] == stamp and stamp[1] is not None:
            return hit["sha256"]
        h = hashlib.sha256()
        with filesystem.open_input_stream(inner) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        self.entries[key] = {"stamp": stamp, "sha256": h.hexdigest()}
        self.save()
        return h.hexdigest()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.entries, indent=0, sort_keys=True))


def hash_tree(paths: Iterable[Path], cache: HashCache) -> dict[str, str]:
    """{name: sha256} of files; directories are walked (names relative to the directory,
    hidden files skipped), plain files are named by their path as given."""
    out = {}
    for p in paths:
        if "://" in str(p):  # named without its credentials: rotating a key changes no fingerprint
            out[redact_text(str(p), env_values=[])] = cache.file(str(p))
            continue
        p = Path(p)
        if p.is_dir():
            for f in sorted(f for f in p.rglob("*") if f.is_file()):
                rel = f.relative_to(p)
                if not any(part.startswith(".") for part in rel.parts):
                    out[str(rel)] = cache.file(f)
        else:
            out[str(p)] = cache.file(p)
    return out


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def checkpoint_files(directory: str, kind: str) -> list[Path]:
    """Files of an HF checkpoint directory that define its tokenizer or its model.

    kind "tokenizer": the tokenizer files and chat template; kind "model": config and
    weights (the tokenizer does not change log-probs of given token ids). Both kinds also
    include the directory's ``*.py`` files: with ``model.trust_remote_code`` transformers
    runs them (its modelling or tokenizer code, and what they import relatively, all
    top-level files), so changed code changes the fingerprint. They are hashed whether or
    not the flag is set: the fingerprint does not depend on reading the config right, and
    a model directory without code (every tiny test model) hashes as before."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    if kind == "tokenizer":
        files = [d / n for n in TOKENIZER_FILES if (d / n).is_file()]
    else:
        files = [d / "config.json"] if (d / "config.json").is_file() else []
        files += model_weight_files(d)
    if not files:
        raise FileNotFoundError(f"no {kind} files in {directory}")
    return files + [f for f in sorted(d.glob("*.py")) if f.is_file()]


def model_weight_files(d: Path) -> list[Path]:
    """The weight files transformers loads from a checkpoint directory, and their index:
    safetensors before .bin before .pt/.pth; with an index, the files it lists (Mistral's
    repositories also hold consolidated.safetensors, a second copy the index does not
    name); without one, model.safetensors where there is one."""
    for suffix in WEIGHT_SUFFIXES:
        found = sorted(f for f in d.iterdir() if f.is_file() and f.suffix == suffix)
        if not found:
            continue
        index = d / f"model{suffix}.index.json" if suffix != ".bin" else d / "pytorch_model.bin.index.json"
        if index.is_file():
            listed = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            return [index] + [d / name for name in listed]
        single = d / ("model.safetensors" if suffix == ".safetensors" else "pytorch_model.bin")
        return [single] if single.is_file() else found
    return []


def hash_checkpoint(directory: str, kind: str, cache: HashCache) -> dict[str, str]:
    """{file name: sha256} of a checkpoint's tokenizer or model files: content, not path."""
    return {f.name: cache.file(f) for f in checkpoint_files(directory, kind)}


def fingerprint(payload: Any) -> str:
    """A short content hash of a JSON-able payload (16 hex chars = 64 bits)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- files


def atomic_write_text(path: Path, text: str) -> None:
    """A local file written whole (temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- manifests


@dataclass
class ShardInfo:
    name: str
    rows: int
    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: Loc, rows: int, base: Loc | None = None) -> "ShardInfo":
        """``name`` is relative to the stage directory (``base``, default the parent)."""
        path = Loc(path)
        name = path.relative_to(Loc(base)) if base is not None else path.name
        return cls(name, rows, path.size(), path.sha256())


def shard_ok(stage_dir: Loc, shard: dict) -> bool:
    return (Loc(stage_dir) / shard["name"]).size() == shard["bytes"]


def read_manifest(stage_dir: Loc) -> dict | None:
    try:
        return json.loads((Loc(stage_dir) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def stage_state(stage_dir: Loc) -> str:
    """done | partial | missing."""
    stage_dir = Loc(stage_dir)
    manifest = read_manifest(stage_dir)
    if manifest is not None and all(shard_ok(stage_dir, s) for s in manifest["shards"]):
        return "done"
    if stage_dir.iterdir():
        return "partial"
    return "missing"


def write_manifest(
    stage_dir: Loc,
    *,
    stage: str,
    fp: str,
    inputs: dict,
    settings: dict,
    shards: list[ShardInfo],
    stats: dict,
    seconds: float,
    models: dict | None = None,
    phases: dict | None = None,
) -> dict:
    manifest = {
        "stage": stage,
        "fingerprint": fp,
        "inputs": inputs,
        "settings": settings,
        **({"models": models} if models else {}),  # where each model came from (a Hub commit ...)
        "shards": [s.__dict__ for s in shards],
        "stats": stats,
        "seconds": round(seconds, 3),
        **({"phases": phases} if phases else {}),  # start-up, work, shutdown (core/phases.py)
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest = redact_values(manifest)  # data labels, paths and stats hold no credential
    (Loc(stage_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
    return manifest


def check_run_dir(run_dir: str, environ: dict | None = None) -> None:
    """Refuse a relative ``run_dir`` in a job submitted with ``ray job submit``: the job runs
    in Ray's temporary copy of its working directory, deleted when the job ends, so the
    outputs would be lost with it."""
    from pipeline.core.config import ConfigError

    environ = os.environ if environ is None else environ
    job = environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray Jobs for the entrypoint
    if not job or "://" in run_dir or os.path.isabs(os.path.expanduser(run_dir)):
        return
    try:
        working_dir = (json.loads(job).get("runtime_env") or {}).get("working_dir")
    except ValueError:  # not JSON: no working directory to name
        working_dir = None
    where = f"Ray's temporary copy of the job's working directory ({working_dir})" if working_dir else \
        "a directory Ray manages for the job"
    raise ConfigError(f"run_dir: {run_dir!r} is relative, and under `ray job submit` it would resolve inside "
                      f"{where}, which is deleted when the job ends: the outputs would be lost. Use an absolute "
                      f"path on storage every node sees, or a URI (s3://bucket/prefix)")
