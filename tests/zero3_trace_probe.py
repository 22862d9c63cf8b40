"""Run by tests/test_zero3_prefetch.py under torchrun (one process per rank): the train
stage on CONFIG's already scored rows, with DeepSpeed's ZeRO-3 parameter coordinator
instrumented. Writes, per rank, whether the coordinator's trace was complete after each
start of a forward, how often it was invalidated, and how many prefetch all-gathers it
submitted.

Usage: torchrun --nproc_per_node 2 tests/zero3_trace_probe.py CONFIG fixed|unfixed OUT_PREFIX
("unfixed": DeepSpeed's pre-forward hook that starts each step of the coordinator's trace
removed, as when the log-prob pass called the model's pieces instead of ``engine(row)``).
"""

import json
import os
import sys

from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator
from deepspeed.utils.timer import SynchronizedWallClockTimer

import cluster.deepspeed_config as deepspeed_config
import pipeline.training.loop as loop
from pipeline import runner
from pipeline.core.config import load_config
from stages import train

config, mode, out_prefix = sys.argv[1:4]
stats = {"complete_after_reset": [], "invalidations": 0, "prefetches": 0, "events": []}
real_reset, real_invalidate = Coordinator.reset_step, Coordinator._invalidate_trace


def reset_step(self):
    profiler = self._PartitionedParameterCoordinator__profiler
    if profiler.timers is None:  # count its events (it counts only with timers)
        profiler.timers = SynchronizedWallClockTimer()
    stats["prefetches"] += sum(c.count for name, c in profiler.event_counters.items() if "prefetch" in name)
    real_reset(self)
    stats["complete_after_reset"].append(self.is_complete_trace())


def invalidate(self):
    stats["invalidations"] += 1
    stats["events"].append(f"invalidated after forward {len(stats['complete_after_reset'])}")
    real_invalidate(self)


def marked(name, fn):
    def wrapper(*args, **kwargs):
        stats["events"].append(f"{name} after forward {len(stats['complete_after_reset'])}")
        return fn(*args, **kwargs)
    return wrapper


loop.evaluate = marked("eval", loop.evaluate)
loop.save_checkpoint = marked("checkpoint", loop.save_checkpoint)


Coordinator.reset_step, Coordinator._invalidate_trace = reset_step, invalidate
real_build = deepspeed_config.build_ds_config


def build_ds_config(*args, **kwargs):
    """Every parameter partitioned, as nearly all of a large model's are (the tiny model's
    are below ZeRO-3's default persistence threshold, so there would be little to fetch)."""
    ds = real_build(*args, **kwargs)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return ds


deepspeed_config.build_ds_config = build_ds_config
if mode == "unfixed":  # the coordinator is never told a step starts (accumulation still counted)
    real_build_engine = loop.build_engine

    def build_engine(*args, **kwargs):
        engine = real_build_engine(*args, **kwargs)
        engine.optimizer.parameter_offload.fwd_pre_hook.remove()
        return engine

    loop.build_engine = build_engine

cfg = load_config(config)
plans = runner.plan_stages(cfg)
info = {"fingerprints": {s: p.fingerprint for s, p in plans.items()}, "config": {},
        "tokenized_dir": str(plans["tokenize"].dir)}
plans["train"].dir.mkdir()  # as the runner does
train.run_in_process(cfg, plans["score"].dir, plans["train"].dir, info)
with open(f"{out_prefix}.rank{os.environ['RANK']}.json", "w") as f:
    json.dump(stats, f)
