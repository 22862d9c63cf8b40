"""Run by tests/test_reference_in_ranks.py under torchrun, 2 processes: TR-DPO's reference
held by the ranks (pipeline/training/reference.py) next to the policy's engine, both ZeRO-3
with buckets far smaller than the weights.

Rank 0 writes OUT.json: how far the reference's scores of the first rows are from the score
stage's stored columns (the same model, scored by a plain actor); how far the reference
mixed with α = 0.6 is from 0.6·θ + 0.4·π_ref computed on whole tensors (θ the policy's
fp32 weights after 2 steps); the reference's elements on each rank against the model's.

Usage: torchrun --nproc_per_node 2 tests/reference_probe.py CONFIG OUT.json
"""

import dataclasses
import json
import sys

import deepspeed
import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from pipeline import runner
from pipeline.core.config import for_workers, load_config
from pipeline.core.rows import split_files
from pipeline.training.engine import build_engine
from pipeline.training.loop import WorkerSpec, setup, train_step
from pipeline.training.plan import planned_steps
from pipeline.training.reference import build_reference, mix_policy_into, score_row
from stages.train.driver import preference_objective

SMALL = {"reduce_bucket_size": 2000, "allgather_bucket_size": 2000, "stage3_prefetch_bucket_size": 2000,
         "sub_group_size": 10000, "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 20000,
         "stage3_max_reuse_distance": 20000}
ROWS = 4


def gathered(module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().float().clone()
    return out


config_path, out_path = sys.argv[1:3]
cfg = load_config(config_path)
plans = runner.plan_stages(cfg)
train_cfg = dataclasses.replace(cfg.train, zero_stage=3, deepspeed={"zero_optimization": SMALL})
spec = WorkerSpec(cfg_dict=for_workers(cfg),
                  objective=preference_objective(cfg), rows_dir=str(plans["score"].dir),
                  out_dir=str(plans["train"].dir), info={}, train_cfg=train_cfg)
ctx = setup(spec)
policy = build_engine(ctx.train_cfg, ctx.cfg.model, ctx.world, ctx.total_steps, ctx.objective, ctx.device)
reference = build_reference(ctx.train_cfg, ctx.cfg.model, cfg.reference_path, ctx.world, ctx.device)
result = {}

# 1. the reference's scores are the score stage's columns
table = pq.read_table(split_files(plans["score"].dir, "train")[0].open_input()).slice(0, ROWS)
worst_token, worst_sum = 0.0, 0.0
for row in table.to_pylist():
    logps, sums = score_row(reference, row)
    worst_token = max(worst_token, float(np.abs(logps - np.asarray(row["ref_logps"], np.float32)).max()))
    worst_sum = max(worst_sum, float(np.abs(sums - np.asarray(row["ref_seq_logps"], np.float32)).max()))
result["score_max_abs_diff"] = {"per_token": worst_token, "per_segment": worst_sum, "rows": ROWS}

# 2. two optimizer steps, then the mix against whole tensors
for step, plan in planned_steps(ctx.train_rows.num_rows, ctx.world, 1, train_cfg.seed, 2, 0):
    train_step(policy, ctx, step, plan)
before = gathered(reference.module)
theta = {}
for name, p in policy.module.named_parameters():
    theta[name] = deepspeed.utils.safe_get_full_fp32_param(p).float().clone()
mixed = mix_policy_into(reference, policy, 0.6)
after = gathered(reference.module)
diffs = {n: (after[n] - (0.6 * theta[n] + 0.4 * before[n])).abs().max().item() for n in after}
moved = max((theta[n] - before[n]).abs().max().item() for n in after)
result["mix"] = {"max_abs_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get), "policy_moved": moved,
                 "parameters": len(diffs)}
numel = sum(p.ds_numel for p in reference.module.parameters())
local = torch.tensor([float(mixed), float(sum(p.ds_tensor.numel() for p in reference.module.parameters()))])
everyone = [torch.zeros(2) for _ in range(ctx.world)]
dist.all_gather(everyone, local)
result["partition"] = {"model_elements": numel, "per_rank": [t.tolist() for t in everyone]}

# 3. with α = 1 the reference is the policy
mix_policy_into(reference, policy, 1.0)
now = gathered(reference.module)
result["alpha_1_max_abs_diff"] = max((now[n] - theta[n]).abs().max().item() for n in now)

if dist.get_rank() == 0:
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result), flush=True)
