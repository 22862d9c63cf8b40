"""Preference losses: pure functions of per-pair sequence log-probs, looked up by name.

Every loss takes per-pair tensors of shape (B,) and returns ``LossOutput`` with per-pair
``losses`` and detached ``chosen_rewards`` / ``rejected_rewards`` (each (B,)). Reductions
(sum over the pairs of a step, divided by the step's pair count) belong to the trainer.

Imports torch only (DESIGN: math modules never import Ray, DeepSpeed or transformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached


LossFn = Callable[..., LossOutput]
LOSSES: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return wrap


def _rewards(beta: float, logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    return (beta * (logps - ref_logps)).detach()


@register("sigmoid")
def sigmoid_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    r"""DPO (Rafailov et al. 2023, arXiv:2305.18290); cDPO with label smoothing
    (Mitchell 2023, "A note on DPO with noisy preferences").

    .. math::
        h = (\log\pi(y_w) - \log\pi_{ref}(y_w)) - (\log\pi(y_l) - \log\pi_{ref}(y_l))

        \mathcal{L} = -(1-\epsilon)\log\sigma(\beta h) - \epsilon \log\sigma(-\beta h)

    Shapes: all inputs (B,) summed completion log-probs; outputs (B,).
    At policy == reference, h = 0 and the loss is ln 2 for every epsilon.

    With epsilon = 0 this is TRL 1.16's ``sigmoid``. TRL 1.16 ignores ``label_smoothing``
    for ``sigmoid`` (it only feeds robust / EXO / AOT); here epsilon > 0 gives cDPO, the
    conservative DPO of TRL before 1.0.
    """
    logits = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(
        -beta * logits
    ) * label_smoothing
    return LossOutput(
        losses=losses,
        chosen_rewards=_rewards(beta, chosen_logps, ref_chosen_logps),
        rejected_rewards=_rewards(beta, rejected_logps, ref_rejected_logps),
    )


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    loss_type: str = "sigmoid",
    **options,
) -> LossOutput:
    """The single entry point: look the loss up by name and apply it."""
    try:
        fn = LOSSES[loss_type]
    except KeyError:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {sorted(LOSSES)}") from None
    return fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, **options)
