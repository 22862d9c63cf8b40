"""Resuming on another number of workers: a checkpoint converted once into DeepSpeed's
universal checkpoint (every parameter and its Adam moments whole, in fp32), from which
each rank of any worker count loads its own partition. Kept apart from ``checkpoints.py``
(the same-layout save and resume), which hands a checkpoint here when its worker count
differs and the global batch is kept (``checkpoints.layout_mismatch``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.storage import Loc

from .checkpoints import CHECKPOINT_DIR, COMPLETE, UNIVERSAL, resumed
from .safe_load import safe_load, weights_only_loads


def convert_to_universal(ctx, path: Loc) -> str:
    """``<tag>/universal``, DeepSpeed's universal checkpoint of ``path`` (every parameter and
    its Adam moments whole, in fp32), made once by rank 0 (``ds_to_universal``) and loaded
    by each rank, whatever their number. Its ``COMPLETE.json`` is written last. Returns the
    local folder that holds ``universal``; on a URI run directory that is each rank's
    scratch copy, which ``drop_scratch`` removes after the load."""
    import argparse

    import torch.distributed as dist

    from deepspeed.checkpoint import ds_to_universal

    local = path.local if not path.remote else ctx.out_dir / CHECKPOINT_DIR / path.name
    done = path / UNIVERSAL / COMPLETE
    if ctx.rank == 0 and not done.is_file():
        parts = [f.relative_to(path) for f in path.files() if not f.relative_to(path).startswith(UNIVERSAL + "/")]
        world = json.loads((path / COMPLETE).read_text())["world_size"]
        ranks = {p.split("zero_pp_rank_")[1].split("_")[0] for p in parts if "zero_pp_rank_" in p}
        if ranks != {str(r) for r in range(world)}:
            raise RuntimeError(f"checkpoint {path}: written by {world} workers, but it holds the parts of ranks "
                               f"{sorted(ranks, key=int)}: it cannot be converted")
        if path.remote:  # every rank's part is needed to rebuild whole parameters
            for rel in parts:
                (path / rel).download(local / rel)
        shutil.rmtree(local / UNIVERSAL, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(local), output_folder=str(local / UNIVERSAL),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=False)
        with weights_only_loads():
            ds_to_universal.main(args)  # one process: no pool forked inside a Ray worker
        marker = json.dumps({"from_world_size": world})
        if path.remote:  # the marker goes up last: an upload cut short is not taken for a copy
            (path / UNIVERSAL).upload(local / UNIVERSAL)
            for rel in parts:
                (local / rel).unlink()
            (local / UNIVERSAL / COMPLETE).write_text(marker)
        (path / UNIVERSAL / COMPLETE).write_text(marker)
    if dist.is_initialized():
        dist.barrier()
    if path.remote and not (Path(local) / UNIVERSAL / COMPLETE).is_file():
        (path / UNIVERSAL).download(local / UNIVERSAL)
    return str(local)


def drop_scratch(ctx, path: Loc, local: str) -> None:
    """A URI run directory's universal copy in this rank's scratch: loaded, so removed
    (about 12 bytes a parameter)."""
    if path.remote:
        shutil.rmtree(Path(local) / UNIVERSAL, ignore_errors=True)


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
    give every step the same rows (``pipeline.packing.epoch_plan`` cuts one seeded order
    into steps of workers x accumulation rows), so no pair trains twice or not at all."""
    load_root = convert_to_universal(ctx, path)
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
    drop_scratch(ctx, path, load_root)
    return resumed(ctx, log, path, client, f" (written by {info['world_size']} workers, resumed on {ctx.world} "
                                            f"through its universal checkpoint)")
