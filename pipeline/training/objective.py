"""What a training stage trains: the interface between the shared loop and a method.

The loop (``loop.py``) knows rows, micro-batches, DeepSpeed and metrics; everything
specific to a training method lives in an objective: the row columns it reads, the
count a step's loss is normalised by, the metric names it reports, and the forward pass
plus loss of one packed row, returned as a ``RowLoss``. ``stages/train/preference.py``
holds DPO and its relatives, ``stages/sft/objective.py`` SFT; another method is another
module that implements ``Objective``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pipeline.core.rows import RowReader


@dataclass
class RowLoss:
    """One packed row through an objective."""

    loss_sum: torch.Tensor  # scalar: the sum of the row's per-unit losses (with its graph)
    aux_loss: torch.Tensor | None  # MoE router load balancing, already weighted; once per micro-batch
    metric_sums: dict[str, torch.Tensor]  # detached scalar sums over the row's units, by metric name
    units: int  # what the loss is normalised by, in this row (pairs, tokens ...)
    tokens: int  # tokens the row stores

    def outputs(self) -> dict:
        """As a module's forward returns it to DeepSpeed: a dict, whose tensors get the
        engine's backward hooks (a dataclass's would not: ``forward.py``)."""
        out = {"loss_sum": self.loss_sum, "metric_sums": self.metric_sums, "units": self.units, "tokens": self.tokens}
        if self.aux_loss is not None:
            out["aux_loss"] = self.aux_loss
        return out

    @classmethod
    def from_outputs(cls, out: dict) -> RowLoss:
        return cls(out["loss_sum"], out.get("aux_loss"), out["metric_sums"], out["units"], out["tokens"])


class StepHook(Protocol):
    """What an objective does between steps, on every rank in step with the others (TRL's
    ``TrainerCallback``, at the three moments the loop has): the preference objective's
    TR-DPO reference refresh (``refresh.py``)."""

    def start(self, engine, ctx, done: int) -> None:
        """Once the engine is built and resumed (``done`` steps), before the first step."""

    def after_step(self, engine, ctx, step: int) -> dict | None:
        """After a step's optimizer step, before its eval and checkpoint; a record to log, or None."""

    def save(self, ctx, folder: Path, step: int) -> None:
        """Write this rank's state into a checkpoint's folder (``start`` reads it back on resume)."""


class Objective(Protocol):
    unit: str  # the name of the normalising count, logged as a metric ("pairs")
    metric_names: tuple[str, ...]  # logged as means per unit, in this order
    accuracy: str  # the metric the progress line shows as "acc"
    columns: list[str]  # row columns read
    hooks: tuple[StepHook, ...]  # what it does between steps (most objectives: nothing)

    def units_per_row(self, rows: RowReader) -> np.ndarray: ...

    def __call__(self, model: torch.nn.Module, row: dict, device: torch.device) -> RowLoss: ...
