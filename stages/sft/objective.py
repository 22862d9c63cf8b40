"""Supervised fine-tuning as an objective of the shared loop: maximum likelihood on the
completions of packed rows, pi = argmax E[log pi(y | x)], the step the DPO paper takes
to make a reference when no SFT model exists.

Every completion token counts, prompt tokens are masked (the same segment layout and
log-prob pass as DPO: ``pipeline.core.logps.packed_token_logps``). A step's loss is the NLL
summed over every completion token of the step, all micro-batches and ranks, divided by
that token count: the unit is the completion token, as DPO's is the pair, and the loop's
normalisation is the same. This is TRL's SFTTrainer with ``completion_only_loss`` and its
``num_items_in_batch`` normalisation. Metrics carry TRL's names: ``loss`` (mean NLL per
completion token) and ``mean_token_accuracy`` (the share of completion tokens that are
the model's most likely next token).
"""

from __future__ import annotations

import numpy as np

from pipeline.core.logps import packed_token_logps
from pipeline.core.losses import router_load_balancing_loss
from pipeline.core.modeling import moe_router, row_inputs

from pipeline.training.objective import RowLoss
from pipeline.core.rows import ROW_COLUMNS, RowReader


class SFTObjective:
    unit = "completion_tokens"
    metric_names = ("loss", "mean_token_accuracy")
    accuracy = "mean_token_accuracy"
    hooks = ()
    columns = ROW_COLUMNS
    needs_reference = False

    def __init__(self, logp_chunk_tokens: int, router_aux_loss_coef: float | None = None):
        self.chunk = logp_chunk_tokens
        self.router_aux_loss_coef = router_aux_loss_coef

    def units_per_row(self, rows: RowReader) -> np.ndarray:
        """Completion tokens of each row: what a step's loss is divided by."""
        seq, prompt = rows.read_column("seq_lens"), rows.read_column("prompt_lens")
        return np.array([sum(s) - sum(p) for s, p in zip(seq, prompt)], dtype=np.int64)

    def __call__(self, model, row: dict, device) -> RowLoss:
        input_ids, position_ids, layout = row_inputs(row, device)
        router = moe_router(model, self.router_aux_loss_coef)
        tok = packed_token_logps(model, input_ids, position_ids, layout, self.chunk, correct=True,
                                 router_logits=router is not None)
        nll = -tok.logps[layout.targets]
        aux = None
        if router is not None:
            coef, experts, top_k = router
            aux = coef * router_load_balancing_loss(tok.router_logits, experts, top_k)
        sums = {"loss": nll.detach().double().sum(), "mean_token_accuracy": tok.correct[layout.targets].double().sum()}
        return RowLoss(nll.sum(), aux, sums, int(layout.targets.numel()), int(row["num_tokens"]))
