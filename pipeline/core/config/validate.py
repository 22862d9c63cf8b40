"""The checks a config passes when it is loaded: each setting's range, the combinations
that cannot work, the loss settings (the loss object checks itself), the data sources.
Every message names the full key (``train.beta``; ``sft.zero_stage`` for the sft group)."""

from __future__ import annotations

from typing import Any


from .groups import ConfigError
from .run import PipelineConfig
from .training import SFTDataConfig, TrainConfig, TrainingSettings


# Attention implementations that can run rows whose rejected segments share the prompt.
PROMPT_SHARING_ATTENTION = ("segment_sdpa", "sdpa", "eager")


def shares_prompt(cfg: PipelineConfig) -> bool:
    """``tokenize.share_prompt`` resolved: null means on where the attention can run it."""
    if cfg.tokenize.share_prompt is not None:
        return cfg.tokenize.share_prompt
    return cfg.model.attn_implementation in PROMPT_SHARING_ATTENTION


def _validate(cfg: PipelineConfig, handed_on: bool = False) -> None:
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
    need(cfg.score.rows_per_task is None or cfg.score.rows_per_task >= 1,
         f"score.rows_per_task: must be >= 1 (or null: whole shards, split when few), got {cfg.score.rows_per_task}")
    for key in ("memory_gib", "peak_tflops"):
        value = getattr(cfg.device, key)
        need(value is None or value > 0, f"device.{key}: must be > 0 (or null: unknown), got {value}")
    need(cfg.model.logp_chunk_tokens >= 1, "model.logp_chunk_tokens: must be >= 1")
    _validate_loss_context(cfg.train, build_loss(cfg.train).names)
    _validate_training(cfg.train, "train")
    need(not cfg.train.merge_adapter or cfg.train.peft is not None, "train.merge_adapter: only with train.peft")
    if cfg.sft.enabled:
        need(handed_on or cfg.model.reference_path is None,
             f"model.reference_path and sft.enabled: the sft stage trains the reference from model.path, and "
             f"model.reference_path ({cfg.model.reference_path}) names another one; give one of them")
        _validate_training(cfg.sft_training(), "sft")
        if isinstance(cfg.sft.data, SFTDataConfig):
            _validate_data_source(cfg.sft.data, "sft.data")
        need(not (cfg.model.attn_implementation == "flex_attention" and not cfg.sft.use_gpu),
             "model.attn_implementation: flex_attention has no backward on CPU (sft.use_gpu is false); "
             "use segment_sdpa")
    if cfg.generate.enabled:
        _validate_generate(cfg.generate, need)
        need(cfg.generate.prompts_file is not None or cfg.data.eval_fraction > 0,
             "generate.prompts_file: the prompts come from the eval split, and data.eval_fraction is 0; "
             "give a prompts file or an eval fraction")
        need(cfg.train.peft is None or cfg.train.merge_adapter,
             "generate.enabled with train.peft: generate loads the trained policy as a plain model; set "
             "train.merge_adapter: true")
    if cfg.model.dtype == "float16":
        raise ConfigError("model.dtype: float16 is not supported (use bfloat16 or float32)")


def _validate_generate(g, need) -> None:
    need(g.num_prompts >= 1, "generate.num_prompts: must be >= 1")
    need(g.max_new_tokens >= 1, "generate.max_new_tokens: must be >= 1")
    need(g.temperature >= 0, "generate.temperature: must be >= 0 (0: greedy)")
    need(0 < g.top_p <= 1, "generate.top_p: must be in (0, 1]")
    need(g.num_samples >= 1, "generate.num_samples: must be >= 1")
    need(g.num_samples == 1 or g.temperature > 0,
         "generate.num_samples: greedy decoding (temperature 0) gives one completion a prompt; set a temperature")
    need(g.prompts_per_shard >= 1, "generate.prompts_per_shard: must be >= 1")
    need(g.actors >= 1, "generate.actors: must be >= 1")
    need(g.show >= 0, "generate.show: must be >= 0")
    need(g.tensor_parallel_size >= 1, "generate.tensor_parallel_size: must be >= 1")
    need(g.tensor_parallel_size == 1 or g.engine == "vllm",
         "generate.tensor_parallel_size: only with generate.engine: vllm (HF generate runs a model on one device)")
    need(g.engine != "vllm" or g.num_gpus_per_actor >= g.tensor_parallel_size,
         "generate.num_gpus_per_actor: vLLM splits each model over generate.tensor_parallel_size GPUs, which an "
         "actor must have (or engine: hf)")


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
        if group != "data":  # sft's rows are read by their own keys (messages_key ...), one set for all
            for i, src in enumerate(data.sources):
                own = [k for k in mixing.COLUMN_KEYS if isinstance(src, dict) and k in src]
                need(not own, f"data.sources[{i}].{own[0] if own else ''}: per-source column names are for the "
                              "preference pairs' sources; the sft stage's own data is read by its own keys "
                              "(messages_key, prompt_key, completion_key)")
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
    _validate_tr_dpo(train_cfg, names)


def _validate_tr_dpo(train_cfg: TrainConfig, names: list[str]) -> None:
    """TR-DPO's settings: the reference it refreshes must be one the loss reads, partitioned
    like the policy (ZeRO-3), mixed from the policy's fp32 weights read parameter by parameter."""
    from pipeline.core.losses import LOSSES

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    if not train_cfg.sync_ref_model:
        need(train_cfg.ref_model_mixup_alpha is None,
             "train.ref_model_mixup_alpha: TR-DPO's alpha applies only with train.sync_ref_model: true")
        return
    need(not all(LOSSES[x].reference_free for x in names),
         f"train.sync_ref_model: {'/'.join(names)} read no reference log-probs, so there is no reference to "
         "refresh (TR-DPO needs a loss against a reference)")
    need(not train_cfg.reference_free, "train.sync_ref_model: train.reference_free treats the reference "
                                       "log-probs as 0, so there is no reference to refresh")
    alpha = train_cfg.ref_model_mixup_alpha
    need(alpha is None or 0.0 < alpha <= 1.0, f"train.ref_model_mixup_alpha: must be in (0, 1] (it is {alpha}); "
                                              "0 would never move the reference")
    need(train_cfg.ref_model_sync_steps >= 1, "train.ref_model_sync_steps: must be >= 1")
    need(train_cfg.zero_stage in (3, "auto"),  # auto resolves to 3 under TR-DPO
         f"train.sync_ref_model: the ranks hold the reference partitioned like the policy, which needs "
         f"train.zero_stage: 3 (it is {train_cfg.zero_stage})")
    zero = (train_cfg.deepspeed or {}).get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        need((zero.get(key) or {}).get("device") != "nvme",
             f"train.sync_ref_model: the refresh reads the policy's weights parameter by parameter, which "
             f"train.deepspeed's {key} on nvme keeps swapped out; offload to cpu instead")
