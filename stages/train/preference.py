"""DPO and its relatives as an objective of the shared loop: every ``pipeline.core.losses`` loss
type, on packed rows of preference pairs, against the stored reference columns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.config import TrainConfig
from pipeline.core.logps import packed_token_logps, sequence_logps, wpo_pair_weights
from pipeline.core.segments import segment_sums, segment_token_counts
from pipeline.core.losses import LossOutput, PreferenceLoss, router_load_balancing_loss
from pipeline.core.modeling import moe_router, row_inputs, to_device

from pipeline.training.objective import RowLoss
from pipeline.training.refresh import ReferenceRefresh
from pipeline.core.rows import ROW_COLUMNS, RowReader


@dataclass
class PairLosses:
    """A packed row's pairs through the preference objective, (B,) each: the per-pair
    losses and rewards, with the policy log-probs they came from."""

    loss: LossOutput  # per-pair losses and detached rewards
    chosen_logps: torch.Tensor  # the policy's, aggregated as the loss sees them
    rejected_logps: torch.Tensor
    aux_loss: torch.Tensor | None  # MoE router load balancing, already weighted


class PreferenceObjective:
    """Preference pairs against the stored reference columns: the policy's log-prob pass
    over a packed row, aggregated as the reference was (sum / mean / LD-DPO), then the
    run's ``PreferenceLoss``. A step's loss is the mean over the step's pairs."""

    unit = "pairs"
    metric_names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected")
    accuracy = "rewards/accuracies"

    def __init__(self, loss: PreferenceLoss, train_cfg: TrainConfig, logp_chunk_tokens: int):
        self.loss = loss
        self.needs_reference = loss.needs_reference
        self.aggregation, self.ld_alpha = train_cfg.aggregation, train_cfg.ld_alpha
        self.use_weighting = train_cfg.use_weighting
        self.router_aux_loss_coef = train_cfg.router_aux_loss_coef
        self.chunk = logp_chunk_tokens
        self.columns = ROW_COLUMNS + (["ref_logps"] if self.needs_reference else [])
        # TR-DPO: the ranks refresh the reference and rescore the rows they train on next
        self.hooks = ((ReferenceRefresh(train_cfg.mixup_alpha, train_cfg.ref_model_sync_steps),)
                      if train_cfg.sync_ref_model else ())

    def units_per_row(self, rows: RowReader) -> np.ndarray:
        return np.array([len(s) // 2 for s in rows.read_column("seq_lens")], dtype=np.int64)

    def pairs(self, model, row: dict, device) -> PairLosses:
        """The per-pair losses, rewards and log-probs of one packed row."""
        input_ids, position_ids, layout = row_inputs(row, device)
        router = moe_router(model, self.router_aux_loss_coef)
        tok = packed_token_logps(model, input_ids, position_ids, layout, self.chunk,
                                 log_sum_sq=self.use_weighting, router_logits=router is not None)
        seq = sequence_logps(tok.logps, layout, self.aggregation, self.ld_alpha)
        ref = None
        if self.needs_reference:
            if row["ref_logps"] is None:  # a TR-DPO row the score stage left to the refreshes
                raise RuntimeError("train: a packed row has no reference log-probs (the score stage leaves TR-DPO's "
                                   "rows after its first segment to the refreshes): rescore, --from score --force")
            ref_tok = to_device(torch.tensor(row["ref_logps"], dtype=torch.float32), device)
            ref = sequence_logps(ref_tok, layout, self.aggregation, self.ld_alpha)
        lengths = segment_token_counts(layout).float()
        weights = None
        if self.use_weighting:
            w = wpo_pair_weights(segment_sums(tok.logps - tok.log_sum_sq, layout), lengths)
            weights = w[0::2] * w[1::2]
        out = self.loss(seq[0::2], seq[1::2], None if ref is None else ref[0::2], None if ref is None else ref[1::2],
                        chosen_lengths=lengths[0::2], rejected_lengths=lengths[1::2], pair_weights=weights,
                        chosen_nll_sum=segment_sums(tok.logps, layout)[0::2])
        aux = None
        if router is not None:
            coef, experts, top_k = router
            aux = coef * router_load_balancing_loss(tok.router_logits, experts, top_k)
        return PairLosses(out, seq[0::2], seq[1::2], aux)

    def __call__(self, model, row: dict, device) -> RowLoss:
        p = self.pairs(model, row, device)
        return RowLoss(p.loss.losses.sum(), p.aux_loss, self._metric_sums(p), p.chosen_logps.numel(),
                       int(row["num_tokens"]))

    @staticmethod
    def _metric_sums(p: PairLosses) -> dict[str, torch.Tensor]:
        chosen, rejected = p.loss.chosen_rewards.double(), p.loss.rejected_rewards.double()
        return {
            "loss": p.loss.losses.detach().double().sum(),
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/accuracies": (chosen > rejected).double().sum(),
            "rewards/margins": (chosen - rejected).sum(),
            "logps/chosen": p.chosen_logps.detach().double().sum(),
            "logps/rejected": p.rejected_logps.detach().double().sum(),
        }
