"""Where a model or tokenizer comes from: a local directory, a Hub id, or a bucket URI.

``model.path``, ``model.reference_path`` and ``model.tokenizer_path`` name one of:

* a local directory (an existing directory of that name wins over a Hub id);
* a Hub id, ``org/name``, at ``model.revision`` (or ``org/name@revision``), fetched
  through ``huggingface_hub``: its cache, ``HF_HOME``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``;
* a URI pyarrow opens (``s3://``, ``gs://``, ``hdfs://``, ``file://``): the files under it
  are downloaded once per node into ``model.cache_dir`` and checked against the hashes
  the driver took.

The driver resolves each name once (``pin``): a Hub id to the commit its revision points
to, a URI to the digest of its files' sha256. The workers receive the pinned names, so
every node loads the same commit, and a bucket whose files changed after the driver
hashed them is refused instead of trained on. ``local_dir`` turns any of these names into
a local directory on the node it runs on. Fingerprints hash the files themselves, so the
same files give the same fingerprints whatever they are called.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from pipeline.config import ConfigError, ModelConfig, PipelineConfig
from pipeline.redaction import redact_text
from pipeline.storage import Loc, is_uri

MODEL_KEYS = ("path", "reference_path", "tokenizer_path")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
MARKER = ".dpo_pipeline_model.json"  # written last into a downloaded copy: its files and their hashes
# Weight files other than the one format transformers loads (safetensors, else .bin) are
# never fetched from the Hub: Llama 3.1 ships an 16 GB original/consolidated.pth beside them.
HUB_IGNORE = ["original/*", "*.pth", "*.pt", "*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite"]


@dataclass(frozen=True)
class Pinned:
    """One resolved name: what the manifest records of it, and the name the workers get."""

    key: str  # model.path ...
    name: str  # as configured
    kind: str  # local | hub | uri
    pinned: str  # local: absolute path; hub: org/name@commit; uri: uri#sha256=digest
    revision: Optional[str] = None  # hub: the revision asked for
    commit: Optional[str] = None  # hub: the commit it pointed to
    digest: Optional[str] = None  # uri: sha256 over its files' sha256

    def record(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "key"}
        return json.loads(redact_text(json.dumps(out), env_values=[]))


# ----------------------------------------------------------------------------- naming


def split_revision(name: str) -> tuple[str, Optional[str]]:
    """``org/name@rev`` -> (``org/name``, ``rev``); a name without ``@`` -> (name, None)."""
    if "@" in name and not is_uri(name):
        repo, rev = name.rsplit("@", 1)
        return repo, rev or None
    return name, None


def _split_digest(uri: str) -> tuple[str, Optional[str]]:
    if "#sha256=" in uri:
        base, digest = uri.rsplit("#sha256=", 1)
        return base, digest
    return uri, None


def kind_of(name: str) -> str:
    if is_uri(name):
        return "uri"
    if Path(name).expanduser().is_dir():
        return "local"
    return "hub"


def _revision_for(key: str, name: str, mcfg: ModelConfig) -> tuple[str, Optional[str]]:
    repo, rev = split_revision(name)
    if rev is not None and key == "path" and mcfg.revision is not None and rev != mcfg.revision:
        raise ConfigError(f"model.path: {name!r} names revision {rev!r} and model.revision is {mcfg.revision!r}; "
                          f"give one of them")
    # model.revision belongs to model.path, and to the keys that default to it
    return repo, rev if rev is not None else (mcfg.revision if name == mcfg.path else None)


# ----------------------------------------------------------------------------- the driver


def pin(cfg: PipelineConfig) -> tuple[PipelineConfig, dict[str, Pinned]]:
    """The config with every model name resolved (on the driver, before any stage starts),
    and what was resolved. A name that does not resolve is a ``ConfigError`` naming its key."""
    mcfg = cfg.model
    names = {"path": mcfg.path, "reference_path": cfg.reference_path, "tokenizer_path": cfg.tokenizer_path}
    done: dict[str, Pinned] = {}
    by_name: dict[str, Pinned] = {}
    for key, name in names.items():
        if name not in by_name:
            by_name[name] = _pin_one(f"model.{key}", name, mcfg)
        done[key] = dataclasses.replace(by_name[name], key=f"model.{key}")
    model = dataclasses.replace(mcfg, revision=None, **{k: done[k].pinned for k in MODEL_KEYS})
    return dataclasses.replace(cfg, model=model), done


def _pin_one(key: str, name: str, mcfg: ModelConfig) -> Pinned:
    kind = kind_of(name)
    if kind == "local":
        return Pinned(key, name, "local", str(Path(name).expanduser().resolve()))
    if kind == "uri":
        base, _ = _split_digest(name)
        digest = _digest(_fetch_uri(key, base, mcfg, expect=None)[1])
        return Pinned(key, name, "uri", f"{base}#sha256={digest}", digest=digest)
    repo, rev = _revision_for(key.split(".", 1)[1], name, mcfg)
    snapshot = _hub_snapshot(key, repo, rev)
    commit = Path(snapshot).name
    return Pinned(key, name, "hub", f"{repo}@{commit}", revision=rev or "main", commit=commit)


# ----------------------------------------------------------------------------- any node


def local_dir(name: str, mcfg: ModelConfig) -> str:
    """A local directory holding the files ``name`` stands for, on this node."""
    kind = kind_of(name)
    if kind == "local":
        return str(Path(name).expanduser().resolve())
    if kind == "uri":
        base, digest = _split_digest(name)
        return str(_fetch_uri("model", base, mcfg, expect=digest)[0])
    repo, rev = _revision_for("path" if name == mcfg.path else "", name, mcfg)
    return _hub_snapshot("model", repo, rev)


# ----------------------------------------------------------------------------- the Hub


def _hub_snapshot(key: str, repo: str, revision: Optional[str]) -> str:
    """The snapshot directory of ``repo`` at ``revision`` in the Hub cache (downloaded if
    the Hub is reachable and the files are not cached). Weights: safetensors, or .bin
    where a repository has no safetensors."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    if not HUB_ID.match(repo):
        raise ConfigError(f"{key}: {repo!r} is not a local directory, a URI or a Hub model id (org/name)")
    where = f"{repo!r} at revision {revision or 'main'!r}"
    try:
        path = snapshot_download(repo, revision=revision, ignore_patterns=HUB_IGNORE + ["*.bin"])
        if not any(Path(path).glob("*.safetensors")) and not list(Path(path).glob("*.bin")):
            path = snapshot_download(repo, revision=revision, ignore_patterns=HUB_IGNORE)
    except RevisionNotFoundError as e:
        raise ConfigError(f"{key}: {where}: the revision does not exist ({_first_line(e)})") from None
    except RepositoryNotFoundError as e:
        raise ConfigError(f"{key}: {where}: no such model on the Hub, or it is private and HF_TOKEN "
                          f"does not grant it ({_first_line(e)})") from None
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else " and the Hub cannot be reached"
        refs = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")) / "refs"
        cached = sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
        what = f"the revision is not in the Hub cache (cached revisions: {', '.join(cached)})" if cached else \
            "it is not a local directory, and the model is not in the Hub cache"
        raise ConfigError(f"{key}: {where}: {what} {constants.HF_HUB_CACHE}{offline}") from None
    except HfHubHTTPError as e:
        raise ConfigError(f"{key}: {where}: the Hub refused it ({_first_line(e)})") from None
    return path


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ----------------------------------------------------------------------------- buckets


def cache_root(mcfg: ModelConfig) -> Path:
    """``model.cache_dir`` on this node: ``~`` and ``$VARS`` expanded here, so that each node
    can put it on its own local disk."""
    raw = mcfg.cache_dir
    expanded = os.path.expanduser(os.path.expandvars(raw))
    if "$" in expanded:
        raise ConfigError(f"model.cache_dir: {raw!r}: an environment variable in it is not set on this node "
                          f"({os.uname().nodename})")
    return Path(expanded)


def _digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def _fetch_uri(key: str, uri: str, mcfg: ModelConfig, expect: Optional[str]) -> tuple[Path, dict[str, str]]:
    """The files under ``uri`` in this node's cache, and their sha256, downloaded once (a lock keeps the
    processes of one node from downloading it side by side). ``expect``: the digest the
    driver pinned; a copy that does not match it is downloaded again, and files that
    still do not match are refused."""
    from filelock import FileLock

    source = Loc(uri)
    label = redact_text(uri, env_values=[]).split("?", 1)[0]
    root = cache_root(mcfg)
    root.mkdir(parents=True, exist_ok=True)
    local = root / (hashlib.sha256(label.encode()).hexdigest()[:16] + "-" + (source.name or "model"))
    with FileLock(str(local) + ".lock"):
        listing = _listing(key, source, label)
        cached = _read_marker(local)
        if cached is not None and _stamps(cached) == listing and (expect is None or _digest(_hashes(cached)) == expect):
            return local, _hashes(cached)
        files = _download(source, listing, local)
        if expect is not None and _digest(files) != expect:
            raise RuntimeError(f"{label}: its files changed after the driver hashed them (digest {_digest(files)}, "
                               f"pinned {expect}); rerun the pipeline so that every stage sees one version")
        return local, files


def _listing(key: str, source: Loc, label: str) -> dict[str, list]:
    """{relative name: [size, mtime_ns]} of the files under the URI, hidden ones left out."""
    try:
        files = source.files()
    except OSError as e:
        raise ConfigError(f"{key}: {label}: cannot list it ({e})") from None
    out = {}
    for f in files:
        rel = f.relative_to(source)
        if not any(part.startswith(".") for part in PurePosixPath(rel).parts):
            info = f.info()
            out[rel] = [info.size, info.mtime_ns]
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


def _download(source: Loc, listing: dict[str, list], local: Path) -> dict[str, str]:
    """Copy the files into a fresh directory beside ``local``, hashing as they stream, then
    swap it in; the marker (names, stamps, sha256) is written last."""
    tmp = local.with_name(f"{local.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    hashes = {}
    for rel, _ in sorted(listing.items()):
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with (source / rel).fs.open_input_stream((source / rel).path) as f, open(dst, "wb") as out:
            while chunk := f.read(1 << 24):
                h.update(chunk)
                out.write(chunk)
        hashes[rel] = h.hexdigest()
    marker = {"source": redact_text(str(source), env_values=[]), "downloaded_at": time.time(),
              "files": {n: {"stamp": listing[n], "sha256": hashes[n]} for n in sorted(listing)}}
    (tmp / MARKER).write_text(json.dumps(marker, indent=1))
    if local.exists():
        shutil.rmtree(local)
    os.replace(tmp, local)
    return hashes
