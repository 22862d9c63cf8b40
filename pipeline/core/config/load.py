"""From YAML to a checked ``PipelineConfig`` and back: coercion to the annotated types
(errors name the key), ``key.sub=value`` overrides, the files a config names read once,
the sft group's keys taken from train, and the dicts written down and handed to workers."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .groups import ConfigError
from .run import PipelineConfig
from .training import SFT_FROM_TRAIN, TRAIN_ONLY_KEYS
from .validate import _validate


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; errors name ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                # a mapping meant the group (sft.data's SFTDataConfig): its error says what is wrong in it
                errors.insert(0 if isinstance(value, dict) and dataclasses.is_dataclass(arg) else len(errors), str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value in args and type(value) is type(next(a for a in args if a == value)):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s}; valid keys"
            f"{' of ' + prefix if prefix else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    # YAML parsing gives numbers, booleans, null and lists ([a, b]) their types.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"override {text!r}: {part} is not a group")
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return raw


def _read_files(cfg: PipelineConfig) -> None:
    """Settings given as a file's path, read now: their content is what the fingerprint and
    the workers see."""
    import json

    for group in (cfg.train, cfg.sft):
        ds = group.deepspeed
        if isinstance(ds, str):
            key = f"{'train' if group is cfg.train else 'sft'}.deepspeed"
            path = Path(ds).expanduser()
            try:
                group.deepspeed = json.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{key}: {ds}: no such file") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}: {ds}: not valid JSON ({e})") from None
            if not isinstance(group.deepspeed, dict):
                raise ConfigError(f"{key}: {ds}: the top level must be a mapping")


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    return config_from_dict(read_config(path, overrides))


def read_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The config file's mapping with the overrides applied, not yet checked."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return apply_overrides(raw, overrides or [])


def unchecked(raw: dict) -> PipelineConfig:
    """The config's typed values, before the checks (which import torch, for the losses):
    what must begin before them (Ray's start, ``cluster.ray_cluster.connect_early``) reads
    it. ``config_from_dict`` of the same mapping still decides whether the run goes on."""
    return _build(PipelineConfig, _inherit_train(raw), "")


def _inherit_train(raw: dict) -> dict:
    """The sft group's SFT_FROM_TRAIN keys not given take train's values (as written), so
    one ``train.num_workers`` or ``train.deepspeed`` serves both stages; ``from_train``
    records which, so that the workers' copy of the config (``to_dict``) takes the same ones
    again. ``as_written`` leaves them out of the config a run writes down."""
    sft, train = raw.get("sft", {}), raw.get("train")
    for key in TRAIN_ONLY_KEYS if isinstance(sft, dict) else ():
        if key in sft:
            raise ConfigError(f"sft.{key}: a setting of the preference loss (train.{key}); sft trains by the "
                              f"NLL of the completions" + (" and always exports the merged model"
                                                           if key == "merge_adapter" else ""))
    if not isinstance(sft, dict):
        return raw
    train = train if isinstance(train, dict) else {}
    again = sft.get("from_train") or []
    if not isinstance(again, list) or set(again) - set(SFT_FROM_TRAIN):
        raise ConfigError(f"sft.from_train: set by the pipeline, a list of {', '.join(SFT_FROM_TRAIN)} "
                          f"(got {again!r})")
    given = {k: v for k, v in sft.items() if k not in again}
    taken = [k for k in SFT_FROM_TRAIN if k not in given]
    return dict(raw, sft={**given, **{k: train[k] for k in taken if k in train}, "from_train": taken})


def as_written(cfg: "PipelineConfig") -> dict:
    """The config to write down (``<run_dir>/config.yaml``, the manifests' settings): the
    sft keys it took from train left out, so that a rerun from that file takes them from
    train again, and a value set there for one of them wins."""
    out = to_dict(cfg)
    out["sft"] = {k: v for k, v in out["sft"].items() if k not in cfg.sft.from_train and k != "from_train"}
    return redact(out)


def config_from_dict(raw: dict, handed_on: bool = False) -> PipelineConfig:
    """A config from its dict. ``handed_on``: the dict is one the driver made from a checked
    config (a worker's, with models other stages trained in it): what only a user's choice can
    contradict is not asked again (after sft, ``model.reference_path`` is the sft export)."""
    cfg = _build(PipelineConfig, _inherit_train(raw), "")
    _read_files(cfg)
    _validate(cfg, handed_on)
    return cfg


def _absolute(path: Optional[str]) -> Optional[str]:
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def resume_location(spec: Optional[str]) -> Optional[str]:
    """``resume_from_checkpoint`` as the ranks must read it: a path made absolute (the
    driver, which converts a checkpoint of another worker count before the ranks start,
    and the ranks then find the same one); a tag or a URI as it is."""
    return _absolute(spec) if spec and "/" in spec else spec


def for_workers(cfg: PipelineConfig) -> dict:
    """The config as a dict with local paths made absolute: Ray workers do not share the
    driver's working directory (nor, on another node, its files)."""
    out = to_dict(cfg)
    out["run_dir"] = _absolute(cfg.run_dir)
    for group in ("train", "sft"):
        if out.get(group):
            out[group]["resume_from_checkpoint"] = resume_location(out[group]["resume_from_checkpoint"])
    for key in ("path", "reference_path", "tokenizer_path"):  # a Hub id is left as it is
        if out["model"][key] and Path(out["model"][key]).expanduser().is_dir():
            out["model"][key] = _absolute(out["model"][key])
    out["tokenize"]["chat_template"] = _absolute(out["tokenize"]["chat_template"])
    gen = out["generate"]
    gen["prompts_file"] = _absolute(gen["prompts_file"])
    if gen["reward_model"] and Path(gen["reward_model"]).expanduser().is_dir():
        gen["reward_model"] = _absolute(gen["reward_model"])
    return out


def redact(raw: dict) -> dict:
    """A config dict fit to be written down (``pipeline/core/redaction.py``): in
    ``cluster.runtime_env`` the values of secret-looking keys (HF_TOKEN, WANDB_API_KEY ...),
    and everywhere the credentials inside values (``s3://KEY:SECRET@``, ``https://user:pass@``,
    ``?token=``) and the values of secret-named environment variables, become "<redacted>"."""
    from pipeline.core.redaction import redact_runtime_env, redact_values

    out = dict(raw)
    if isinstance(out.get("cluster"), dict):
        out["cluster"] = dict(out["cluster"], runtime_env=redact_runtime_env(out["cluster"].get("runtime_env", {})))
    return redact_values(out)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
