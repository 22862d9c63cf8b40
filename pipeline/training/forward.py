"""The engine's forward: one packed row through the objective, called as ``engine(row)``.

DeepSpeed keeps its bookkeeping in ``engine.forward``, around its module's forward: it
counts the micro-step (at micro-step 0 a ZeRO backward replaces the gradient instead of
adding to it), starts ZeRO-3's parameter trace in a pre-forward hook of the top-level
module (prefetch), marks the forward for ZeRO-3's discovery of parameters used outside
their module, and attaches its backward prologue to the forward's outputs (the
accumulation boundary that ZeRO-2/3 read while they reduce buckets during the backward:
offload copies a bucket's gradient into its host buffer only on the boundary; entering
the backward; the post-backward callbacks; NVMe swaps). Code that calls the model's
pieces itself skips all of it, and each skipped piece was a wrong result at scale.

So the policy's own ``forward`` is replaced, on the model instance, by the objective's
pass (``install``): ``engine(row)`` runs ``objective(model, row, device)`` inside
everything DeepSpeed wraps a forward in. Nothing is wrapped around the model, so its
parameter names, ``state_dict``, checkpoints and ``save_pretrained`` are the HF (or
PEFT) model's, as before. The pass returns ``RowLoss.outputs()``, a dict of tensors:
DeepSpeed attaches its backward prologue to tensors found in a tensor, tuple, list or
dict, never in a dataclass.
"""

from __future__ import annotations

import torch

from .objective import Objective, RowLoss


class RowForward:
    """The policy's forward while it trains: one packed row (a dict of lists) through the
    objective, as ``RowLoss.outputs()``."""

    def __init__(self, model: torch.nn.Module, objective: Objective, device: torch.device):
        self.model, self.objective, self.device = model, objective, device

    def __call__(self, row: dict) -> dict:
        return self.objective(self.model, row, self.device).outputs()


def install(model: torch.nn.Module, objective: Objective, device: torch.device) -> None:
    """``model(row)`` (and so ``engine(row)``) runs the objective's pass from now on.
    Installed after the load-time probe, which runs the model's own forward."""
    model.forward = RowForward(model, objective, device)


def row_loss(engine, row: dict) -> RowLoss:
    """One packed row through the engine's front door. The row goes by keyword: ZeRO-3's
    pre-forward hook walks the positional inputs element by element for tensors (every id
    and reference log-prob of the row's lists: 31 ms a 32k-token row here), and the keyword
    arguments not at all."""
    return RowLoss.from_outputs(engine(row=row))
