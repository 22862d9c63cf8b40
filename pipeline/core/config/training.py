"""A training stage's settings: what every training stage trains with
(``TrainingSettings``), the train stage's preference loss (``PreferenceSettings``), the
train group (both) and the sft group (the training settings and its own keys)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union


from .groups import RowSource


@dataclass
class LoraSettings:
    """LoRA through peft; the reference is the base model (model.reference_path, or model.path), scored
    offline (with TR-DPO, mixed with the merged policy)."""

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
    # Eval every N steps, and at the end.
    eval_steps: int = 50
    # Also eval before the first step (TRL's name). On by default, unlike TRL: step 0 is
    # where a run shows the policy equals the reference it was scored with (a DPO eval loss
    # of ln 2) and, for sft, the base model's eval figure; it costs one pass over the eval
    # split. false skips it.
    eval_on_start: bool = True
    # DeepSpeed checkpoint every save_steps optimizer steps (0: none); the last
    # save_total_limit complete ones are kept (null: all). A final one is written before the
    # export (a failed export loses no training); with 0 it is removed once the export is done.
    save_steps: int = 0
    save_total_limit: Optional[int] = 2
    # null: resume from the newest complete checkpoint of this run's output if there is one;
    # a tag ("step-00000100") or a checkpoint directory: resume from it, or fail.
    resume_from_checkpoint: Optional[str] = None
    # After a rank fails (raises, or its process or node dies), every rank is started again
    # this many times (-1: without limit); they resume from the newest complete checkpoint.
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
    # Ranks: one Ray actor each (one process on the driver with --no-ray).
    num_workers: int = 2
    # One GPU per worker and NCCL; gloo on CPU.
    use_gpu: bool = False
    # CPUs per rank (torch threads on CPU).
    cpus_per_worker: float = 1.0
    # DeepSpeed ZeRO stage; auto: the lowest whose plan (`pipeline plan`) fits
    # device.memory_gib, resolved from the config alone before any stage (3 with the memory
    # unknown, or where none fits); the resolved stage is what the fingerprint holds.
    zero_stage: Literal[0, 1, 2, 3, "auto"] = 3
    # Your own DeepSpeed config: a JSON file's path (read when the config is loaded, so its
    # content is in the fingerprint) or a mapping, deep-merged over the one the pipeline
    # builds, as the HF Trainer's --deepspeed: ZeRO-Offload (cpu; nvme where libaio is
    # installed), bucket sizes, communication. The keys the pipeline sets from these
    # settings may be repeated or "auto", not changed (docs/deepspeed.md).
    deepspeed: Optional[Union[str, dict[str, Any]]] = None


TR_DPO_ALPHA = 0.6  # TRL 1.16's ref_model_mixup_alpha


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
    # TR-DPO (TRL's names): every ref_model_sync_steps steps the reference becomes
    # alpha * policy + (1 - alpha) * reference, and the ranks rescore the coming steps' rows
    # and the eval rows with it (docs/tr-dpo.md). ZeRO-3 only; not with reference-free losses.
    sync_ref_model: bool = False
    # TR-DPO's alpha, in (0, 1]; null: TRL's 0.6. Only with sync_ref_model.
    ref_model_mixup_alpha: Optional[float] = None
    # TR-DPO's tau: optimizer steps between refreshes (TRL's default).
    ref_model_sync_steps: int = 512

    @property
    def mixup_alpha(self) -> float:
        """TR-DPO's alpha as it applies: null is TRL's 0.6."""
        return TR_DPO_ALPHA if self.ref_model_mixup_alpha is None else self.ref_model_mixup_alpha


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
