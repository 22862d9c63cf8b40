"""Typed run configuration: one YAML, grouped by stage, overridable as ``key.sub=value``.

Every value is read from here and nowhere else. Unknown keys and values of the wrong type
are errors that name the full key (``train.beta``), so a typo never silently falls back to
a default. ``model`` is a group of its own because the policy/reference paths, dtype and
attention implementation are shared by score and train (both must use the same numerics).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


@dataclass
class ModelConfig:
    # HF checkpoint (directory) the policy starts from.
    path: str = ""
    # Reference model for the score stage; null = the policy's starting checkpoint.
    reference_path: Optional[str] = None
    # Tokenizer directory; null = the policy checkpoint.
    tokenizer_path: Optional[str] = None
    # Numerics shared by score and train (DESIGN: one log-prob function, one dtype policy).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # segment_sdpa: per-segment causal SDPA over packed rows (no tokens x tokens mask; any
    # device). sdpa / eager: transformers' own, with a dense block-diagonal mask.
    # flex_attention: block-sparse, GPU only for training. flash_attention_2: needs flash-attn.
    attn_implementation: Literal["segment_sdpa", "sdpa", "eager", "flex_attention",
                                 "flash_attention_2"] = "segment_sdpa"
    trust_remote_code: bool = False
    # Completion tokens per LM-head chunk in the log-prob pass (bounds the fp32 logits).
    logp_chunk_tokens: int = 1024


@dataclass
class DataConfig:
    # Files, globs or directories: .jsonl, .json, .parquet, .csv, or a directory written by
    # datasets' save_to_disk.
    train_files: list[str] = field(default_factory=list)
    # Or a datasets.load_dataset call: {path, name, split, data_files, revision}.
    hf_dataset: Optional[dict[str, Any]] = None
    # The split of a save_to_disk DatasetDict.
    split: str = "train"
    # Pairs with the same tokens: keep them (reported) or drop all but the first (quarantined).
    duplicates: Literal["keep", "drop"] = "keep"
    # Fraction of prompts held out for eval (pairs sharing a prompt stay on one side).
    eval_fraction: float = 0.05
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"


@dataclass
class TokenizeConfig:
    max_length: int = 1024
    max_prompt_length: Optional[int] = None
    max_completion_length: Optional[int] = None
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    max_tokens_per_row: int = 4096
    # Store a pair's prompt once: the rejected completion attends to the chosen side's
    # prompt tokens (same log-probs, fewer tokens to compute). null: on when
    # model.attn_implementation can express it (segment_sdpa, sdpa, eager).
    share_prompt: Optional[bool] = None
    # A Jinja chat-template file that replaces the tokenizer's.
    chat_template: Optional[str] = None
    # Quarantine pairs whose tokenised prompt is not a prefix of prompt + completion
    # (default: train on them as TRL 1.16 does, counted in the manifest).
    strict: bool = False
    rows_per_shard: int = 256
    # JSONL lines / Parquet rows read by one tokenize task.
    rows_per_task: int = 20000
    # Token lists one row-writing task holds at once (4 bytes a token). The tokenized
    # pairs stay in files written by the tokenize workers; the rows are written in groups
    # of shards, each group reading those files once. Peak memory, not output, depends on it.
    pack_buffer_tokens: int = 1 << 27
    # Ray actors that tokenize (fractional CPUs each, see ENVIRONMENT.md's deadlock).
    actors: int = 1
    num_cpus_per_actor: float = 0.5
    # Stage fails when more than this fraction of input rows is quarantined.
    max_bad_fraction: float = 0.05


@dataclass
class ScoreConfig:
    actors: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 0.5
    # torch intra-op threads per actor on CPU.
    cpu_threads: int = 1


@dataclass
class LoraSettings:
    """LoRA through peft; the reference is the base model (model.path), scored offline."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"


@dataclass
class TrainConfig:
    # One name or a list combined with loss_weights (TRL's DPOConfig names and defaults).
    loss_type: Union[str, list[str]] = "sigmoid"
    loss_weights: Optional[list[float]] = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    # RPO: adds TRL's "sft" loss (chosen NLL) with this weight.
    rpo_alpha: Optional[float] = None
    # WPO weighting (policy's per-token log sum p^2 from the same log-prob pass).
    use_weighting: bool = False
    # LD-DPO: tokens past the shorter side's length weigh ld_alpha (policy and stored reference).
    ld_alpha: Optional[float] = None
    # Per-sequence aggregation of token log-probs: sum (DPO) or mean over completion tokens.
    aggregation: Literal["sum", "mean"] = "sum"
    # Treat the reference log-probs as 0: no score stage.
    reference_free: bool = False
    # MoE load-balancing loss weight; null = the model config's output_router_logits and
    # router_aux_loss_coef decide (as TRL); 0 = off.
    router_aux_loss_coef: Optional[float] = None
    # Options that need a live reference model; named here so they fail with the reason.
    sync_ref_model: bool = False
    ref_model_mixup_alpha: Optional[float] = None
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    learning_rate: float = 5e-7
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    # Cosine floor as a fraction of learning_rate (seed minimind uses 0.1).
    min_lr_ratio: float = 0.0
    num_train_epochs: int = 1
    # > 0 overrides num_train_epochs.
    max_steps: int = -1
    # Packed rows per rank per optimizer step.
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    # Saved activations of the training forward go to pinned host memory until backward
    # (TRL's activation_offloading; pipeline.offload). Exact; only accelerator tensors move.
    activation_offloading: bool = False
    seed: int = 42
    logging_steps: int = 1
    eval_steps: int = 50
    # DeepSpeed checkpoint every save_steps optimizer steps (0: none); the last
    # save_total_limit complete ones are kept (null: all).
    save_steps: int = 0
    save_total_limit: Optional[int] = 2
    # null: resume from the newest complete checkpoint of this run's output if there is one;
    # a tag ("step-00000100") or a checkpoint directory: resume from it, or fail.
    resume_from_checkpoint: Optional[str] = None
    # Ray Train restarts the workers this many times after a failure (FailureConfig).
    max_failures: int = 0
    # Metrics go to metrics.jsonl always, and to these trackers (TRL's report_to):
    # tensorboard, wandb, mlflow. W&B and MLflow read their settings from the environment.
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    # The W&B / MLflow run name (null: dpo-<train fingerprint>).
    run_name: Optional[str] = None
    # With a URI run_dir: each rank's local scratch directory for DeepSpeed checkpoints,
    # TensorBoard and the export before they are uploaded (null: the system temp dir).
    local_dir: Optional[str] = None
    # LoRA instead of full fine-tuning: {r, alpha, dropout, target_modules}.
    peft: Optional[LoraSettings] = None
    # With peft: also export the base model with the adapter merged (model/merged).
    merge_adapter: bool = False
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 3


@dataclass
class ClusterConfig:
    # Ray address: null = RAY_ADDRESS if set, else start a private local cluster.
    # "auto" joins the cluster on this machine; "local" always starts a new one.
    address: Optional[str] = None
    # Local cluster only.
    num_cpus: Optional[int] = None
    object_store_memory: int = 512 * 1024**2
    # Passed to ray.init(runtime_env=...): env_vars, pip, working_dir ...
    runtime_env: dict[str, Any] = field(default_factory=dict)
    # Ray Data progress bars for the tokenize and score stages.
    progress_bars: bool = True


@dataclass
class PipelineConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    # Derived values live here so each is computed in one place.
    @property
    def reference_path(self) -> str:
        return self.model.reference_path or self.model.path

    @property
    def tokenizer_path(self) -> str:
        return self.model.tokenizer_path or self.model.path


# ----------------------------------------------------------------------------- coercion


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
                errors.append(str(e))
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


# Attention implementations that can run rows whose rejected segments share the prompt.
PROMPT_SHARING_ATTENTION = ("segment_sdpa", "sdpa", "eager")


def shares_prompt(cfg: PipelineConfig) -> bool:
    """``tokenize.share_prompt`` resolved: null means on where the attention can run it."""
    if cfg.tokenize.share_prompt is not None:
        return cfg.tokenize.share_prompt
    return cfg.model.attn_implementation in PROMPT_SHARING_ATTENTION


def _validate(cfg: PipelineConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(bool(cfg.model.path), "model.path: required (the policy's HF checkpoint directory)")
    need(not (cfg.model.attn_implementation == "flex_attention" and not cfg.train.use_gpu),
         "model.attn_implementation: flex_attention has no backward on CPU (train.use_gpu is false); "
         "use segment_sdpa")
    need(not (cfg.tokenize.share_prompt and cfg.model.attn_implementation not in PROMPT_SHARING_ATTENTION),
         f"tokenize.share_prompt: true needs model.attn_implementation {', '.join(PROMPT_SHARING_ATTENTION)} "
         f"(it is {cfg.model.attn_implementation}, which isolates packed sequences only by position_ids)")
    need(bool(cfg.data.train_files) != bool(cfg.data.hf_dataset),
         "data.train_files or data.hf_dataset: exactly one is required")
    if cfg.data.hf_dataset is not None:
        known = {"path", "name", "split", "data_files", "revision"}
        bad = sorted(set(cfg.data.hf_dataset) - known)
        need(not bad, f"data.hf_dataset: unknown key {bad[0] if bad else ''}; valid keys: {sorted(known)}")
        need("path" in cfg.data.hf_dataset, "data.hf_dataset.path: required")
    need(0.0 <= cfg.data.eval_fraction < 1.0, "data.eval_fraction: must be in [0, 1)")
    t = cfg.tokenize
    need(t.max_length >= 2, "tokenize.max_length: must be >= 2")
    need(
        t.max_tokens_per_row >= 2 * t.max_length,
        f"tokenize.max_tokens_per_row ({t.max_tokens_per_row}) must be >= 2 * tokenize.max_length "
        f"({2 * t.max_length}): both sides of a pair go in one row",
    )
    if t.max_prompt_length is not None:
        need(
            0 < t.max_prompt_length < t.max_length,
            "tokenize.max_prompt_length: must be in (0, tokenize.max_length)",
        )
    if t.max_completion_length is not None:
        need(t.max_completion_length >= 1, "tokenize.max_completion_length: must be >= 1")
    need(t.rows_per_shard >= 1, "tokenize.rows_per_shard: must be >= 1")
    need(t.rows_per_task >= 1, "tokenize.rows_per_task: must be >= 1")
    need(t.pack_buffer_tokens >= 1, "tokenize.pack_buffer_tokens: must be >= 1")
    need(t.actors >= 1, "tokenize.actors: must be >= 1")
    need(0.0 <= t.max_bad_fraction <= 1.0, "tokenize.max_bad_fraction: must be in [0, 1]")
    need(cfg.score.actors >= 1, "score.actors: must be >= 1")
    need(cfg.model.logp_chunk_tokens >= 1, "model.logp_chunk_tokens: must be >= 1")
    tr = cfg.train
    _validate_losses(tr)
    need(tr.learning_rate > 0, "train.learning_rate: must be > 0")
    need(0.0 <= tr.warmup_ratio < 1.0, "train.warmup_ratio: must be in [0, 1)")
    need(tr.warmup_steps >= 0, "train.warmup_steps: must be >= 0")
    need(0.0 <= tr.min_lr_ratio <= 1.0, "train.min_lr_ratio: must be in [0, 1]")
    need(tr.num_train_epochs >= 1 or tr.max_steps > 0, "train.num_train_epochs: must be >= 1")
    need(tr.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps: must be >= 1")
    need(tr.max_grad_norm >= 0, "train.max_grad_norm: must be >= 0 (0 disables clipping)")
    need(tr.num_workers >= 1, "train.num_workers: must be >= 1")
    need(tr.logging_steps >= 1, "train.logging_steps: must be >= 1")
    need(tr.eval_steps >= 1, "train.eval_steps: must be >= 1")
    need(tr.save_steps >= 0, "train.save_steps: must be >= 0 (0: no periodic checkpoints)")
    need(tr.save_total_limit is None or tr.save_total_limit >= 1, "train.save_total_limit: must be >= 1 or null")
    need(tr.max_failures >= -1, "train.max_failures: must be >= 0, or -1 for unlimited")
    from pipeline.tracking import TRACKERS

    for tracker in tr.report_to:
        need(tracker in TRACKERS, f"train.report_to: {tracker!r} is not one of {', '.join(TRACKERS)}")
    if tr.peft is not None:
        need(tr.peft.r >= 1, "train.peft.r: must be >= 1")
        need(0.0 <= tr.peft.dropout < 1.0, "train.peft.dropout: must be in [0, 1)")
    need(not tr.merge_adapter or tr.peft is not None, "train.merge_adapter: only with train.peft")
    if cfg.model.dtype == "float16":
        raise ConfigError("model.dtype: float16 is not supported (use bfloat16 or float32)")


def loss_plan(t: TrainConfig) -> tuple[list[str], list[float]]:
    """The loss types and weights a run uses: loss_type/loss_weights, plus RPO's "sft"."""
    from pipeline.losses import as_list

    names = as_list(t.loss_type)
    weights = list(t.loss_weights) if t.loss_weights is not None else [1.0] * len(names)
    if t.rpo_alpha is not None:
        names, weights = names + ["sft"], weights + [t.rpo_alpha]
    return names, weights


def needs_reference(cfg: PipelineConfig) -> bool:
    """False when no loss uses reference log-probs: the score stage is skipped."""
    from pipeline.losses import is_reference_free

    return not (cfg.train.reference_free or is_reference_free(loss_plan(cfg.train)[0]))


def _validate_losses(t: TrainConfig) -> None:
    from pipeline.losses import ALIASES, LOSSES, as_list

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    for name in as_list(t.loss_type):
        need(name in LOSSES, f"train.loss_type: {name!r} is not one of {sorted(LOSSES) + sorted(ALIASES)}")
    n = len(as_list(t.loss_type))
    need(t.loss_weights is None or len(t.loss_weights) == n,
         f"train.loss_weights: {len(t.loss_weights or [])} weights for {n} loss types")
    names, _ = loss_plan(t)
    need(t.beta > 0, "train.beta: must be > 0")
    need(0.0 <= t.label_smoothing < 0.5, "train.label_smoothing: must be in [0, 0.5)")
    if t.label_smoothing > 0:
        ignoring = [x for x in names if not LOSSES[x].label_smoothing]
        need(not ignoring, f"train.label_smoothing: {t.label_smoothing} has no effect on {ignoring} "
                           "(used by sigmoid (cDPO), robust, exo_pair, aot, aot_unpaired, simpo, cpo)")
    need("exo_pair" not in names or t.label_smoothing > 0,
         "train.label_smoothing: exo_pair needs epsilon > 0 (the EXO paper and TRL recommend 1e-3)")
    if t.f_divergence_type != "reverse_kl":
        bad = [x for x in names if not LOSSES[x].f_divergence]
        need(not bad, f"train.f_divergence_type: {t.f_divergence_type} has no valid generalisation for {bad} "
                      "(only losses built on the chosen-rejected score difference)")
    need(t.f_divergence_type == "alpha_divergence" or t.f_alpha_divergence_coef == 0.5,
         "train.f_alpha_divergence_coef: only used with f_divergence_type: alpha_divergence")
    need(t.discopop_tau > 0, "train.discopop_tau: must be > 0")
    if t.ld_alpha is not None:
        need(0.0 <= t.ld_alpha <= 1.0, "train.ld_alpha: must be in [0, 1]")
        need(t.aggregation == "sum", "train.ld_alpha: LD-DPO re-weights summed log-probs; "
                                     "use train.aggregation: sum")
    if t.aggregation == "mean":
        normed = [x for x in names if x in ("ipo", "sigmoid_norm", "simpo", "orpo")]
        need(not normed, f"train.aggregation: mean would length-normalise {normed} twice")
    need(not (t.use_weighting and {"aot", "aot_unpaired"} & set(names)),
         "train.use_weighting: WPO weights are per pair and aot/aot_unpaired sort pairs")
    need(not t.sync_ref_model,
         "train.sync_ref_model: TR-DPO updates the reference during training; this pipeline scores "
         "the reference once, offline (no reference model at train time)")
    need(t.ref_model_mixup_alpha is None,
         "train.ref_model_mixup_alpha: mixing policy into the reference needs a live reference "
         "model; this pipeline scores the reference once, offline")


# ----------------------------------------------------------------------------- overrides


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


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    cfg = _build(PipelineConfig, raw, "")
    _validate(cfg)
    return cfg


def config_from_dict(raw: dict) -> PipelineConfig:
    cfg = _build(PipelineConfig, raw, "")
    _validate(cfg)
    return cfg


def _absolute(path: Optional[str]) -> Optional[str]:
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def for_workers(cfg: PipelineConfig) -> dict:
    """The config as a dict with local paths made absolute: Ray workers do not share the
    driver's working directory (Ray Train runs them in its storage directory)."""
    out = to_dict(cfg)
    out["run_dir"] = _absolute(cfg.run_dir)
    for key in ("path", "reference_path", "tokenizer_path"):
        out["model"][key] = _absolute(out["model"][key])
    out["tokenize"]["chat_template"] = _absolute(out["tokenize"]["chat_template"])
    return out


SECRET_WORDS = ("token", "key", "secret", "password", "passwd", "credential", "auth")


def _redact_secrets(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: ("<redacted>" if isinstance(k, str) and any(w in k.lower() for w in SECRET_WORDS)
                    and isinstance(v, (str, int, float)) and not isinstance(v, bool) else _redact_secrets(v))
                for k, v in raw.items()}
    if isinstance(raw, list):
        return [_redact_secrets(v) for v in raw]
    return raw


def redact(raw: dict) -> dict:
    """A config dict fit to be written down: in ``cluster.runtime_env`` (its env_vars above
    all), values of secret-looking keys (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY ...)
    become "<redacted>". Secrets belong in the environment; they never reach a manifest, a
    saved config or a log."""
    out = dict(raw)
    if isinstance(out.get("cluster"), dict):
        out["cluster"] = dict(out["cluster"], runtime_env=_redact_secrets(out["cluster"].get("runtime_env", {})))
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
