"""train: the policy against the precomputed reference columns, DeepSpeed ZeRO-3 on Ray actors.

The stage's own rooms: ``driver`` (its fingerprint, the row check, its door) and
``preference`` (the DPO objective). The loop, engine, checkpoints, metrics and export are
the shared training machinery's (pipeline/training/).
"""

from .driver import STAGE, STAGE_VERSION, fingerprint_inputs, preference_objective, run_in_process, run_on_ray, verify_rows

__all__ = ["STAGE", "STAGE_VERSION", "fingerprint_inputs", "preference_objective", "run_in_process", "run_on_ray",
           "verify_rows"]
