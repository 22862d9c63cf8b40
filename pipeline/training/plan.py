"""The seeded step plan that tells each rank which rows each step uses."""

from __future__ import annotations

import math

from pipeline.core.packing import epoch_plan

PLAN_VERSION = 1  # raised when a change of this module or of packing.epoch_plan changes which rows a step reads


def steps_per_epoch(num_rows: int, world: int, grad_accum: int) -> int:
    return math.ceil(num_rows / (world * grad_accum))


def total_steps(num_rows: int, world: int, grad_accum: int, max_steps: int, num_train_epochs: int) -> int:
    """The run's optimizer steps: ``max_steps`` when set, else the epochs'."""
    return max_steps if max_steps > 0 else num_train_epochs * steps_per_epoch(num_rows, world, grad_accum)


def planned_steps(num_rows: int, world: int, grad_accum: int, seed: int, total_steps: int, done: int = 0):
    """(step number from 1, the step's plan) for every step after ``done``, epoch after
    epoch. The plans are a function of (seed, epoch), so a resumed run replays none."""
    per_epoch = steps_per_epoch(num_rows, world, grad_accum)
    step = 0
    for epoch in range(math.ceil(total_steps / per_epoch)):
        if (epoch + 1) * per_epoch <= done:
            step += per_epoch
            continue
        for step_plan in epoch_plan(num_rows, world, grad_accum, seed, epoch):
            if step == total_steps:
                return
            step += 1
            if step > done:
                yield step, step_plan


def first_segment_rows(num_rows: int, train_cfg) -> list[int]:
    """TR-DPO: the train rows the steps before the first reference refresh use (steps 1 to
    τ, or every step when the run is shorter), sorted. Only these are read with the score
    stage's reference column; every later row is rescored in the ranks before its step
    (``refresh.py``). A function of the config and the row count alone, as the score
    stage's fingerprint needs: the plan's rows per step are ``num_workers`` x accumulation,
    which a resume on another worker count keeps."""
    world, accum = train_cfg.num_workers, train_cfg.gradient_accumulation_steps
    end = min(train_cfg.ref_model_sync_steps,
              total_steps(num_rows, world, accum, train_cfg.max_steps, train_cfg.num_train_epochs))
    return sorted({mb.row for _, plan in planned_steps(num_rows, world, accum, train_cfg.seed, end)
                   for rank_plan in plan for mb in rank_plan})


def first_segment_settings(train_cfg) -> dict:
    """What, with the tokenized rows, decides ``first_segment_rows``."""
    t = train_cfg
    return {"seed": t.seed, "rows_per_step": t.num_workers * t.gradient_accumulation_steps,
            "ref_model_sync_steps": t.ref_model_sync_steps, "max_steps": t.max_steps,
            "num_train_epochs": t.num_train_epochs, "plan_version": PLAN_VERSION}
