"""Checkpoints: save every ``save_steps`` (each rank its own ZeRO partition), keep the last
``save_total_limit`` complete ones, find the one to resume from, and load one written by
this run's worker count. One written by another worker count that keeps the global batch
(workers x gradient_accumulation_steps) is ``universal.py``'s; ``resume.py`` chooses."""

from __future__ import annotations

import json
import shutil

import torch

from pipeline.core.storage import Loc

from .metrics import say

CHECKPOINT_DIR = "checkpoints"
COMPLETE = "COMPLETE.json"  # written in a checkpoint's folder once every rank's part is on disk
UNIVERSAL = "universal"  # a checkpoint converted for another worker count: <tag>/universal/


def complete_checkpoints(out: Loc) -> list[Loc]:
    """Checkpoint folders whose every rank finished writing, oldest first."""
    found = [p for p in (Loc(out) / CHECKPOINT_DIR).glob("step-*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: json.loads((p / COMPLETE).read_text())["step"])


def rank_files(files: list[str], rank: int) -> list[str]:
    """The files of a ZeRO checkpoint one rank loads: its own partition
    (``*zero_pp_rank_<rank>_*``) and the unpartitioned ones (not a universal copy)."""
    return [f for f in files if not f.startswith(UNIVERSAL + "/")
            and ("zero_pp_rank_" not in f or f"zero_pp_rank_{rank}_" in f)]


def save_checkpoint(engine, ctx, step: int, log) -> None:
    """Model, optimizer and LR-scheduler state (DeepSpeed, each rank its own part), the
    step (the data position: plans are deterministic) and the RNG state.

    With a URI run directory each rank writes to its scratch directory and uploads only
    its own files. DeepSpeed's own ``latest`` is written by rank 0 before the other ranks
    finish; ours (``COMPLETE.json``, ``latest_complete``) is written only after the barrier
    that follows every rank's part, so it never names a partial checkpoint."""
    import torch.distributed as dist

    root = ctx.out_dir / CHECKPOINT_DIR
    tag = f"step-{step:08d}"
    final = ctx.out / CHECKPOINT_DIR / tag
    if ctx.rank == 0:  # a folder left by an attempt on another worker count: none of its files stay
        final.rmtree()
    if dist.is_initialized():
        dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False,
                           client_state={"step": step, "world_size": ctx.world, **rng_state()})
    for hook in ctx.objective.hooks:  # the objective's own state (TR-DPO's reference), beside the engine's
        hook.save(ctx, root / tag, step)
    if ctx.staged:
        final.upload(root / tag)
        shutil.rmtree(root / tag)
    if dist.is_initialized():
        dist.barrier()
    if ctx.rank == 0:
        # The metrics up to this step are uploaded before the checkpoint is marked complete:
        # a resume from it finds every step it does not replay already logged.
        log.sync()
        info = {"step": step, "world_size": ctx.world, "zero_stage": ctx.train_cfg.zero_stage,
                "zero_sub_groups": zero_sub_groups(engine),
                "gradient_accumulation_steps": ctx.train_cfg.gradient_accumulation_steps,
                "optimizer": ctx.train_cfg.optimizer}
        (final / COMPLETE).write_text(json.dumps(info))
        (ctx.out / CHECKPOINT_DIR / "latest_complete").write_text(tag)
        limit = ctx.train_cfg.save_total_limit
        for old in complete_checkpoints(ctx.out)[:-limit] if limit else []:
            old.rmtree()
    if dist.is_initialized():
        dist.barrier()


def discard_checkpoint(ctx, step: int) -> None:
    """Remove the checkpoint of ``step`` (every rank has finished with it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    if ctx.rank == 0:
        (ctx.out / CHECKPOINT_DIR / f"step-{step:08d}").rmtree()
        latest = ctx.out / CHECKPOINT_DIR / "latest_complete"
        if latest.is_file() and latest.read_text() == f"step-{step:08d}":
            latest.unlink()
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    """The host RNG and, on a GPU, this rank's device's (LoRA dropout draws from it). Only
    the current device: a resume may see another number of devices per node."""
    return {"rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(client: dict) -> None:
    torch.set_rng_state(client["rng"])
    if client.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(client["cuda_rng"])  # the current device: torch.cuda.set_device(rank's)


def checkpoint_to_resume(train_cfg, out: Loc, stage: str) -> Loc | None:
    """The checkpoint a training stage's ranks resume from: ``resume_from_checkpoint``, or
    the newest complete one of ``out``; None for a fresh start. Asked by the driver (before
    the ranks start, ``universal_convert.prepare_resume``) and by every rank, the same answer."""
    spec = train_cfg.resume_from_checkpoint
    complete = complete_checkpoints(out)
    if spec is None:
        return complete[-1] if complete else None
    path = Loc(spec) if ("://" in spec or "/" in spec) else Loc(out) / CHECKPOINT_DIR / spec
    if not path.is_dir():
        raise FileNotFoundError(f"{stage}.resume_from_checkpoint: {spec} does not exist")
    if not (path / COMPLETE).is_file():
        raise RuntimeError(f"{stage}.resume_from_checkpoint: {path} is incomplete (not every rank finished "
                           f"writing it); complete ones: {[p.name for p in complete]}")
    return path


def zero_sub_groups(engine) -> int | None:
    """How many sub-groups ZeRO-3's optimizer state is cut into on a rank (its layout in a
    checkpoint: ``cluster/deepspeed_config.py`` SUB_GROUP_SIZE); None below stage 3."""
    groups = getattr(engine.optimizer, "fp16_partitioned_groups_flat", None)
    return None if groups is None else len(groups)


def layout_mismatch(info: dict, world: int, sub_groups: int | None, train_cfg) -> str | None:
    """Why a checkpoint (its ``COMPLETE.json``) cannot be loaded by this run as it is, or
    None. ``UNIVERSAL``: it can, converted to a universal checkpoint (another worker count)."""
    if info["world_size"] != world:
        return elastic_mismatch(info, world, train_cfg) or UNIVERSAL
    saved = info.get("zero_sub_groups", sub_groups)  # not recorded before: DeepSpeed's own check decides
    if saved != sub_groups:
        return (f"its ZeRO-3 optimizer state is cut into {saved} sub-groups a rank and this run's into "
                f"{sub_groups} (DeepSpeed's sub_group_size changed with the pipeline version): the state "
                "cannot be mapped. Resume with the version that wrote it, or start a new run (--force)")
    return None


def elastic_mismatch(info: dict, world: int, train_cfg) -> str | None:
    """Why a checkpoint written by ``info["world_size"]`` workers cannot resume on ``world``."""
    accum = info.get("gradient_accumulation_steps")
    if accum is None:
        return (f"it was written by {info['world_size']} workers and this run has {world}, and it does not record "
                f"its gradient accumulation (an older version wrote it). Resume with "
                f"train.num_workers={info['world_size']}, or start a new run (--force)")
    saved, now = info["world_size"] * accum, world * train_cfg.gradient_accumulation_steps
    if saved != now:
        fits = [f"{w} workers x {saved // w}" for w in range(1, saved + 1) if saved % w == 0]
        return (f"its global batch is {saved} rows a step ({info['world_size']} workers x {accum} accumulation "
                f"steps) and this run's {now} ({world} x {train_cfg.gradient_accumulation_steps}): the steps "
                f"would train other rows. Keep the global batch ({', '.join(fits)}), or start a new run (--force)")
    if info.get("zero_stage") != 3:
        return (f"it was written by {info['world_size']} workers and this run has {world}: another worker count "
                f"is resumed through DeepSpeed's universal checkpoint, which the pipeline uses for ZeRO-3 only "
                f"(this checkpoint is ZeRO-{info.get('zero_stage')})")
    if info.get("optimizer", train_cfg.optimizer) != "adamw" or train_cfg.optimizer != "adamw":
        return (f"it was written by {info['world_size']} workers and this run has {world}: DeepSpeed's universal "
                f"checkpoint restores Adam's moments only, so an RMSprop run can only resume on "
                f"{info['world_size']} workers")
    return None


def resume_same_layout(engine, ctx, log, path: Loc) -> int:
    """Load a checkpoint written by this run's worker count and layout; with a URI run
    directory each rank fetches only its own part."""
    if path.remote:
        local = ctx.out_dir / CHECKPOINT_DIR / path.name
        for name in rank_files([f.relative_to(path) for f in path.files()], ctx.rank):
            (path / name).download(local / name)
        load_root = local.parent
    else:
        load_root = path.local.parent
    try:
        load_path, client = engine.load_checkpoint(str(load_root), tag=path.name, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
    except ValueError as e:  # torch's "parameter group that doesn't match": a layout from another version
        raise RuntimeError(f"checkpoint {path}: its optimizer state does not fit this run's ({e}); it was "
                           "probably written by another pipeline version. Start a new run (--force)") from e
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    return resumed(ctx, log, path, client)


def resumed(ctx, log, path: Loc, client: dict, how: str = "") -> int:
    set_rng_state(client)
    log.fetch()
    log.truncate_after(client["step"])
    if ctx.rank == 0:
        say(f"[{ctx.stage}] resumed from {path} at step {client['step']}{how}")
    return int(client["step"])
