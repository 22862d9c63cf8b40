"""Where a model or tokenizer comes from: a local directory, a Hub id, or a bucket URI.

``model.path``, ``model.reference_path`` and ``model.tokenizer_path`` name one of:

* a local directory (an existing directory of that name wins over a Hub id; a name that
  starts with ``/``, ``./``, ``../`` or ``~`` is a path, and one that is not a directory is
  refused, never taken for a Hub id);
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
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from pipeline.core.config import ConfigError, ModelConfig, PipelineConfig
from pipeline.core.redaction import redact_text
from pipeline.core.model_buckets import files_digest, fetch_uri
from pipeline.core.storage import is_uri

MODEL_KEYS = ("path", "reference_path", "tokenizer_path")
KIND_OF_KEY = {"path": "model", "reference_path": "model", "tokenizer_path": "tokenizer"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# What is fetched from the Hub, top-level files only: a tokenizer's files, or a model's
# config, weights and tokenizer. Never original/*.pth (Llama 3.1: 16 GB), Mistral's
# consolidated.safetensors (a second copy of the weights), GGUF or TF/Flax weights.
HUB_FILES = {
    "tokenizer": ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                  "chat_template.json", "chat_template.jinja", "*.tiktoken", "config.json", "*.py"],
    "model": ["*.json", "*.safetensors", "*.py", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
}
HUB_SKIP = ["*/*", "consolidated*"]
# The environment huggingface_hub reads; the driver resolves Hub ids with its own.
HUB_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT")


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
    # a model this run trained (the sft export): sha256 over its files as its stage's manifest
    # committed them, wherever it lies (runner.stale_output compares them)
    export_digest: Optional[str] = None

    def record(self) -> dict:
        """What a manifest records (write_manifest redacts credentials in it, as in all of it)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "key"}


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


PATH_PREFIXES = ("/", "./", "../", "~")  # how a path is written; a Hub id never starts so


def kind_of(name: str) -> str:
    if is_uri(name):
        return "uri"
    if name.startswith(PATH_PREFIXES) or Path(name).expanduser().is_dir():
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
    """The config with every model name the run loads resolved (on the driver, before any
    stage starts), and what was resolved. A name that does not resolve is a ``ConfigError``
    naming its key. A reference-free loss loads no reference: its name is left alone."""
    from pipeline.core.config import build_loss

    mcfg = cfg.model
    names = {"path": mcfg.path, "tokenizer_path": cfg.tokenizer_path}
    # with sft the reference is its export; generate loads the reference whatever the loss
    if (build_loss(cfg.train).needs_reference or cfg.generate.enabled) and not cfg.sft.enabled:
        names["reference_path"] = cfg.reference_path
    _check_names(cfg, names)
    kinds: dict[str, set] = {}
    for key, name in names.items():
        kinds.setdefault(name, set()).add(KIND_OF_KEY[key])
    by_name = {name: _pin_one(f"model.{next(k for k, n in names.items() if n == name)}", name, mcfg, kinds[name])
               for name in kinds}
    done = {key: dataclasses.replace(by_name[name], key=f"model.{key}") for key, name in names.items()}
    model = dataclasses.replace(mcfg, revision=None, **{k: p.pinned for k, p in done.items()})
    cfg = dataclasses.replace(cfg, model=model)
    judge = cfg.generate.reward_model if cfg.generate.enabled else None
    if judge is not None:  # pinned as the run's models are, recorded by the generate stage
        if kind_of(judge) == "local" and not Path(judge).expanduser().is_dir():
            raise ConfigError(f"generate.reward_model: {judge}: no such directory (a name starting with "
                              f"{', '.join(PATH_PREFIXES)} is a local path, not a Hub id)")
        done["reward_model"] = _pin_one("generate.reward_model", judge, mcfg, {"model", "tokenizer"})
        cfg = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate,
                                                                    reward_model=done["reward_model"].pinned))
    return cfg, done


def pin_trained(cfg: PipelineConfig, export: str, digest: str,
                keys: tuple[str, ...] = ("path", "reference_path")) -> tuple[PipelineConfig, Pinned]:
    """The config with ``model.path`` the model a stage of this run trained (the sft or
    train export), pinned as a config's name would be; the tokenizer stays the one tokenize
    used. ``keys``: the model keys it becomes; the reference stays what it was unless
    ``reference_path`` is one of them (the sft export is the reference, train's is not).
    ``digest``: of its files as the stage's manifest committed them, recorded by the
    stages that load it (``runner.stale_output`` compares them)."""
    done = dataclasses.replace(_pin_one("model.path", export, cfg.model, {"model"}), export_digest=digest)
    reference = {} if "reference_path" in keys else {"reference_path": cfg.reference_path}
    model = dataclasses.replace(cfg.model, path=done.pinned, tokenizer_path=cfg.tokenizer_path, revision=None,
                                **reference)
    return dataclasses.replace(cfg, model=model), done


def _check_names(cfg: PipelineConfig, names: dict[str, str]) -> None:
    kinds = {key: kind_of(name) for key, name in names.items()}
    for key, name in names.items():
        if kinds[key] == "local" and not Path(name).expanduser().is_dir():
            raise ConfigError(f"model.{key}: {name}: no such directory (a name starting with "
                              f"{', '.join(PATH_PREFIXES)} is a local path, not a Hub id)")
    if cfg.model.revision is not None and kinds["path"] != "hub":
        raise ConfigError(f"model.revision: {cfg.model.revision!r} is for a Hub id, and model.path "
                          f"{cfg.model.path!r} is a {'local directory' if kinds['path'] == 'local' else 'URI'}")
    env_vars = (cfg.cluster.runtime_env or {}).get("env_vars") or {}
    if "hub" in kinds.values():
        for var in HUB_ENV:
            if var in env_vars and os.environ.get(var) != env_vars[var]:
                raise ConfigError(f"cluster.runtime_env.env_vars.{var}: set for the workers only, but the driver "
                                  f"resolves the Hub ids before any worker starts: set {var} for the job too "
                                  f"(ray job submit --runtime-env-json, or the driver's environment)")


def _pin_one(key: str, name: str, mcfg: ModelConfig, kinds: set) -> Pinned:
    kind = kind_of(name)
    if kind == "local":
        return Pinned(key, name, "local", str(Path(name).expanduser().resolve()))
    if kind == "uri":
        base, written = _split_digest(name)  # a digest written in the config is checked, not replaced
        local, files = fetch_uri(key, base, mcfg, expect=written)
        _check_complete(key, redact_text(base, env_values=[]), local, kinds)
        digest = files_digest(files)
        return Pinned(key, name, "uri", f"{base}#sha256={digest}", digest=digest)
    repo, rev = _revision_for(key.split(".", 1)[1], name, mcfg)
    snapshot = _hub_snapshot(key, repo, rev, kinds)
    _check_complete(key, f"{repo!r} at revision {rev or 'main'!r}", Path(snapshot), kinds)
    commit = Path(snapshot).name
    return Pinned(key, name, "hub", f"{repo}@{commit}", revision=rev or "main", commit=commit)


def _check_complete(key: str, where: str, local: Path, kinds: set) -> None:
    """A model's config and every weight file transformers will load are there (a cache
    filled by hand can lack them), so that no worker finds out after hours of tokenizing."""
    from pipeline.core.rundir import TOKENIZER_FILES, model_weight_files

    present = sorted(p.name for p in local.iterdir())
    if "model" in kinds:
        weights = model_weight_files(local)
        missing = [w.name for w in weights if not w.is_file()]  # shards an index names
        if not (local / "config.json").is_file() or not weights or missing:
            detail = f"missing: {', '.join(missing[:4])}" if missing else f"found: {', '.join(present[:8]) or 'nothing'}"
            raise ConfigError(f"{key}: {where}: {local} does not hold config.json and the weights ({detail})")
    if "tokenizer" in kinds and not any(n in TOKENIZER_FILES for n in present):
        raise ConfigError(f"{key}: {where}: {local} holds no tokenizer files (found: {', '.join(present[:8])})")


# ----------------------------------------------------------------------------- any node


def local_dir(name: str, mcfg: ModelConfig, kind: str = "model") -> str:
    """A local directory holding the files ``name`` stands for, on this node. ``kind``:
    "model" (config, weights, tokenizer) or "tokenizer" (what is fetched from the Hub)."""
    where = kind_of(name)
    if where == "local":
        if not Path(name).expanduser().is_dir():  # the driver saw it: this node does not
            import socket

            raise FileNotFoundError(f"model: {name}: no such directory on {socket.gethostname()}; every node must "
                                    f"see it (a shared file system), or name it by URI or Hub id")
        return str(Path(name).expanduser().resolve())
    if where == "uri":
        base, digest = _split_digest(name)
        return str(fetch_uri("model", base, mcfg, expect=digest)[0])
    repo, rev = _revision_for("path" if name == mcfg.path else "", name, mcfg)
    return _hub_snapshot("model", repo, rev, {kind})


# ----------------------------------------------------------------------------- the Hub


def _hub_snapshot(key: str, repo: str, revision: Optional[str], kinds: set) -> str:
    """The snapshot directory of ``repo`` at ``revision`` in the Hub cache (downloaded if
    the Hub is reachable and the files are not cached): HUB_FILES of ``kinds``; weights
    are safetensors, or .bin where a repository has no safetensors."""
    import httpx
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (HFValidationError, HfHubHTTPError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    not_local = f"(no local directory {Path(repo).expanduser().resolve()})"
    if not HUB_ID.match(repo):
        raise ConfigError(f"{key}: {repo!r} is not a local directory, a URI or a Hub model id (org/name) {not_local}")
    where = f"{repo!r} at revision {revision or 'main'!r}"
    patterns = sorted({p for kind in kinds for p in HUB_FILES[kind]})
    try:
        path = snapshot_download(repo, revision=revision, allow_patterns=patterns, ignore_patterns=HUB_SKIP)
        if "model" in kinds and not any(Path(path).glob("*.safetensors")):
            path = snapshot_download(repo, revision=revision, allow_patterns=patterns + ["*.bin"],
                                     ignore_patterns=HUB_SKIP)
    except RevisionNotFoundError as e:
        raise ConfigError(f"{key}: {where}: the revision does not exist ({_first_line(e)})") from None
    except RepositoryNotFoundError as e:  # GatedRepoError too
        raise ConfigError(f"{key}: {where}: no such model on the Hub, or it is private or gated and HF_TOKEN "
                          f"does not grant it {not_local} ({_first_line(e)})") from None
    except IncompleteSnapshotError as e:
        raise ConfigError(f"{key}: {where}: {_first_line(e)}") from None
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else " and the Hub cannot be reached"
        refs = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")) / "refs"
        cached = sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
        what = f"the revision is not in the Hub cache (cached revisions: {', '.join(cached)})" if cached else \
            "it is not a local directory, and the model is not in the Hub cache"
        raise ConfigError(f"{key}: {where}: {what} {constants.HF_HUB_CACHE}{offline}") from None
    except HFValidationError as e:
        raise ConfigError(f"{key}: {repo!r} is not a valid Hub model id {not_local} ({_first_line(e)})") from None
    except HfHubHTTPError as e:
        raise ConfigError(f"{key}: {where}: the Hub refused it ({_first_line(e)})") from None
    except (OSError, httpx.HTTPError) as e:
        raise ConfigError(f"{key}: {where}: the Hub could not be reached {not_local} ({type(e).__name__}: "
                          f"{_first_line(e)})") from None
    return path


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
