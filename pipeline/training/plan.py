"""The seeded step plan that tells each rank which rows each step uses."""

from __future__ import annotations

import math

from pipeline.core.packing import epoch_plan


def steps_per_epoch(num_rows: int, world: int, grad_accum: int) -> int:
    return math.ceil(num_rows / (world * grad_accum))


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
