"""sft: the DPO paper's reference, the policy fine-tuned on the chosen completions (or on
data of its own) before score; its model is handed on as the reference and the start.

``stage`` holds the stage's door and its rows, ``objective`` the NLL the shared training
loop optimises."""

from .stage import (STAGE, STAGE_VERSION, export_digest, export_dir, fingerprint_inputs, own_data, run, tokenize_own,
                    write_chosen_rows)

__all__ = ["STAGE", "STAGE_VERSION", "export_digest", "export_dir", "fingerprint_inputs", "own_data", "run",
           "tokenize_own", "write_chosen_rows"]
