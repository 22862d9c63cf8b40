"""The per-rank training loop, shared by every training stage.

``train_worker`` runs on each rank's Ray actor (cluster.rank_group; or in-process as one rank) and reads top
to bottom: set up the rank, build the engine, resume, then for each step of the seeded
plan: the objective on each micro-batch, ``engine.backward``, ``engine.step``, metrics;
eval at step 0 (``eval_on_start``), every ``eval_steps`` and at the end; checkpoints; the export. What is
trained (the objective: DPO's pairs, or another method's rows) is the only part that
differs between stages; the loop names none of it.

Loss scaling: a step's loss is the sum of per-unit losses (a preference objective's
pairs) over every micro-batch and rank of the step, divided by the step's unit count,
which every rank knows from the plan. DeepSpeed divides each micro-batch loss by the
accumulation steps and averages gradients over ranks; each micro-batch loss is
multiplied by ``world * accum`` to undo it.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.core import placement
from pipeline.core.config import PipelineConfig, TrainingSettings, config_from_dict
from pipeline.core.devices import peak_tflops, require_gpu
from pipeline.core.flops import ModelShape, dense_shape, mfu, row_work, train_flops
from pipeline.training.offload import offload_activations
from pipeline.core.packing import MicroBatch, eval_plan
from pipeline.core.rows import RowReader, split_files
from pipeline.core.storage import Loc, scratch_root

from .checkpoints import discard_checkpoint, save_checkpoint
from .engine import build_engine, init_distributed, rank_device
from .export import export_model
from .forward import row_loss
from .metrics import MetricsLog, MetricSums
from .objective import Objective
from .plan import planned_steps, steps_per_epoch, total_steps
from .resume import resume


WORKERS_FILE = "workers.json"  # where the ranks ran, per attempt (record_workers)
PHASES_FILE = "_PHASES.json"  # when the attempt that finished ended its start-up and its work (rank 0's clock)


@dataclass
class WorkerSpec:
    """What the driver hands every rank (pickled to its Ray actor)."""

    # repr=False: these hold the unredacted config, URIs and the forwarded tracker
    # credentials, which a repr would put in a log line or an error message.
    cfg_dict: dict = field(repr=False)  # the run's config as a dict, local paths made absolute (``config.for_workers``)
    objective: Objective = field(repr=False)  # what is trained
    rows_dir: str = field(repr=False)  # the rows to train on: scored, or tokenized for a reference-free loss
    out_dir: str = field(repr=False)  # the stage's output in the run directory (a local path or a URI)
    info: dict = field(repr=False)  # fingerprints and config, written next to the exported model
    on_ray: bool = False  # its ranks are Ray actors (cluster.rank_group); else one rank in this process
    env: dict = field(default_factory=dict, repr=False)  # the driver's tracker settings (``tracking.forwarded_env``)
    stage: str = "train"  # the stage that trains: its name prefixes the progress lines and the tracker run
    train_cfg: TrainingSettings | None = field(default=None, repr=False)  # its settings; None: the config's train group


@dataclass
class RankContext:
    """What one rank knows about the run; built once by ``setup``, read by the loop's helpers."""

    cfg: PipelineConfig
    train_cfg: TrainingSettings  # the training settings (optimizer, schedule, steps, checkpoints)
    objective: Objective
    rank: int
    world: int
    device: torch.device
    train_rows: RowReader
    eval_rows: RowReader
    units_per_row: np.ndarray  # the objective's normalising count of each train row
    steps_per_epoch: int
    total_steps: int
    out: Loc  # the stage's output in the run directory (a local path or a URI)
    out_dir: Path  # where this rank writes: ``out`` itself, or local scratch uploaded to it
    stage: str = "train"
    shape: ModelShape | None = None  # the policy's, once the engine is built: a row's FLOPs for mfu
    peak_tflops: float | None = None  # one device's peak (device.peak_tflops, or known): None, no mfu

    @property
    def staged(self) -> bool:
        return self.out.remote

    def row_flops(self, row: dict) -> int:
        """A train step's model FLOPs on ``row`` (forward and backward; LoRA's frozen base
        gets its input's gradient only); 0 where not counted (no shape: a MoE model, or a
        context not built by ``train_worker``)."""
        if self.shape is None:
            return 0
        return train_flops(self.shape, row_work(row["seq_lens"], row["prompt_lens"]), self.train_cfg.peft is not None)


def setup(spec: WorkerSpec) -> RankContext:
    cfg = config_from_dict(spec.cfg_dict, handed_on=True)
    for key, value in spec.env.items():  # a rank on another node lacks the driver's environment
        os.environ.setdefault(key, value)
    train_cfg = spec.train_cfg or cfg.train
    require_gpu(train_cfg.use_gpu, f"{spec.stage}.use_gpu")
    use_cuda = train_cfg.use_gpu
    rank, world = init_distributed("nccl" if use_cuda else "gloo")
    device = rank_device(use_cuda)
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, int(train_cfg.cpus_per_worker)))
    torch.manual_seed(train_cfg.seed)
    train_rows = RowReader(split_files(spec.rows_dir, "train"), spec.objective.columns)
    per_epoch = steps_per_epoch(train_rows.num_rows, world, train_cfg.gradient_accumulation_steps)
    steps = total_steps(train_rows.num_rows, world, train_cfg.gradient_accumulation_steps, train_cfg.max_steps,
                        train_cfg.num_train_epochs)
    out = Loc(spec.out_dir)
    return RankContext(cfg, train_cfg, spec.objective, rank, world, device, train_rows,
                       RowReader(split_files(spec.rows_dir, "eval"), spec.objective.columns),
                       spec.objective.units_per_row(train_rows), per_epoch, steps, out,
                       out.local or scratch_dir(train_cfg, out, rank), spec.stage)


def scratch_dir(train_cfg: TrainingSettings, out: Loc, rank: int) -> Path:
    """A rank's local working directory for a URI run directory."""
    path = scratch_root(train_cfg.local_dir, out) / f"rank-{rank}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def train_step(engine, ctx: RankContext, step: int, step_plan: list[list[MicroBatch]]) -> dict:
    """One optimizer step: this rank's micro-batches, each scaled so the step's gradient is
    that of sum(per-unit loss) / (units in the step over all ranks)."""
    step_units = sum(ctx.units_per_row[mb.row] * mb.weight for rank_plan in step_plan for mb in rank_plan)
    scale = ctx.world * ctx.train_cfg.gradient_accumulation_steps / step_units
    lr = engine.get_lr()[0]
    sums, t0 = MetricSums(ctx.objective.unit, ctx.objective.metric_names, ctx.device), time.time()
    for mb in step_plan[ctx.rank]:
        row = ctx.train_rows[mb.row]
        with offload_activations(ctx.train_cfg.activation_offloading):
            out = row_loss(engine, row)  # engine(row): the objective's pass (forward.py)
        loss = out.loss_sum * (mb.weight * scale)
        if out.aux_loss is not None:  # a mean over micro-batches once DeepSpeed divides
            loss = loss + mb.weight * out.aux_loss
        engine.backward(loss)
        engine.step()
        sums.add(out, mb.weight, ctx.row_flops(row))
    metrics = sums.reduce()
    seconds = max(time.time() - t0, 1e-9)
    metrics.update(step=step, epoch=step / ctx.steps_per_epoch, learning_rate=lr,
                   grad_norm=float(engine.get_global_grad_norm() or 0.0), tokens_per_second=metrics["tokens"] / seconds)
    flops = metrics.pop("flops", 0)  # every rank's rows: the step's FLOPs over its seconds on world devices
    if ctx.peak_tflops and ctx.shape is not None:  # a known peak and a dense model
        metrics["mfu"] = mfu(flops, seconds, ctx.world, ctx.peak_tflops)
    return metrics


def evaluate(engine, ctx: RankContext, step: int) -> dict:
    sums = MetricSums(ctx.objective.unit, ctx.objective.metric_names, ctx.device)
    engine.eval()
    with torch.no_grad():
        for mb in eval_plan(ctx.eval_rows.num_rows, ctx.world)[ctx.rank]:
            sums.add(row_loss(engine, ctx.eval_rows[mb.row]), mb.weight)
    engine.train()
    return {"step": step, **sums.reduce("eval_")}


def log_eval(engine, ctx: RankContext, log: MetricsLog, step: int) -> None:
    """Without an eval split (data.eval_fraction: 0) there is nothing to log: no eval loss
    of 0 for the report to draw."""
    if ctx.eval_rows.num_rows:
        log.write(evaluate(engine, ctx, step))


def write_pid(ctx: RankContext) -> None:
    """Each rank's pid, so operators (and the tests) can find and kill a worker."""
    (ctx.out_dir / "workers").mkdir(exist_ok=True)
    (ctx.out_dir / "workers" / f"rank-{ctx.rank}.pid").write_text(str(os.getpid()))


def record_workers(ctx: RankContext, started: float) -> None:
    """Every rank's node id, hostname, pid and start time, gathered on rank 0 and appended
    to ``workers.json`` (one entry per attempt: a restarted run shows where each ran)."""
    import torch.distributed as dist

    where = dict(placement.here(), rank=ctx.rank, started_at=started)
    everyone = [None] * ctx.world
    dist.all_gather_object(everyone, where)
    if ctx.rank == 0:
        path = ctx.out / WORKERS_FILE
        attempts = json.loads(path.read_text())["attempts"] if path.is_file() else []
        path.write_text(json.dumps({"attempts": attempts + [everyone]}, indent=1))


def measure_model(ctx: RankContext, engine) -> None:
    """The policy's shape and the device's peak, for mfu (none for a MoE model or an unknown device)."""
    ctx.shape = dense_shape(engine.module.config, sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()))
    ctx.peak_tflops = peak_tflops(ctx.cfg.device.peak_tflops, ctx.device, ctx.cfg.model.dtype)


def record_phases(ctx: RankContext, phase: str) -> None:
    """The moment an attempt's ``phase`` ended, on rank 0's clock (``launch.mark_phases``):
    each attempt's start-up (engine built, checkpoint resumed), and the work of the one
    that finished (through the export)."""
    if ctx.rank == 0:
        path = ctx.out / PHASES_FILE
        times = json.loads(path.read_text()) if path.is_file() else {}
        times = {k: v if isinstance(v, list) else [v] for k, v in times.items()}  # one time a phase (the first format)
        times[phase] = times.get(phase, []) + [time.time()]
        path.write_text(json.dumps(times))


def started_up(ctx: RankContext) -> None:
    """The rank's start-up is over (engine built, checkpoint resumed): recorded, and what it
    allocated set aside from the garbage collector (``placement.settle``)."""
    record_phases(ctx, "startup")
    placement.settle()


def train_worker(config: dict) -> None:
    """One rank of training. ``config``: {"spec": WorkerSpec}."""
    # DeepSpeed 0.19 calls torch.distributed collectives that torch 2.13 marks deprecated.
    warnings.filterwarnings("ignore", message=".*torch.distributed.*deprecated", category=FutureWarning)
    started = time.time()
    spec: WorkerSpec = config["spec"]
    with placement.starting():  # no automatic collection until started up (it settles once)
        ctx = setup(spec)
        write_pid(ctx)
        record_workers(ctx, started)
        engine = build_engine(ctx.train_cfg, ctx.cfg.model, ctx.world, ctx.total_steps, ctx.objective, ctx.device)
        measure_model(ctx, engine)
        log = MetricsLog(ctx)
        done = resume(engine, ctx, log)
        for hook in ctx.objective.hooks:  # the objective's state between steps, resumed at this step
            hook.start(engine, ctx, done)
        started_up(ctx)
    train_cfg = ctx.train_cfg
    if done == 0 and train_cfg.eval_on_start:
        log_eval(engine, ctx, log, 0)
    for step, step_plan in planned_steps(ctx.train_rows.num_rows, ctx.world, train_cfg.gradient_accumulation_steps,
                                         train_cfg.seed, ctx.total_steps, done):
        log.step(train_step(engine, ctx, step, step_plan))
        for hook in ctx.objective.hooks:  # before the step's eval and checkpoint, which see what it did
            if (record := hook.after_step(engine, ctx, step)) is not None:
                log.write(record)
        if step % train_cfg.eval_steps == 0 and step < ctx.total_steps:
            log_eval(engine, ctx, log, step)
        if train_cfg.save_steps and step % train_cfg.save_steps == 0 and step < ctx.total_steps:
            save_checkpoint(engine, ctx, step, log)
    if done < ctx.total_steps:  # a rerun after a failed export resumes here, with nothing left to do
        log_eval(engine, ctx, log, ctx.total_steps)
        # the trained weights are kept before the export, which can still fail (disk, tokenizer)
        save_checkpoint(engine, ctx, ctx.total_steps, log)
    export_model(engine, ctx, spec.info)
    record_phases(ctx, "work")
    if not train_cfg.save_steps:  # no checkpoints asked for: the final one only guarded the export
        discard_checkpoint(ctx, ctx.total_steps)
    log.close()
    log.sync()
