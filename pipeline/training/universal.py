"""Resuming on another number of workers: a checkpoint converted once into DeepSpeed's
universal checkpoint (every parameter and its Adam moments whole, in fp32), from which
each rank of any worker count loads its own partition. Kept apart from ``checkpoints.py``
(the same-layout save and load): ``resume.py`` hands a checkpoint here when its worker
count differs and the global batch is kept (``checkpoints.layout_mismatch``).

The driver converted it before the ranks started (``universal_convert.prepare_resume``);
a rank loads it and never converts. With a bucket run directory one process per node
downloads it into a folder the node's ranks share, under a file lock, and it is removed
once every rank has loaded it.

Disk and time at scale: docs/reliability.md, "Resuming on another worker count at scale"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.core.storage import Loc, scratch_root

from .checkpoints import CHECKPOINT_DIR, COMPLETE, UNIVERSAL, resumed


def conversion(path: Loc) -> dict | None:
    """The marker of ``path``'s finished universal conversion, or None."""
    marker = path / UNIVERSAL / COMPLETE
    return json.loads(marker.read_text()) if marker.is_file() else None


def fetch_node_copy(path: Loc, node_dir: Path) -> bool:
    """The universal checkpoint of ``path`` (in a bucket) in ``node_dir/universal``, one
    copy a node: the first rank there downloads it under a file lock, the others wait on
    the lock (not in a collective) and find it. A copy of another conversion is replaced.
    Returns whether this process downloaded it."""
    from filelock import FileLock

    want = conversion(path)
    node_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(node_dir) + ".lock"):
        have = node_dir / UNIVERSAL / COMPLETE
        if have.is_file() and json.loads(have.read_text()) == want:
            return False
        shutil.rmtree(node_dir, ignore_errors=True)
        tmp = node_dir.with_name(f"{node_dir.name}.tmp")  # under the lock: one writer
        shutil.rmtree(tmp, ignore_errors=True)
        (path / UNIVERSAL).download(tmp / UNIVERSAL)
        tmp.rename(node_dir)
        return True


def drop_node_copy(node_dir: Path) -> None:
    """Remove this node's copy (about 12 bytes a parameter) once every rank has loaded it."""
    from filelock import FileLock

    with FileLock(str(node_dir) + ".lock"):
        (node_dir / UNIVERSAL / COMPLETE).unlink(missing_ok=True)  # first: a removal cut short is no copy
        shutil.rmtree(node_dir, ignore_errors=True)


def repair_universal_load(engine, universal: str) -> None:
    """Two things DeepSpeed 0.19's ZeRO-3 universal load gets wrong, put right:

    * it copies param group 0's settings onto every group, so the no-decay group (biases,
      norms) would get weight decay: each group gets its own back, from the checkpoint's
      optimizer state;
    * it gives every sub-group of the optimizer state the same ``step`` tensor, which torch's
      Adam increments in place once per sub-group: the step count would run ahead, and the
      bias correction with it, after the first step. Each sub-group gets its own copy."""
    import torch
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    from .safe_load import safe_load

    saved = safe_load(f"{universal}/{UNIVERSAL}/zero/optimizer_state.pt")[OPTIMIZER_STATE_DICT]["param_groups"]
    groups = engine.optimizer.optimizer.param_groups
    if len(saved) != len(groups):
        raise RuntimeError(f"universal checkpoint {universal}: {len(saved)} optimizer param groups, this run has "
                           f"{len(groups)}")
    for group, own in zip(groups, saved):
        for key, value in own.items():
            if key != "params":
                group[key] = value
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        state = engine.optimizer.optimizer.state[flat]
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def resume_universal(engine, ctx, log, path: Loc, info: dict) -> int:
    """Resume on another worker count that keeps the global batch: the step plans then
    give every step the same rows (``pipeline.core.packing.epoch_plan`` cuts one seeded order
    into steps of workers x accumulation rows), so no pair trains twice or not at all.
    The driver converted the checkpoint before the ranks started (``prepare_resume``)."""
    import torch.distributed as dist

    from .safe_load import weights_only_loads

    if conversion(path) is None:
        raise RuntimeError(f"checkpoint {path}: written by {info['world_size']} workers, and its universal checkpoint "
                           f"is missing; the driver converts it before the ranks start (prepare_resume in "
                           f"pipeline/training/universal_convert.py): rerun the stage")
    node_dir = scratch_root(ctx.train_cfg.local_dir, ctx.out) / CHECKPOINT_DIR / path.name
    if path.remote:
        fetch_node_copy(path, node_dir)
    load_root = str(node_dir if path.remote else path.local)
    engine._config.load_universal_checkpoint = True  # read by load_checkpoint; no other use
    try:
        with weights_only_loads():
            load_path, client = engine.load_checkpoint(load_root, tag=UNIVERSAL, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint of {path}")
    repair_universal_load(engine, load_root)
    if path.remote:
        if dist.is_initialized():
            dist.barrier()  # every rank has loaded: the node's copy can go (each rank tries; the first removes it)
        drop_node_copy(node_dir)
    return resumed(ctx, log, path, client, f" (written by {info['world_size']} workers, resumed on {ctx.world} "
                                            f"through its universal checkpoint)")
