"""train: the policy against the precomputed reference columns, DeepSpeed ZeRO-3 on Ray Train.

A package cut along its seams (the driver, the per-rank loop, the objective, the engine,
checkpoints, metrics, rows and export); ``driver`` holds what the stage runner calls.
"""

from .driver import (STAGE, STAGE_VERSION, fingerprint_inputs, preference_objective, preflight, run_in_process,
                     run_on_ray, summarize, verify_rows)
from .metrics import read_metrics
from .rows import RowReader, split_files

__all__ = ["STAGE", "STAGE_VERSION", "RowReader", "fingerprint_inputs", "preference_objective", "preflight", "read_metrics",
           "run_in_process", "run_on_ray", "split_files", "summarize", "verify_rows"]
