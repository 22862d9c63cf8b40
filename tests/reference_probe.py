"""Run by tests/test_reference_in_ranks.py under torchrun, 2 processes: TR-DPO's reference
held by the ranks (pipeline/training/reference.py) next to the policy's engine, both ZeRO-3
with buckets far smaller than the weights.

Rank 0 writes OUT.json: how far the reference's scores of the first rows are from the score
stage's stored columns (the same model, scored by a plain actor); after 2 policy steps, how
far its scores mixed with α = 0.6, then α = 1, are from a plain model holding
0.6·θ + 0.4·π_ref, then θ, computed on whole tensors (θ the policy's fp32 weights); its
weights after the last mix against θ; the reference's elements on each rank; and with a LoRA
policy, a fresh reference mixed with α = 0.6 against peft's own merge of the policy.

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
from pipeline.core.logps import packed_token_logps
from pipeline.core.modeling import load_causal_lm, row_inputs
from pipeline.core.rows import split_files
from pipeline.core.config import LoraSettings
from pipeline.training.engine import add_lora, build_engine
from pipeline.training.loop import WorkerSpec, setup, train_step
from pipeline.training.plan import planned_steps
from pipeline.training.reference import build_reference, mix_policy_into, score_row
from stages.train.driver import preference_objective

# Small buckets; ZeRO-3's default persistence threshold (1e5 elements: every parameter of the
# tiny model would be kept whole between forwards, were the reference to allow it).
SMALL = {"reduce_bucket_size": 2000, "allgather_bucket_size": 2000, "stage3_prefetch_bucket_size": 2000,
         "sub_group_size": 10000, "stage3_max_live_parameters": 20000, "stage3_max_reuse_distance": 20000}
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

# 2. two optimizer steps, then the mixes. The reference is not gathered in between (a gather
# releases every parameter, so the next forward fetches the partitions afresh): its scores
# after each mix are compared with a plain model holding the whole-tensor formula's weights.
for step, plan in planned_steps(ctx.train_rows.num_rows, ctx.world, 1, train_cfg.seed, 2, 0):
    train_step(policy, ctx, step, plan)
theta = {name: deepspeed.utils.safe_get_full_fp32_param(p).float().clone()
         for name, p in policy.module.named_parameters()}
plain = load_causal_lm(cfg.reference_path, cfg.model)
plain.eval()
before = {name: p.detach().float().clone() for name, p in plain.named_parameters()}


def scores_against(weights: dict) -> float:
    """The reference's scores of the rows against a plain model holding ``weights``."""
    plain.load_state_dict(weights, strict=False)
    worst = 0.0
    for row in table.to_pylist():
        logps, _ = score_row(reference, row)
        with torch.no_grad():
            want = packed_token_logps(plain, *row_inputs(row, "cpu"), cfg.model.logp_chunk_tokens).logps.numpy()
        worst = max(worst, float(np.abs(logps - want).max()))
    return worst


mixed = mix_policy_into(reference, policy, 0.6)
expected = {n: 0.6 * theta[n] + 0.4 * before[n] for n in theta}
result["alpha_0.6_scores_max_abs_diff"] = scores_against(expected)
mix_policy_into(reference, policy, 1.0)  # 1·θ + 0·(the 0.6 mix): the policy
result["alpha_1_scores_max_abs_diff"] = scores_against(theta)
# and, gathered at the end, the reference's weights are θ's
now = gathered(reference.module)
result["alpha_1_max_abs_diff"] = max((now[n] - theta[n]).abs().max().item() for n in now)
moved = max((theta[n] - before[n]).abs().max().item() for n in theta)
result["policy_moved"] = moved
numel = sum(p.ds_numel for p in reference.module.parameters())
local = torch.tensor([float(mixed), float(sum(p.ds_tensor.numel() for p in reference.module.parameters()))])
everyone = [torch.zeros(2) for _ in range(ctx.world)]
dist.all_gather(everyone, local)
result["partition"] = {"model_elements": numel, "per_rank": [t.tolist() for t in everyone]}

# 3. with LoRA: the reference mixed with the merged weights. The oracle is peft's own
# merge_and_unload of the policy gathered whole, on a plain model, after 2 steps (B moved off 0).
lora_cfg = dataclasses.replace(train_cfg, peft=LoraSettings(r=4, alpha=8.0, target_modules="all-linear"))
lora_policy = build_engine(lora_cfg, ctx.cfg.model, ctx.world, ctx.total_steps, ctx.objective, ctx.device)
ctx.train_cfg = lora_cfg
for step, plan in planned_steps(ctx.train_rows.num_rows, ctx.world, 1, train_cfg.seed, 2, 0):
    train_step(lora_policy, ctx, step, plan)
fresh = build_reference(lora_cfg, ctx.cfg.model, cfg.reference_path, ctx.world, ctx.device)
mix_policy_into(fresh, lora_policy, 0.6)
state = {name: deepspeed.utils.safe_get_full_fp32_param(p).float().clone() if p.requires_grad else None
         for name, p in lora_policy.module.named_parameters()}
whole = gathered(lora_policy.module)  # the frozen base weights, whole
merged = add_lora(load_causal_lm(cfg.reference_path, cfg.model), lora_cfg.peft)
merged.load_state_dict({n: state[n] if state[n] is not None else whole[n] for n in state})
merged = merged.merge_and_unload()
expected = {n: 0.6 * p.detach().float() + 0.4 * before[n] for n, p in merged.named_parameters()}
now = gathered(fresh.module)
result["lora"] = {"adapters_moved": max(state[n].abs().max().item() for n in state if "lora_B" in n),
                  "max_abs_diff": max((now[n] - expected[n]).abs().max().item() for n in now),
                  "names_equal": sorted(now) == sorted(expected)}
fresh.destroy()
lora_policy.destroy()

if dist.get_rank() == 0:
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result), flush=True)
reference.destroy()
policy.destroy()
dist.barrier()
dist.destroy_process_group()
