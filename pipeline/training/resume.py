"""Where a training stage's ranks start: a fresh start, the checkpoint to resume from loaded
as it was written (``checkpoints``), or, written by another worker count, through its
universal checkpoint (``universal``)."""

from __future__ import annotations

import json

from .checkpoints import COMPLETE, UNIVERSAL, checkpoint_to_resume, layout_mismatch, resume_same_layout, zero_sub_groups
from .universal import resume_universal


def resume(engine, ctx, log) -> int:
    """Load the checkpoint to resume from, if any; returns the steps already done."""
    path = checkpoint_to_resume(ctx.train_cfg, ctx.out, ctx.stage)
    if path is None:
        log.truncate_after(-1)  # a fresh start: nothing logged by an earlier attempt stays
        return 0
    info = json.loads((path / COMPLETE).read_text())
    why = layout_mismatch(info, ctx.world, zero_sub_groups(engine), ctx.train_cfg)
    if why == UNIVERSAL:
        return resume_universal(engine, ctx, log, path, info)
    if why:
        raise RuntimeError(f"checkpoint {path}: {why}")
    return resume_same_layout(engine, ctx, log, path)
