"""Run by tests/test_checkpoints.py in its own process: the pipeline on CONFIG (one rank, no
Ray) that SIGKILLs itself the first time the train stage starts uploading its metrics to
the run directory, which it first does while saving its first checkpoint.

Usage: python tests/sync_kill_probe.py CONFIG
"""

import os
import signal
import sys
from unittest import mock

import pipeline.training.metrics as metrics
from pipeline import runner
from pipeline.core.config import load_config


def die(self):
    os.kill(os.getpid(), signal.SIGKILL)


with mock.patch.object(metrics.MetricsLog, "sync", die):
    runner.run_pipeline(load_config(sys.argv[1]), use_ray=False, log=lambda _: None)
