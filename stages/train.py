"""train: the policy against the precomputed reference columns, DeepSpeed ZeRO-3 on Ray Train.

``train_worker`` is the per-rank loop (Ray Train calls it on every worker; it also runs
in-process with one rank). It reads top to bottom: build the engine, then for each step
of a seeded plan: forward a packed row, ``pipeline.logps``, ``pipeline.losses``,
``engine.backward``, ``engine.step``, metrics; eval at step 0, every ``eval_steps`` and at
the end; export the consolidated model.

Loss scaling: a step's loss is the sum of per-pair losses over every pair of the step (all
micro-batches, all ranks) divided by that pair count, which every rank knows from the
plan. DeepSpeed divides each micro-batch loss by the accumulation steps and averages the
gradients over ranks; each micro-batch loss is multiplied by ``world * accum`` to undo it.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import losses as losses_mod
from pipeline.config import (PipelineConfig, config_from_dict, for_workers, loss_plan,
                             needs_reference)
from pipeline.logps import (packed_token_logps, segment_sums, segment_token_counts,
                            sequence_logps, wpo_pair_weights)
from pipeline.modeling import load_causal_lm, moe_router, row_inputs, to_device
from pipeline.offload import offload_activations
from pipeline.packing import MicroBatch, epoch_plan, eval_plan
from pipeline.rundir import HashCache, ShardInfo, atomic_write_text, hash_checkpoint
from pipeline.storage import Loc

STAGE_VERSION = 1
EXPORT_DIR = "model"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
COMPLETE = "COMPLETE.json"  # written in a checkpoint's folder once every rank's part is on disk


# ----------------------------------------------------------------------------- data


class RowReader:
    """Random access to packed rows across Parquet shards, one row group at a time.

    Ranks read only the rows their plan names (no full copy of the dataset per worker)."""

    COLUMNS = ["input_ids", "position_ids", "seq_lens", "prompt_lens", "ref_logps", "num_tokens"]

    def __init__(self, files: list[Loc], columns: list[str] | None = None):
        self.files = [pq.ParquetFile(Loc(f).open_input()) for f in files]
        self.columns = columns or self.COLUMNS
        self.groups: list[tuple[int, int]] = []  # (file, row group) in row order
        self.starts: list[int] = []
        n = 0
        for fi, pf in enumerate(self.files):
            for g in range(pf.metadata.num_row_groups):
                self.groups.append((fi, g))
                self.starts.append(n)
                n += pf.metadata.row_group(g).num_rows
        self.num_rows = n
        self.pairs_per_row = np.array(
            [len(s) // 2 for pf in self.files for s in pf.read(columns=["seq_lens"]).column(0).to_pylist()],
            dtype=np.int64,
        )
        self._group = lru_cache(maxsize=4)(self._read_group)

    def _read_group(self, k: int) -> list[dict]:
        fi, g = self.groups[k]
        return self.files[fi].read_row_group(g, columns=self.columns).to_pylist()

    def __getitem__(self, row: int) -> dict:
        k = bisect.bisect_right(self.starts, row) - 1
        return self._group(k)[row - self.starts[k]]


def split_files(scored_dir: Loc, split: str) -> list[Loc]:
    return Loc(scored_dir).glob(f"{split}-*.parquet")


# ----------------------------------------------------------------------------- optim


def lr_lambda(kind: str, warmup: int, total: int, min_ratio: float):
    """LR multiplier per optimizer step, as transformers' schedules (lr 0 at step 0 of a
    warmup); cosine decays to ``min_ratio`` (seed minimind's floor) instead of 0."""

    def fn(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 placeholders keep the real shape here
        is_1d = len(shape) < 2 or name.endswith(".bias") or "norm" in name.lower()
        (no_decay if is_1d else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: PipelineConfig) -> torch.optim.Optimizer:
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    if t.optimizer == "rmsprop":  # the DPO paper's optimizer
        return torch.optim.RMSprop(groups, lr=t.learning_rate, eps=t.adam_epsilon)
    return torch.optim.AdamW(
        groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon
    )


# ----------------------------------------------------------------------------- math


@dataclass
class PairBatch:
    """Per-pair inputs of the loss for one packed row, (B,) each."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    chosen_nll_sum: torch.Tensor  # plain sum of chosen token log-probs (NLL terms)
    pair_weights: torch.Tensor | None  # WPO
    tokens: int
    aux_loss: torch.Tensor | None = None  # MoE router load balancing, already weighted


def row_logps(model, row: dict, cfg: PipelineConfig, device) -> PairBatch:
    """The policy's log-prob pass over one packed row, aggregated with the stored
    reference columns the same way (sum / mean / LD-DPO)."""
    tr = cfg.train
    input_ids, position_ids, layout = row_inputs(row, device)
    router = moe_router(model, tr.router_aux_loss_coef)
    tok = packed_token_logps(model, input_ids, position_ids, layout,
                             cfg.model.logp_chunk_tokens, log_sum_sq=tr.use_weighting,
                             router_logits=router is not None)
    seq = sequence_logps(tok.logps, layout, tr.aggregation, tr.ld_alpha)
    if not needs_reference(cfg):
        ref = torch.zeros_like(seq)
    else:
        ref_tok = to_device(torch.tensor(row["ref_logps"], dtype=torch.float32), device)
        ref = sequence_logps(ref_tok, layout, tr.aggregation, tr.ld_alpha)
    lengths = segment_token_counts(layout).float()
    weights = None
    if tr.use_weighting:
        w = wpo_pair_weights(segment_sums(tok.logps - tok.log_sum_sq, layout), lengths)
        weights = w[0::2] * w[1::2]
    aux = None
    if router is not None:
        coef, experts, top_k = router
        aux = coef * losses_mod.router_load_balancing_loss(tok.router_logits, experts, top_k)
    return PairBatch(seq[0::2], seq[1::2], ref[0::2], ref[1::2], lengths[0::2], lengths[1::2],
                     segment_sums(tok.logps, layout)[0::2], weights, int(row["num_tokens"]), aux)


METRIC_KEYS = ("rows", "pairs", "aux_loss", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
               "rewards/margins", "logps/chosen", "logps/rejected", "tokens")


COUNT_KEYS = ("rows", "pairs", "tokens")  # known on the host
SUM_KEYS = tuple(k for k in METRIC_KEYS if k not in COUNT_KEYS)  # summed on the device


class MetricSums:
    """Sums over pairs; all-reduced across ranks before they become means.

    The sums stay on the run's device until ``reduce``: adding a micro-batch never waits
    for its kernels (no ``.item()`` per micro-batch), and the all-reduce gets a tensor of
    the device NCCL needs."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self.sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64, device=self.device)

    def add(self, batch: PairBatch, out: losses_mod.LossOutput, weight: float) -> None:
        if weight == 0.0:
            return
        pairs = batch.chosen.numel()
        self.counts["rows"] += 1
        self.counts["pairs"] += pairs
        self.counts["tokens"] += batch.tokens
        chosen, rejected = out.chosen_rewards.double(), out.rejected_rewards.double()
        aux = (batch.aux_loss.detach().double() * pairs if batch.aux_loss is not None
               else torch.zeros((), dtype=torch.float64, device=chosen.device))
        values = {
            "aux_loss": aux,  # pair-weighted
            "loss": out.losses.detach().double().sum(),
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/accuracies": (chosen > rejected).double().sum(),
            "rewards/margins": (chosen - rejected).sum(),
            "logps/chosen": batch.chosen.detach().double().sum(),
            "logps/rejected": batch.rejected.detach().double().sum(),
        }
        self.sums += torch.stack([values[k] for k in SUM_KEYS]).to(self.device)

    def reduce(self, prefix: str = "") -> dict:
        import torch.distributed as dist

        counts = torch.tensor([float(self.counts[k]) for k in COUNT_KEYS], dtype=torch.float64)
        vec = torch.cat([counts.to(self.device), self.sums])
        if dist.is_initialized():
            dist.all_reduce(vec)
        total = dict(zip(COUNT_KEYS + SUM_KEYS, vec.tolist()))
        n = max(total["pairs"], 1.0)
        out = {f"{prefix}{k}": total[k] / n for k in METRIC_KEYS if k not in COUNT_KEYS}
        out.update({f"{prefix}{k}": int(total[k]) for k in COUNT_KEYS})
        if total["aux_loss"] == 0.0:  # a dense model: no router loss to report
            del out[f"{prefix}aux_loss"]
        return out


def loss_options(cfg: PipelineConfig) -> dict:
    """preference_loss keyword arguments from the train config (read here only)."""
    t = cfg.train
    names, weights = loss_plan(t)
    return dict(loss_type=names, loss_weights=weights, beta=t.beta, label_smoothing=t.label_smoothing,
                f_divergence_type=t.f_divergence_type, f_alpha_divergence_coef=t.f_alpha_divergence_coef,
                discopop_tau=t.discopop_tau, simpo_gamma=t.simpo_gamma, cpo_alpha=t.cpo_alpha)


# ----------------------------------------------------------------------------- worker


def _init_distributed(backend: str) -> tuple[int, int]:
    import deepspeed

    # Skip DeepSpeed's shared-memory comm op: a g++ JIT build we do not need (ENVIRONMENT.md).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, default)
    deepspeed.init_distributed(dist_backend=backend)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


@dataclass
class Run:
    """What one rank knows about the run; built once, read by the loop's helpers."""

    cfg: PipelineConfig
    rank: int
    world: int
    device: torch.device
    train_rows: RowReader
    eval_rows: RowReader
    steps_per_epoch: int
    total_steps: int
    out: Loc  # the stage's output in the run directory (a local path or a URI)
    out_dir: Path  # where this rank writes: ``out`` itself, or local scratch uploaded to it
    ray_train: bool = False  # running under Ray Train: checkpoints are registered with it

    @property
    def staged(self) -> bool:
        return self.out.remote


def setup_run(config: dict) -> Run:
    cfg = config_from_dict(config["cfg"])
    t = cfg.train
    use_cuda = t.use_gpu and torch.cuda.is_available()
    rank, world = _init_distributed("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    torch.manual_seed(t.seed)
    rows_dir = Loc(config["rows_dir"])
    reference_free = not needs_reference(cfg)
    columns = [c for c in RowReader.COLUMNS if not (reference_free and c == "ref_logps")]
    train_rows = RowReader(split_files(rows_dir, "train"), columns)
    steps_per_epoch = math.ceil(train_rows.num_rows / (world * t.gradient_accumulation_steps))
    total_steps = t.max_steps if t.max_steps > 0 else t.num_train_epochs * steps_per_epoch
    out = Loc(config["out_dir"])
    return Run(cfg, rank, world, device, train_rows, RowReader(split_files(rows_dir, "eval"), columns),
               steps_per_epoch, total_steps, out, out.local or scratch_dir(cfg, out, rank),
               bool(config.get("ray_train")))


def scratch_dir(cfg: PipelineConfig, out: Loc, rank: int) -> Path:
    """A rank's local working directory for a URI run directory."""
    import hashlib
    import tempfile

    root = Path(cfg.train.local_dir or tempfile.gettempdir()) / "dpo-pipeline"
    path = root / hashlib.sha256(str(out).encode()).hexdigest()[:16] / f"rank-{rank}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def add_lora(model, lora):
    """LoRA adapters (peft) on the loaded policy; B starts at 0, so policy == base model
    (the reference) at step 0. Under ZeRO-3, DeepSpeed partitions the new parameters."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def build_engine(run: Run):
    """The policy, sharded while it loads (ZeRO-3), wrapped with optimizer and schedule."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from cluster.deepspeed_config import build_ds_config

    t = run.cfg.train
    ds_config = build_ds_config(run.cfg, run.world)
    if t.zero_stage == 3:
        from cluster import zero3_linear

        zero3_linear.install()  # ZeRO-3's memory-saving linear with torch's forward bits
    # zero.Init is on while this object lives, so from_pretrained partitions the weights.
    hf_ds = HfDeepSpeedConfig(ds_config) if t.zero_stage == 3 else None
    model = load_causal_lm(run.cfg.model.path, run.cfg.model)
    if hf_ds is not None and not hasattr(next(model.parameters()), "ds_id"):
        raise RuntimeError("ZeRO-3: the policy was not partitioned while loading "
                           "(HfDeepSpeedConfig was not active during from_pretrained)")
    if t.peft is not None:
        model = add_lora(model, t.peft)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * run.total_steps)
    schedule = lr_lambda(t.lr_scheduler_type, warmup, run.total_steps, t.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, run.cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config,
    )
    engine.train()
    return engine


def planned_steps(run: Run, done: int = 0):
    """(step number from 1, the step's plan) for every step after ``done``, epoch after
    epoch. The plans are a function of (seed, epoch), so a resumed run replays none."""
    t = run.cfg.train
    step = 0
    for epoch in range(math.ceil(run.total_steps / run.steps_per_epoch)):
        if (epoch + 1) * run.steps_per_epoch <= done:
            step += run.steps_per_epoch
            continue
        for step_plan in epoch_plan(run.train_rows.num_rows, run.world,
                                    t.gradient_accumulation_steps, t.seed, epoch):
            if step == run.total_steps:
                return
            step += 1
            if step > done:
                yield step, step_plan


# ----------------------------------------------------------------------------- checkpoints


def complete_checkpoints(out: Loc) -> list[Loc]:
    """Checkpoint folders whose every rank finished writing, oldest first."""
    found = [p for p in (Loc(out) / CHECKPOINT_DIR).glob("step-*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: json.loads((p / COMPLETE).read_text())["step"])


def rank_files(files: list[str], rank: int) -> list[str]:
    """The files of a ZeRO checkpoint one rank loads: its own partition
    (``*zero_pp_rank_<rank>_*``) and the unpartitioned ones."""
    return [f for f in files if "zero_pp_rank_" not in f or f"zero_pp_rank_{rank}_" in f]


def save_checkpoint(engine, run: Run, step: int, log: "MetricsLog") -> None:
    """Model, optimizer and LR-scheduler state (DeepSpeed, each rank its own part), the
    step (the data position: plans are deterministic) and the RNG state.

    With a URI run directory each rank writes to its scratch directory and uploads only
    its own files. DeepSpeed's own ``latest`` is written by rank 0 before the other ranks
    finish; ours (``COMPLETE.json``, ``latest_complete``) is written only after the barrier
    that follows every rank's part, so it never names a partial checkpoint. Under Ray Train
    the complete checkpoint is then registered (``ray.train.report``, no second copy)."""
    import torch.distributed as dist

    root = run.out_dir / CHECKPOINT_DIR
    tag = f"step-{step:08d}"
    final = run.out / CHECKPOINT_DIR / tag
    engine.save_checkpoint(str(root), tag=tag, save_latest=False,
                           client_state={"step": step, "world_size": run.world, "rng": torch.get_rng_state()})
    if run.staged:
        final.upload(root / tag)
        shutil.rmtree(root / tag)
    if dist.is_initialized():
        dist.barrier()
    if run.rank == 0:
        info = {"step": step, "world_size": run.world, "zero_stage": run.cfg.train.zero_stage}
        (final / COMPLETE).write_text(json.dumps(info))
        (run.out / CHECKPOINT_DIR / "latest_complete").write_text(tag)
        limit = run.cfg.train.save_total_limit
        for old in complete_checkpoints(run.out)[:-limit] if limit else []:
            old.rmtree()
        log.sync()
    if dist.is_initialized():
        dist.barrier()
    if run.ray_train:
        register_checkpoint(run, step, final)


def register_checkpoint(run: Run, step: int, final: Loc) -> None:
    """Tell Ray Train about a complete checkpoint where it already lies: the Ray Train run
    directory is ``<train output>/checkpoints``, so no upload happens (NO_UPLOAD). Every
    rank calls ``report``; rank 0 names the checkpoint."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    checkpoint = Checkpoint(path=final.path, filesystem=final.fs) if run.rank == 0 else None
    ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=final.name,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _checkpoint_to_resume(run: Run) -> Loc | None:
    spec = run.cfg.train.resume_from_checkpoint
    complete = complete_checkpoints(run.out)
    if spec is None:
        return complete[-1] if complete else None
    path = Loc(spec) if ("://" in spec or "/" in spec) else run.out / CHECKPOINT_DIR / spec
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume_from_checkpoint: {spec} does not exist")
    if not (path / COMPLETE).is_file():
        raise RuntimeError(f"train.resume_from_checkpoint: {path} is incomplete (not every rank finished "
                           f"writing it); complete ones: {[p.name for p in complete]}")
    return path


def resume(engine, run: Run, log: "MetricsLog") -> int:
    """Load the checkpoint to resume from, if any; returns the steps already done."""
    path = _checkpoint_to_resume(run)
    if path is None:
        log.truncate_after(-1)  # a fresh start: nothing logged by an earlier attempt stays
        return 0
    info = json.loads((path / COMPLETE).read_text())
    if info["world_size"] != run.world:
        raise RuntimeError(
            f"checkpoint {path} was written by {info['world_size']} workers and this run has {run.world}: "
            f"ZeRO partitions and the data plan depend on the worker count. Resume with "
            f"train.num_workers={info['world_size']}, or start a new run (--force)")
    if path.remote:  # fetch only this rank's part of the checkpoint
        local = run.out_dir / CHECKPOINT_DIR / path.name
        for name in rank_files([f.relative_to(path) for f in path.files()], run.rank):
            (path / name).download(local / name)
        load_root = local.parent
    else:
        load_root = path.local.parent
    load_path, client = engine.load_checkpoint(str(load_root), tag=path.name, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    torch.set_rng_state(client["rng"])
    log.fetch()
    log.truncate_after(client["step"])
    if run.rank == 0:
        print(f"[train] resumed from {path} at step {client['step']}", flush=True)
    return int(client["step"])


def pair_loss(model, row: dict, cfg: PipelineConfig, device) -> tuple[PairBatch, losses_mod.LossOutput]:
    """Per-pair losses of one packed row: the log-prob pass, then ``pipeline.losses``."""
    b = row_logps(model, row, cfg, device)
    out = losses_mod.preference_loss(
        b.chosen, b.rejected, b.ref_chosen, b.ref_rejected,
        chosen_lengths=b.chosen_lengths, rejected_lengths=b.rejected_lengths,
        pair_weights=b.pair_weights, chosen_nll_sum=b.chosen_nll_sum, **loss_options(cfg))
    return b, out


def train_step(engine, run: Run, step: int, step_plan: list[list[MicroBatch]]) -> dict:
    """One optimizer step: this rank's micro-batches, each scaled so the step's gradient is
    that of sum(per-pair loss) / (pairs in the step over all ranks)."""
    step_pairs = sum(run.train_rows.pairs_per_row[mb.row] * mb.weight
                     for rank_plan in step_plan for mb in rank_plan)
    scale = run.world * run.cfg.train.gradient_accumulation_steps / step_pairs
    lr = engine.get_lr()[0]
    sums, t0 = MetricSums(run.device), time.time()
    for mb in step_plan[run.rank]:
        with offload_activations(run.cfg.train.activation_offloading):
            batch, out = pair_loss(engine.module, run.train_rows[mb.row], run.cfg, run.device)
        loss = out.losses.sum() * (mb.weight * scale)
        if batch.aux_loss is not None:  # a mean over micro-batches once DeepSpeed divides
            loss = loss + mb.weight * batch.aux_loss
        engine.backward(loss)
        engine.step()
        sums.add(batch, out, mb.weight)
    metrics = sums.reduce()
    metrics.update(step=step, epoch=step / run.steps_per_epoch, learning_rate=lr,
                   grad_norm=float(engine.get_global_grad_norm() or 0.0),
                   tokens_per_second=metrics["tokens"] / max(time.time() - t0, 1e-9))
    return metrics


def evaluate(engine, run: Run, step: int) -> dict:
    sums = MetricSums(run.device)
    engine.module.eval()
    with torch.no_grad():
        for mb in eval_plan(run.eval_rows.num_rows, run.world)[run.rank]:
            batch, out = pair_loss(engine.module, run.eval_rows[mb.row], run.cfg, run.device)
            sums.add(batch, out, mb.weight)
    engine.module.train()
    return {"step": step, **sums.reduce("eval_")}


class MetricsLog:
    """metrics.jsonl and TensorBoard scalars (rank 0), and a progress line per logged step.

    With a URI run directory both are written locally and uploaded by ``sync`` (at each
    checkpoint and at the end); ``fetch`` brings the uploaded metrics back on resume."""

    def __init__(self, run: Run):
        from pipeline.tracking import Trackers

        self.run, self.start = run, time.time()
        self.path = run.out_dir / METRICS_FILE
        self.trackers = None
        if run.rank == 0:
            t = run.cfg.train
            config = {"model": asdict(run.cfg.model), "train": asdict(t)}
            self.trackers = Trackers(t.report_to, run.out_dir, t.run_name or f"dpo-{run.out.name}",
                                     run.out.name, config)

    def write(self, record: dict) -> None:
        if self.run.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.trackers.log(record)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()

    def sync(self) -> None:
        if self.run.rank == 0 and self.run.staged:
            if self.path.exists():
                (self.run.out / METRICS_FILE).upload(self.path)
            if (self.run.out_dir / "tensorboard").is_dir():
                (self.run.out / "tensorboard").upload(self.run.out_dir / "tensorboard")

    def fetch(self) -> None:
        remote = self.run.out / METRICS_FILE
        if self.run.rank == 0 and self.run.staged and remote.is_file():
            remote.download(self.path)

    def truncate_after(self, step: int) -> None:
        """On resume: drop what was logged after the checkpoint (it is logged again)."""
        if self.run.rank == 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def step(self, m: dict) -> None:
        every, total = self.run.cfg.train.logging_steps, self.run.total_steps
        if m["step"] % every and m["step"] not in (1, total):
            return
        self.write(m)
        if self.run.rank == 0:
            eta = (time.time() - self.start) / m["step"] * (total - m["step"])
            print(f"[train] step {m['step']}/{total} loss {m['loss']:.4f} "
                  f"acc {m['rewards/accuracies']:.3f} tok/s {m['tokens_per_second']:.0f} "
                  f"eta {eta:.0f}s", flush=True)


def export_model(engine, run: Run, info: dict) -> None:
    """Consolidated weights + tokenizer, loadable with ``from_pretrained``."""
    from transformers import AutoTokenizer

    if run.cfg.train.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # every rank takes part
    else:
        state = engine.module.state_dict()
    if run.rank == 0:
        export = run.out_dir / EXPORT_DIR
        # a PeftModel saves only its adapter (picked out of the full state dict)
        engine.module.save_pretrained(export, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(run.cfg.tokenizer_path).save_pretrained(export)
        (export / "dpo_pipeline.json").write_text(json.dumps(info, indent=2))
        if run.staged:
            (run.out / EXPORT_DIR).upload(export)


def merge_adapter(cfg: PipelineConfig, out: Loc) -> None:
    """model/merged: the base model with the trained adapter merged (peft's
    merge_and_unload), a plain HF checkpoint. Runs on the driver, after training."""
    from peft import PeftModel
    from transformers import AutoTokenizer
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import tempfile

    unset_hf_deepspeed_config()  # a plain load, not a ZeRO-3 partitioned one
    with tempfile.TemporaryDirectory() as tmp:
        export = (out / EXPORT_DIR).local
        if export is None:  # a URI run directory: merge in local scratch, then upload
            export = Path(tmp) / EXPORT_DIR
            (out / EXPORT_DIR).download(export)
        base = load_causal_lm(cfg.model.path, cfg.model)
        merged = PeftModel.from_pretrained(base, export).merge_and_unload()
        merged.save_pretrained(export / "merged", safe_serialization=True)
        AutoTokenizer.from_pretrained(export).save_pretrained(export / "merged")
        (out / EXPORT_DIR / "merged").upload(export / "merged")


def train_worker(config: dict) -> None:
    """One rank of training. ``config``: {"cfg": dict, "rows_dir", "out_dir", "info"}."""
    # DeepSpeed 0.19 calls torch.distributed collectives that torch 2.13 marks deprecated.
    warnings.filterwarnings("ignore", message=".*torch.distributed.*deprecated", category=FutureWarning)
    run = setup_run(config)
    # Each rank's pid, so operators (and the tests) can find and kill a worker.
    (run.out_dir / "workers").mkdir(exist_ok=True)
    (run.out_dir / "workers" / f"rank-{run.rank}.pid").write_text(str(os.getpid()))
    engine = build_engine(run)
    log = MetricsLog(run)
    t = run.cfg.train

    done = resume(engine, run, log)
    if done == 0:
        log.write(evaluate(engine, run, step=0))
    for step, step_plan in planned_steps(run, done):
        log.step(train_step(engine, run, step, step_plan))
        if step % t.eval_steps == 0 and step < run.total_steps:
            log.write(evaluate(engine, run, step))
        if t.save_steps and step % t.save_steps == 0 and step < run.total_steps:
            save_checkpoint(engine, run, step, log)
    log.write(evaluate(engine, run, run.total_steps))
    export_model(engine, run, config["info"])
    log.close()
    log.sync()


# ----------------------------------------------------------------------------- driver


# How a run is checkpointed, resumed, restarted, staged or tracked does not change what it trains.
RUN_ONLY_SETTINGS = ("save_steps", "save_total_limit", "resume_from_checkpoint", "max_failures", "local_dir",
                     "report_to", "run_name")


def fingerprint_inputs(cfg: PipelineConfig, cache: HashCache, upstream: str) -> dict:
    return {
        "version": STAGE_VERSION,
        "upstream": upstream,
        "policy_model": hash_checkpoint(cfg.model.path, "model", cache),
        "model_settings": asdict(cfg.model) | {"path": None, "reference_path": None,
                                               "tokenizer_path": None},
        "train_settings": {k: v for k, v in asdict(cfg.train).items() if k not in RUN_ONLY_SETTINGS},
    }


def verify_rows(rows_dir: Loc, tokenized_dir: Loc, fingerprints: dict) -> None:
    """Before the first step: the rows to train on are the tokenized rows, pair for pair,
    and the reference columns were scored from them. Refuses, naming what differs."""
    from pipeline.rundir import read_manifest

    rows_dir, tokenized_dir = Loc(rows_dir), Loc(tokenized_dir)
    manifest = read_manifest(rows_dir)
    if rows_dir != tokenized_dir:
        upstream = (manifest or {}).get("inputs", {}).get("upstream")
        if upstream != fingerprints["tokenize"]:
            raise RuntimeError(f"train: the reference columns in {rows_dir} were scored from tokenize output "
                               f"{upstream}, not {fingerprints['tokenize']}: rescore (--from score)")
    for split in ("train", "eval"):
        ours, theirs = split_files(rows_dir, split), split_files(tokenized_dir, split)
        if [p.name for p in ours] != [p.name for p in theirs]:
            raise RuntimeError(f"train: {split} shards differ between {rows_dir} {[p.name for p in ours]} "
                               f"and {tokenized_dir} {[p.name for p in theirs]}")
        for a, b in zip(ours, theirs):
            ids_a, ids_b = (pq.ParquetFile(x.open_input()).read(columns=["pair_ids"]).column(0).to_pylist()
                            for x in (a, b))
            if ids_a != ids_b:
                k = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y) if len(ids_a) == len(ids_b) else 0
                raise RuntimeError(f"train: {a.name} row {k}: pair_ids {ids_a[k] if ids_a else None} in {rows_dir} "
                                   f"but {ids_b[k] if ids_b else None} in the tokenized rows {tokenized_dir}")


def read_metrics(out: Loc) -> list[dict]:
    path = Loc(out) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def summarize(out: Loc) -> dict:
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    return {
        "steps": train[-1]["step"] if train else 0,
        "step0_loss": train[0]["loss"] if train else None,
        "final_loss": train[-1]["loss"] if train else None,
        "eval_step0_loss": evals[0]["eval_loss"] if evals else None,
        "final_eval": {k: v for k, v in evals[-1].items()} if evals else {},
        "rows": int(sum(r["rows"] for r in train)),
        "tokens": int(sum(r["tokens"] for r in train)),
        "export": str(Loc(out) / EXPORT_DIR),
    }


def _worker_config(cfg: PipelineConfig, rows_dir: Loc, out: Loc, info: dict, ray_train: bool = False) -> dict:
    return {"cfg": for_workers(cfg), "rows_dir": str(Loc(rows_dir)), "out_dir": str(Loc(out)), "info": info,
            "ray_train": ray_train}


def outputs(cfg: PipelineConfig, out: Loc) -> tuple[list[ShardInfo], dict]:
    """The files the manifest commits (metrics and the exported model) and the summary."""
    out = Loc(out)
    if cfg.train.merge_adapter:
        merge_adapter(cfg, out)
    files = [out / METRICS_FILE] + (out / EXPORT_DIR).files()
    return [ShardInfo.of(f, 0, base=out) for f in files], summarize(out)


def run_local(cfg: PipelineConfig, rows_dir: Loc, out: Loc, info: dict):
    """One rank in this process (no Ray): the benchmarks' and the GPU machine's path.
    ``rows_dir``: the scored rows, or the tokenized rows for a reference-free loss."""
    verify_rows(rows_dir, Loc(info["tokenized_dir"]), info["fingerprints"])
    train_worker(_worker_config(cfg, rows_dir, out, info))
    return outputs(cfg, out)


def run(cfg: PipelineConfig, rows_dir: Loc, out: Loc, info: dict):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    verify_rows(rows_dir, Loc(info["tokenized_dir"]), info["fingerprints"])
    out = Loc(out)
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=_worker_config(cfg, rows_dir, out, info, ray_train=True),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        # Ray Train's run directory is our checkpoints folder, so registering a checkpoint
        # (register_checkpoint) copies nothing.
        run_config=RunConfig(storage_path=str(out), name=CHECKPOINT_DIR,
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
    trainer.fit()
    return outputs(cfg, out)
