"""Run by tests/test_train_options.py in its own process: the pipeline on CONFIG (one rank,
no Ray), with pipeline.training.offload instrumented. Prints, as JSON, which offload setting each
training micro-batch's forward ran under and how many saved tensors went through the hooks.

Usage: python tests/offload_probe.py CONFIG
"""

import json
import sys
from unittest import mock

import pipeline.training.offload as offload
import pipeline.training.loop as loop
from pipeline import runner
from pipeline.core.config import load_config

contexts: list[bool] = []
saved = 0


def context(enabled, *args, **kwargs):
    contexts.append(enabled)
    return offload.offload_activations(enabled, *args, **kwargs)


def moves(tensor, *args):
    global saved
    saved += 1
    return real_moves(tensor, *args)


real_moves = offload.moves
with mock.patch.object(loop, "offload_activations", context), mock.patch.object(offload, "moves", moves):
    runner.run_pipeline(load_config(sys.argv[1]), use_ray=False, log=lambda _: None)
print(json.dumps({"contexts": contexts, "saved": saved}))
