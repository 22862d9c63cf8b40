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
    # The policy's starting checkpoint: a local HF checkpoint directory, a Hub id
    # (org/name, or org/name@revision) or a URI (s3://, gs://) of one (docs/models.md).
    path: str = ""
    # The Hub revision (branch, tag or commit) of model.path, and of the two keys below
    # where they default to it. The commit it resolves to is recorded in the manifests.
    revision: Optional[str] = None
    # Reference model for the score stage; null = the policy's starting checkpoint.
    reference_path: Optional[str] = None
    # Tokenizer; null = the policy checkpoint's.
    tokenizer_path: Optional[str] = None
    # Where each node keeps the models it downloads from a URI (once per node); ~ and
    # $VARS are expanded on each node, so it can point at each node's local disk.
    cache_dir: str = "~/.cache/dpo-pipeline/models"
    # Numerics shared by score and train (one log-prob function, one dtype policy:
    # docs/design.md). float16 is refused.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # segment_sdpa: per-segment causal SDPA over packed rows (no tokens x tokens mask; any
    # device). sdpa / eager: transformers' own, with a dense block-diagonal mask.
    # flex_attention: block-sparse, GPU only for training. flash_attention_2: needs flash-attn.
    attn_implementation: Literal["segment_sdpa", "sdpa", "eager", "flex_attention",
                                 "flash_attention_2"] = "segment_sdpa"
    # Run the checkpoint's own modelling and tokenizer code (transformers' trust_remote_code).
    trust_remote_code: bool = False
    # Completion tokens per LM-head chunk in the log-prob pass (bounds the fp32 logits).
    logp_chunk_tokens: int = 1024


@dataclass
class RowSource:
    """Where rows come from and how they are split: the keys ``data`` (preference pairs) and
    ``sft.data`` (SFT rows of the sft stage's own) share."""

    # Files, globs or directories: .jsonl, .json, .parquet, .csv, or a directory written by
    # datasets' save_to_disk.
    train_files: list[str] = field(default_factory=list)
    # Or a datasets.load_dataset call: {path, name, split, data_files, revision}.
    hf_dataset: Optional[dict[str, Any]] = None
    # Or a mixture, as open-instruct's dataset_mixer_list: a list of
    # {name, files | hf_dataset, weight | max_pairs}. Each source's rows are drawn with
    # data.seed: weight is the fraction kept (0 < weight <= 1), max_pairs at most this
    # many rows. Counted per source in the manifest and the report.
    sources: Optional[list[dict[str, Any]]] = None
    # The split of a save_to_disk DatasetDict.
    split: str = "train"
    # Pairs (or SFT rows) with the same tokens: keep them (reported) or drop all but the
    # first (quarantined).
    duplicates: Literal["keep", "drop"] = "keep"
    # Fraction of prompts held out for eval (rows sharing a prompt stay on one side).
    eval_fraction: float = 0.05
    # Seeds the eval split and the order of packed rows: the data's own seed, so a sweep
    # over train.seed trains again on the same tokenized and scored rows.
    seed: int = 42


@dataclass
class DataConfig(RowSource):
    # Column of the prompt (absent in the implicit-prompt format).
    prompt_key: str = "prompt"
    # Column of the chosen completion.
    chosen_key: str = "chosen"
    # Column of the rejected completion, or of a list of them.
    rejected_key: str = "rejected"


@dataclass
class TokenizeConfig:
    # Prompt + completion tokens per side; completions are cut to fit.
    max_length: int = 1024
    # Prompt tokens kept, cut as truncation_mode says (null: no separate limit).
    max_prompt_length: Optional[int] = None
    # Completion tokens kept, from the start (null: no separate limit).
    max_completion_length: Optional[int] = None
    # keep_end: a cut prompt keeps its end; keep_start: its start.
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    # A prompt that leaves a completion fewer than min_completion_tokens tokens of
    # max_length: quarantine (the default: the pair is counted and kept out, nothing
    # trains on a prompt it never saw whole) or truncate (TRL's behaviour: the prompt is
    # cut as truncation_mode says, keep_end losing its start, and the pair trains).
    prompt_too_long: Literal["quarantine", "truncate"] = "quarantine"
    # Completion tokens each side keeps at least (all of it when shorter), for the
    # prompt_too_long rule.
    min_completion_tokens: int = 1
    # Packing budget, tokens per packed row; >= 2 * max_length (both sides of a pair go
    # in one row).
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
    # Packed rows per Parquet shard.
    rows_per_shard: int = 256
    # JSONL lines / Parquet rows read by one tokenize task.
    rows_per_task: int = 20000
    # Token lists one row-writing task holds at once (4 bytes a token). The tokenized
    # pairs stay in files written by the tokenize workers; the rows are written in groups
    # of shards, each group reading those files once. Peak memory, not output, depends on it.
    pack_buffer_tokens: int = 1 << 27
    # Ray actors that tokenize. Fractional CPUs each: on a small cluster, actors of one CPU
    # leave none for Ray Data's read task, which then hangs without an error (docs/design.md).
    actors: int = 1
    # CPUs per tokenize actor and per row-writing task.
    num_cpus_per_actor: float = 0.5
    # Stage fails when more than this fraction of the records (pairs, each rejected
    # completion of a row counted) is quarantined as bad (dropped duplicates do not count).
    max_bad_fraction: float = 0.05


@dataclass
class ScoreConfig:
    # Reference-model actors, one model each.
    actors: int = 1
    # 1 on GPU workers.
    num_gpus_per_actor: float = 0.0
    # Fractional on CPU (see tokenize.actors).
    num_cpus_per_actor: float = 0.5
    # torch intra-op threads per actor on CPU.
    cpu_threads: int = 1


@dataclass
class LoraSettings:
    """LoRA through peft; the reference is the base model (model.path), scored offline."""

    # LoRA rank.
    r: int = 16
    # LoRA alpha (the update is scaled by alpha / r).
    alpha: float = 32.0
    # Dropout on the LoRA input.
    dropout: float = 0.0
    # Module names to adapt, or all-linear.
    target_modules: Union[str, list[str]] = "all-linear"


@dataclass
class TrainingSettings:
    """What every training stage trains with (train, sft): the optimizer, the schedule, the
    steps, checkpoints, trackers, and where and how the ranks run. The shared training
    machinery reads these and nothing else."""

    # MoE load-balancing loss weight; null = the model config's output_router_logits and
    # router_aux_loss_coef decide (as TRL); 0 = off.
    router_aux_loss_coef: Optional[float] = None
    # adamw, or rmsprop (the DPO paper's).
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    learning_rate: float = 5e-7
    # Never applied to biases and norm weights.
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    # transformers' schedule shapes; cosine decays to min_lr_ratio.
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    # Warmup as a fraction of the total steps; warmup_steps > 0 takes precedence.
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    # Cosine floor as a fraction of learning_rate (seed minimind uses 0.1).
    min_lr_ratio: float = 0.0
    num_train_epochs: int = 1
    # > 0 overrides num_train_epochs.
    max_steps: int = -1
    # Packed rows per rank per optimizer step.
    gradient_accumulation_steps: int = 1
    # DeepSpeed gradient_clipping (0: off).
    max_grad_norm: float = 1.0
    # transformers' gradient checkpointing (non-reentrant).
    gradient_checkpointing: bool = False
    # Saved activations of the training forward go to pinned host memory until backward
    # (TRL's activation_offloading; pipeline.training.offload). Exact; only accelerator tensors move.
    activation_offloading: bool = False
    # The train/eval split and the packing shuffle (so it is in the tokenize fingerprint),
    # the epoch plans, torch.
    seed: int = 42
    # Log every N steps (and the first, the last and at checkpoints): the means over those
    # steps, their rows and tokens summed (as TRL averages over its logging window).
    logging_steps: int = 1
    # Eval every N steps, and at step 0 and at the end.
    eval_steps: int = 50
    # DeepSpeed checkpoint every save_steps optimizer steps (0: none); the last
    # save_total_limit complete ones are kept (null: all). A final one is written before the
    # export (a failed export loses no training); with 0 it is removed once the export is done.
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
    # Ray Train workers (ranks).
    num_workers: int = 2
    # One GPU per worker and NCCL; gloo on CPU.
    use_gpu: bool = False
    # CPUs per Ray Train worker (torch threads on CPU).
    cpus_per_worker: float = 1.0
    # DeepSpeed ZeRO stage.
    zero_stage: Literal[0, 1, 2, 3] = 3
    # Your own DeepSpeed config: a JSON file's path (read when the config is loaded, so its
    # content is in the fingerprint) or a mapping, deep-merged over the one the pipeline
    # builds, as the HF Trainer's --deepspeed: ZeRO-Offload (cpu; nvme where libaio is
    # installed), bucket sizes, communication. The keys the pipeline sets from these
    # settings may be repeated or "auto", not changed (docs/deepspeed.md).
    deepspeed: Optional[Union[str, dict[str, Any]]] = None


@dataclass
class PreferenceSettings:
    """The preference loss (TRL DPOConfig's names and defaults): the train stage's alone."""

    # One name or a list combined with loss_weights (TRL's DPOConfig names and defaults).
    loss_type: Union[str, list[str]] = "sigmoid"
    # One weight per loss_type when it is a list (null: 1 each).
    loss_weights: Optional[list[float]] = None
    # DPO's beta: the scale of the policy/reference log-ratio.
    beta: float = 0.1
    # Epsilon of cDPO (sigmoid), robust, exo_pair, aot, aot_unpaired, simpo, cpo; an error
    # with the other losses.
    label_smoothing: float = 0.0
    # f-DPO; other than reverse_kl only with losses built on the chosen-rejected score
    # difference.
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    # Alpha of alpha_divergence.
    f_alpha_divergence_coef: float = 0.5
    # Temperature of discopop.
    discopop_tau: float = 0.05
    # SimPO's target reward margin.
    simpo_gamma: float = 0.5
    # NLL weight of cpo and simpo (TRL's default; 0 is the SimPO paper).
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
    # Options that need a live reference model; named here so they fail with the reason.
    sync_ref_model: bool = False
    # Refused for the same reason (TRL's reference mixup).
    ref_model_mixup_alpha: Optional[float] = None


@dataclass
class TrainConfig(TrainingSettings, PreferenceSettings):
    """The train group: the preference loss and the training settings, in one flat group
    (train.beta beside train.learning_rate)."""

    # With peft: also export the base model with the adapter merged (model/merged).
    merge_adapter: bool = False


# train's keys the sft group refuses: the preference loss's, and merge_adapter (an sft run
# with LoRA always exports the merged model: the reference must be a plain model).
TRAIN_ONLY_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                        if f.name not in {g.name for g in dataclasses.fields(TrainingSettings)})
# The sft keys that, not given, take train's value: where and how the ranks run, not what
# they train (a DPO seed or step sweep must not retrain the reference). Every other sft
# option has its own default, TrainConfig's, except learning_rate (TRL SFTConfig's).
SFT_FROM_TRAIN = ("num_workers", "use_gpu", "cpus_per_worker", "zero_stage", "deepspeed", "gradient_checkpointing",
                  "activation_offloading", "local_dir", "report_to", "max_failures")


@dataclass
class SFTDataConfig(RowSource):
    """The sft stage's own data: SFT rows (``messages``, or ``prompt`` and ``completion``),
    with the source keys of ``data``; tokenised, quarantined, split and packed by the
    tokenize stage's code with the tokenize settings."""

    # Column of a conversation: its last turn (the assistant's) is the completion, the turns
    # before it the prompt.
    messages_key: str = "messages"
    # Column of the prompt (a string, or a list of messages).
    prompt_key: str = "prompt"
    # Column of the completion (a string, or a list of messages ending with the assistant's).
    completion_key: str = "completion"


@dataclass
class SFTConfig(TrainingSettings):
    """The sft stage. Besides its own keys it has every training setting of train (not the
    preference loss), with train's defaults (learning_rate: TRL SFTConfig's). Where and how
    the ranks run is train's value when not given here (SFT_FROM_TRAIN, the keys marked
    so below)."""

    # Train model.path by maximum likelihood on completions before scoring (the DPO paper's
    # step when no SFT model exists): tokenize -> sft -> score -> train. Its exported model
    # is the reference score uses and the policy train starts from (docs/sft.md).
    enabled: bool = False
    # chosen: the preference pairs' prompts and chosen completions (the tokenize output,
    # repacked without the rejected side); or a dataset of SFT rows of its own: a mapping
    # with train_files, hf_dataset or sources, as the data group (SFTDataConfig).
    data: Union[Literal["chosen"], SFTDataConfig] = "chosen"
    # TRL's SFTConfig default (not train's: a DPO learning rate is far too small for SFT).
    learning_rate: float = 2e-5
    # Set by the pipeline: the keys this group took from train. A config written back
    # (<run_dir>/config.yaml) keeps them following train, as the config it came from did.
    from_train: list[str] = field(default_factory=list)


@dataclass
class ClusterConfig:
    # Ray address: null = RAY_ADDRESS if set, else start a private local cluster.
    # "auto" joins the cluster on this machine; "local" always starts a new one.
    address: Optional[str] = None
    # Local cluster only.
    num_cpus: Optional[int] = None
    # Local cluster only: Ray's object store in /dev/shm (Ray's default is 30% of RAM).
    object_store_memory: int = 512 * 1024**2
    # Passed to ray.init(runtime_env=...): env_vars, pip, working_dir ...
    runtime_env: dict[str, Any] = field(default_factory=dict)
    # Ray Data progress bars for the tokenize and score stages.
    progress_bars: bool = True


@dataclass
class PipelineConfig:
    # Where every stage writes: a local path, or a URI pyarrow opens (s3://, gs://, hdfs://,
    # file://). On a cluster, storage every node sees.
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # An SFT reference trained by the pipeline (off by default): see SFTConfig.
    sft: SFTConfig = field(default_factory=SFTConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    # Derived values live here so each is computed in one place.
    @property
    def reference_path(self) -> str:
        return self.model.reference_path or self.model.path

    @property
    def tokenizer_path(self) -> str:
        return self.model.tokenizer_path or self.model.path

    def sft_training(self) -> TrainingSettings:
        """The sft stage's training settings (what the shared training machinery reads)."""
        return TrainingSettings(**{f.name: getattr(self.sft, f.name) for f in dataclasses.fields(TrainingSettings)})


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

    need(bool(cfg.model.path), "model.path: required (the policy's HF checkpoint: a directory, a Hub id or a URI)")
    need(not (cfg.model.attn_implementation == "flex_attention" and not cfg.train.use_gpu),
         "model.attn_implementation: flex_attention has no backward on CPU (train.use_gpu is false); "
         "use segment_sdpa")
    need(not (cfg.tokenize.share_prompt and cfg.model.attn_implementation not in PROMPT_SHARING_ATTENTION),
         f"tokenize.share_prompt: true needs model.attn_implementation {', '.join(PROMPT_SHARING_ATTENTION)} "
         f"(it is {cfg.model.attn_implementation}, which isolates packed sequences only by position_ids)")
    _validate_data_source(cfg.data, "data")
    tokenize_cfg = cfg.tokenize
    need(tokenize_cfg.max_length >= 2, "tokenize.max_length: must be >= 2")
    need(
        tokenize_cfg.max_tokens_per_row >= 2 * tokenize_cfg.max_length,
        f"tokenize.max_tokens_per_row ({tokenize_cfg.max_tokens_per_row}) must be >= 2 * tokenize.max_length "
        f"({2 * tokenize_cfg.max_length}): both sides of a pair go in one row",
    )
    if tokenize_cfg.max_prompt_length is not None:
        need(
            0 < tokenize_cfg.max_prompt_length < tokenize_cfg.max_length,
            "tokenize.max_prompt_length: must be in (0, tokenize.max_length)",
        )
    if tokenize_cfg.max_completion_length is not None:
        need(tokenize_cfg.max_completion_length >= 1, "tokenize.max_completion_length: must be >= 1")
    need(1 <= tokenize_cfg.min_completion_tokens < tokenize_cfg.max_length,
         f"tokenize.min_completion_tokens: must be in [1, tokenize.max_length ({tokenize_cfg.max_length}))")
    need(tokenize_cfg.rows_per_shard >= 1, "tokenize.rows_per_shard: must be >= 1")
    need(tokenize_cfg.rows_per_task >= 1, "tokenize.rows_per_task: must be >= 1")
    need(tokenize_cfg.pack_buffer_tokens >= 1, "tokenize.pack_buffer_tokens: must be >= 1")
    need(tokenize_cfg.actors >= 1, "tokenize.actors: must be >= 1")
    need(0.0 <= tokenize_cfg.max_bad_fraction <= 1.0, "tokenize.max_bad_fraction: must be in [0, 1]")
    need(cfg.score.actors >= 1, "score.actors: must be >= 1")
    need(cfg.model.logp_chunk_tokens >= 1, "model.logp_chunk_tokens: must be >= 1")
    _validate_loss_context(cfg.train, build_loss(cfg.train).names)
    _validate_training(cfg.train, "train")
    need(not cfg.train.merge_adapter or cfg.train.peft is not None, "train.merge_adapter: only with train.peft")
    if cfg.sft.enabled:
        need(cfg.model.reference_path is None,
             f"model.reference_path and sft.enabled: the sft stage trains the reference from model.path, and "
             f"model.reference_path ({cfg.model.reference_path}) names another one; give one of them")
        _validate_training(cfg.sft_training(), "sft")
        if isinstance(cfg.sft.data, SFTDataConfig):
            _validate_data_source(cfg.sft.data, "sft.data")
        need(not (cfg.model.attn_implementation == "flex_attention" and not cfg.sft.use_gpu),
             "model.attn_implementation: flex_attention has no backward on CPU (sft.use_gpu is false); "
             "use segment_sdpa")
    if cfg.model.dtype == "float16":
        raise ConfigError("model.dtype: float16 is not supported (use bfloat16 or float32)")


def rename_group(message: str, group: str, to: str) -> str:
    """A message about ``group``'s keys (``train.zero_stage``) said of another group that has
    the same keys (``sft.zero_stage``); a value quoted in it (``my_train.v1``) is left alone."""
    import re

    return re.sub(rf"(?<![\w.]){re.escape(group)}\.(?=\w)", f"{to}.", message) if group != to else message


def _validate_data_source(data, group: str) -> None:
    """Where rows come from (``data``, or the sft stage's own ``sft.data``): exactly one of
    train_files, hf_dataset and sources, each well formed; messages name ``<group>.<key>``."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(rename_group(msg, "data", group))

    given = [k for k in ("train_files", "hf_dataset", "sources") if getattr(data, k)]
    need(len(given) == 1, "data.train_files, data.hf_dataset or data.sources: exactly one is required"
         + (f" (set: {', '.join('data.' + k for k in given)})" if given else ""))

    def check_hf_dataset(spec: Any, key: str) -> None:
        known = {"path", "name", "split", "data_files", "revision"}
        need(isinstance(spec, dict), f"{key}: a mapping of {sorted(known)}")
        bad = sorted(set(spec) - known)
        need(not bad, f"{key}: unknown key {bad[0] if bad else ''}; valid keys: {sorted(known)}")
        need("path" in spec, f"{key}.path: required")

    if data.hf_dataset is not None:
        check_hf_dataset(data.hf_dataset, "data.hf_dataset")
    if data.sources is not None:
        from pipeline.core import mixing

        mixing.check(data.sources, need, check_hf_dataset)
    need(0.0 <= data.eval_fraction < 1.0, "data.eval_fraction: must be in [0, 1)")


def _validate_training(train_cfg: TrainingSettings, group: str) -> None:
    """The options a training stage (train, sft) reads; messages name ``<group>.<key>``."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(rename_group(msg, "train", group))

    need(train_cfg.learning_rate > 0, "train.learning_rate: must be > 0")
    need(0.0 <= train_cfg.warmup_ratio < 1.0, "train.warmup_ratio: must be in [0, 1)")
    need(train_cfg.warmup_steps >= 0, "train.warmup_steps: must be >= 0")
    need(0.0 <= train_cfg.min_lr_ratio <= 1.0, "train.min_lr_ratio: must be in [0, 1]")
    need(train_cfg.num_train_epochs >= 1 or train_cfg.max_steps > 0, "train.num_train_epochs: must be >= 1")
    need(train_cfg.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps: must be >= 1")
    need(train_cfg.max_grad_norm >= 0, "train.max_grad_norm: must be >= 0 (0 disables clipping)")
    need(train_cfg.num_workers >= 1, "train.num_workers: must be >= 1")
    need(train_cfg.logging_steps >= 1, "train.logging_steps: must be >= 1")
    need(train_cfg.eval_steps >= 1, "train.eval_steps: must be >= 1")
    need(train_cfg.save_steps >= 0, "train.save_steps: must be >= 0 (0: no periodic checkpoints)")
    need(train_cfg.save_total_limit is None or train_cfg.save_total_limit >= 1, "train.save_total_limit: must be >= 1 or null")
    need(train_cfg.max_failures >= -1, "train.max_failures: must be >= 0, or -1 for unlimited")
    from pipeline.core.tracking import TRACKERS

    for tracker in train_cfg.report_to:
        need(tracker in TRACKERS, f"train.report_to: {tracker!r} is not one of {', '.join(TRACKERS)}")
    if train_cfg.peft is not None:
        need(train_cfg.peft.r >= 1, "train.peft.r: must be >= 1")
        need(0.0 <= train_cfg.peft.dropout < 1.0, "train.peft.dropout: must be in [0, 1)")


def build_loss(train_cfg: TrainConfig) -> "PreferenceLoss":  # noqa: F821
    """The run's loss object from the flat, TRL-named ``train`` fields. Built at config load
    (which checks it), by the runner (is there a score stage?) and once by the train
    driver, whose object the ranks receive."""
    import dataclasses as dc

    from pipeline.core.losses import LossSettingError, PreferenceLoss

    settings = {f.name: getattr(train_cfg, f.name) for f in dc.fields(PreferenceLoss) if f.init}
    try:
        return PreferenceLoss(**settings)
    except LossSettingError as e:
        raise ConfigError(f"train.{e}") from e


def _validate_loss_context(train_cfg: TrainConfig, names: list[str]) -> None:
    """Loss settings that meet the log-prob pass's: aggregation, LD-DPO, WPO, and the
    options that need a live reference model."""
    from pipeline.core.losses import LOSSES

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    if train_cfg.ld_alpha is not None:
        need(0.0 <= train_cfg.ld_alpha <= 1.0, "train.ld_alpha: must be in [0, 1]")
        need(train_cfg.aggregation == "sum", "train.ld_alpha: LD-DPO re-weights summed log-probs; "
                                     "use train.aggregation: sum")
    if train_cfg.aggregation == "mean":
        normed = [x for x in names if LOSSES[x].length_normalised]
        need(not normed, f"train.aggregation: mean would length-normalise {normed} twice")
    sorting = [x for x in names if LOSSES[x].sorts_pairs]
    need(not (train_cfg.use_weighting and sorting),
         f"train.use_weighting: WPO weights are per pair and {'/'.join(sorting)} sort pairs")
    need(not train_cfg.sync_ref_model,
         "train.sync_ref_model: TR-DPO updates the reference during training; this pipeline scores "
         "the reference once, offline (no reference model at train time)")
    need(train_cfg.ref_model_mixup_alpha is None,
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
    return config_from_dict(raw)


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


def config_from_dict(raw: dict) -> PipelineConfig:
    cfg = _build(PipelineConfig, _inherit_train(raw), "")
    _read_files(cfg)
    _validate(cfg)
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
    driver's working directory (Ray Train runs them in its storage directory)."""
    out = to_dict(cfg)
    out["run_dir"] = _absolute(cfg.run_dir)
    for group in ("train", "sft"):
        if out.get(group):
            out[group]["resume_from_checkpoint"] = resume_location(out[group]["resume_from_checkpoint"])
    for key in ("path", "reference_path", "tokenizer_path"):  # a Hub id is left as it is
        if out["model"][key] and Path(out["model"][key]).expanduser().is_dir():
            out["model"][key] = _absolute(out["model"][key])
    out["tokenize"]["chat_template"] = _absolute(out["tokenize"]["chat_template"])
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
