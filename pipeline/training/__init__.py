"""The shared training machinery, below the stages: the per-rank loop, the DeepSpeed engine,
checkpoints (and the universal ones), metrics, the step plan, the export, and a training
stage's driver side (``launch``). Training stages (train, sft) run their Objective on it."""
