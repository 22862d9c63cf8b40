"""The run's groups of settings that are not training: the model, the data, tokenize,
score, generate and the cluster, and the error every config check raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


class DataError(ValueError):
    """Input data the user can fix (a file in no format, too many bad rows, no pairs left):
    the message names the file, the key or the quarantine file. Like a ConfigError it ends a
    run in one line and exit code 2, not a traceback."""


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
    # Ray actors that tokenize; they also write the rows. Kept warm for the next stage that
    # asks for actors of the same CPUs and GPUs: score, or (on CPUs) train's ranks when they
    # are as many as train.num_workers with train.cpus_per_worker each (cluster/workers.py).
    actors: int = 1
    # CPUs per tokenize actor (a fraction lets two share a CPU).
    num_cpus_per_actor: float = 0.5
    # Stage fails when more than this fraction of the records (pairs, each rejected
    # completion of a row counted) is quarantined as bad (dropped duplicates do not count).
    max_bad_fraction: float = 0.05


@dataclass
class ModelActors:
    """Where a stage's model-holding actors run (score's and generate's): each loads its
    models once and takes a shard a call."""

    # Actors, each holding the stage's models (score: the reference; generate: the policy, the
    # reference and the reward model).
    actors: int = 1
    # 1 on GPU workers (generate with vLLM: its tensor_parallel_size).
    num_gpus_per_actor: float = 0.0
    # CPUs per actor; the same as tokenize's keeps tokenize's actors for this stage (see
    # tokenize.actors).
    num_cpus_per_actor: float = 0.5
    # torch intra-op threads per actor on CPU.
    cpu_threads: int = 1


@dataclass
class ScoreConfig(ModelActors):
    # Rows an actor scores in one call. null: whole shards, unless there are fewer than 4
    # shards an actor to score: then pieces of (their rows / 4 x actors), so the actors finish
    # together instead of one scoring the last shard alone. A split shard's pieces are joined
    # into it; the scored rows are the same bytes either way.
    rows_per_task: Optional[int] = None


@dataclass
class GenerateConfig(ModelActors):
    # Off by default. On: after train, the trained policy and the reference answer the same
    # prompts, side by side in the report (docs/generate.md).
    enabled: bool = False
    # Prompts drawn (with generate.seed) from the eval split's, as tokenize stored them: the
    # prompt tokens trained on. All of them when fewer.
    num_prompts: int = 50
    # Or a JSON Lines file of {"prompt": text, or a list of chat messages}, rendered with the
    # chat template and its generation prompt. null: the eval split's prompts.
    prompts_file: Optional[str] = None
    # Completion tokens at most; a completion ends earlier at EOS or the end-of-turn token.
    max_new_tokens: int = 64
    # 0: greedy.
    temperature: float = 0.0
    # Nucleus sampling (with a temperature).
    top_p: float = 1.0
    # Completions per prompt and model.
    num_samples: int = 1
    # Draws the prompts and seeds the sampling.
    seed: int = 0
    # auto: vLLM where it is installed and the actors have GPUs, HF generate otherwise.
    engine: Literal["auto", "vllm", "hf"] = "auto"
    # vLLM's tensor parallelism: GPUs a model is split over.
    tensor_parallel_size: int = 1
    # A sequence-classification reward model (local path, Hub id or URI) that scores every
    # completion: win rates of the policy against the reference and the chosen answers.
    # null: no judge.
    reward_model: Optional[str] = None
    # Prompts an output shard holds: what a generate call batches, and what a rerun resumes by.
    prompts_per_shard: int = 16
    # Prompts shown side by side in the report.
    show: int = 5


@dataclass
class DeviceConfig:
    # The memory of the device one train rank (or score actor) runs on, in GiB: a GPU's
    # memory, or a CPU rank's share of its node's. `pipeline plan` compares its per-rank
    # totals with it; null (unknown): nothing is compared.
    memory_gib: Optional[float] = None
    # The device's dense peak TFLOP/s in model.dtype, the denominator of the train and
    # score metrics' mfu. null: the vendor's figure where the GPU is known
    # (pipeline/core/flops.py, PEAK_TFLOPS), else no mfu is logged.
    peak_tflops: Optional[float] = None


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
    # Local cluster only: Ray's dashboard on 127.0.0.1 (port 8265, or the next free one Ray
    # prints), to look at a run's actors and logs. Off by default: its head modules used about 2.5 of the 42 core-seconds of a demo
    # run on 2 cores (#37); the cluster a job is submitted to has its own.
    dashboard: bool = False
    # A progress line (items done of all) every 30 s while tokenize, score or generate work on
    # their actors (Ray Data's progress bars until #37: the name is kept).
    progress_bars: bool = True
