"""Run by tests/test_engine_matrix.py under torchrun, 2 processes: the train stage's own
engine and loop (``build_engine``, ``train_step``) on CONFIG's scored rows, once per case
of the ZeRO x offload x accumulation matrix, 3 optimizer steps each, every case in this
one launch. Buckets are far smaller than the gradient (the tiny model's 140k parameters
cross about 70 of them, each weight matrix on its own), as an 8B model's gradient crosses
hidden² buckets.

Rank 0 writes OUT.json: for each case, the largest difference of any parameter from its
reference case (ZeRO-0, no offload, the same accumulation, dtype and LoRA), the parameter
it is in, how many of the model's parameters differ by more than 1e-6, how far the
reference's steps moved the parameters, and the distance between the two runs relative
to that move (L2 over all parameters; the bf16 case's measure); the bf16 offload case is
also compared with its peer, bf16 ZeRO-3 without offload.

Usage: torchrun --nproc_per_node 2 tests/engine_matrix_probe.py CONFIG OUT.json
"""

import dataclasses
import gc
import json
import sys
import time

import deepspeed
import torch
import torch.distributed as dist

from pipeline import runner
from pipeline.core.config import LoraSettings, config_from_dict, for_workers, load_config
from stages.train.driver import preference_objective
from pipeline.training.engine import build_engine
from pipeline.training.loop import WorkerSpec, setup, train_step
from pipeline.training.plan import planned_steps

# Buckets of a few thousand elements: every weight matrix of the tiny model (4k to 33k
# elements) is flushed on its own, in the middle of the backward.
SMALL = {"reduce_bucket_size": 2000, "allgather_bucket_size": 2000, "stage3_prefetch_bucket_size": 2000,
         "sub_group_size": 10000, "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 20000,
         "stage3_max_reuse_distance": 20000}
CPU = {"device": "cpu", "pin_memory": False}


def case(name, stage, accum, offload=(), reference=None, dtype="float32", lora=False, peer=None):
    zero = {k: v for k, v in SMALL.items() if stage == 3 or not k.startswith(("stage3", "sub_group"))}
    zero.update({which: dict(CPU) for which in offload})
    return {"name": name, "stage": stage, "accum": accum, "deepspeed": {"zero_optimization": zero} if stage else None,
            "reference": reference, "dtype": dtype, "lora": lora, "peer": peer}


def matrix() -> list[dict]:
    """The references first (ZeRO-0, no offload), and ZeRO-3 last: its linear replaces
    F.linear for the rest of the process (cluster/zero3_linear.py)."""
    cases = []
    for accum in (1, 3):
        ref = f"zero0-accum{accum}"
        cases += [case(ref, 0, accum), case(f"zero1-accum{accum}", 1, accum, reference=ref),
                  case(f"zero2-accum{accum}", 2, accum, reference=ref),
                  case(f"zero1-offload_optimizer-accum{accum}", 1, accum, ["offload_optimizer"], ref),
                  case(f"zero2-offload_optimizer-accum{accum}", 2, accum, ["offload_optimizer"], ref)]
    cases += [case("lora-zero0-accum3", 0, 3, lora=True), case("bf16-zero0-accum3", 0, 3, dtype="bfloat16"),
              case("bf16-zero2-accum3", 2, 3, [], "bf16-zero0-accum3", dtype="bfloat16")]
    for accum in (1, 3):
        ref = f"zero0-accum{accum}"
        cases += [case(f"zero3-accum{accum}", 3, accum, reference=ref),
                  case(f"zero3-offload_optimizer-accum{accum}", 3, accum, ["offload_optimizer"], ref),
                  case(f"zero3-offload_param-accum{accum}", 3, accum, ["offload_param"], ref)]
    cases += [case("lora-zero3-offload_optimizer-accum3", 3, 3, ["offload_optimizer"], "lora-zero0-accum3", lora=True),
              case("bf16-zero3-accum3", 3, 3, [], "bf16-zero0-accum3", dtype="bfloat16"),
              case("bf16-zero3-offload_optimizer-accum3", 3, 3, ["offload_optimizer"], "bf16-zero0-accum3",
                   dtype="bfloat16", peer="bf16-zero3-accum3")]
    return cases


def full_parameters(engine) -> dict[str, torch.Tensor]:
    """Every parameter, whole, by its name in the model (gathered under ZeRO-3)."""
    out = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out[name] = p.detach().float().clone()
    return out


def run_case(cfg, rows_dir, spec_case: dict) -> tuple[dict, dict, list[float]]:
    """The parameters before and after the case's 3 steps, and the steps' losses."""
    train_cfg = dataclasses.replace(
        cfg.train, zero_stage=spec_case["stage"], gradient_accumulation_steps=spec_case["accum"],
        deepspeed=spec_case["deepspeed"], peft=LoraSettings(r=4, alpha=8, dropout=0.0) if spec_case["lora"] else None)
    raw = for_workers(cfg)
    raw["model"]["dtype"] = spec_case["dtype"]
    case_cfg = config_from_dict(raw)
    spec = WorkerSpec(for_workers(case_cfg), preference_objective(case_cfg), str(rows_dir), str(OUT_DIR), {},
                      train_cfg=train_cfg)
    ctx = setup(spec)
    engine = build_engine(ctx.train_cfg, ctx.cfg.model, ctx.world, ctx.total_steps, ctx.objective, ctx.device)
    initial, losses = full_parameters(engine), []
    for step, plan in planned_steps(ctx.train_rows.num_rows, ctx.world, train_cfg.gradient_accumulation_steps,
                                    train_cfg.seed, ctx.total_steps, 0):
        losses.append(train_step(engine, ctx, step, plan)["loss"])
    params = full_parameters(engine)
    engine.destroy()
    del engine
    gc.collect()
    return initial, params, losses


def compare(got: dict, want: dict, initial: dict) -> dict:
    diffs = {name: (got[name] - want[name]).abs() for name in want}
    worst = max(diffs, key=lambda n: diffs[n].max().item())
    rel = max(((d / want[n].abs().clamp(min=2.0**-20)).max().item()) for n, d in diffs.items())
    return {"max_abs_diff": diffs[worst].max().item(), "worst_parameter": worst,
            "parameters_over_1e-6": sum(int(d.max().item() > 1e-6) for d in diffs.values()),
            "parameters": len(diffs), "max_rel_diff": rel,
            # how far the reference's 3 steps moved its parameters: what the differences are measured against
            "reference_moved": max((want[n] - initial[n]).abs().max().item() for n in want),
            # the distance between the two runs' parameters over the distance the reference's steps moved them (L2)
            "update_distance": (sum(d.square().sum() for d in diffs.values())
                                / sum((want[n] - initial[n]).square().sum() for n in want)).sqrt().item()}


config_path, out_path = sys.argv[1:3]
cfg = load_config(config_path)
plans = runner.plan_stages(cfg)
rows_dir = plans["score"].dir
OUT_DIR = plans["train"].dir
results, params, t0 = {}, {}, time.time()
for c in matrix():
    start = time.time()
    initial, got, losses = run_case(cfg, rows_dir, c)
    params[c["name"]] = (initial, got)
    entry = {"seconds": round(time.time() - start, 1), "losses": losses}
    if c["reference"] is not None:
        ref_initial, ref = params[c["reference"]]
        entry.update(compare(got, ref, ref_initial))
    if c["peer"] is not None:  # the same arithmetic without the feature under test
        peer_initial, peer = params[c["peer"]]
        entry["peer"] = compare(got, peer, peer_initial)
    results[c["name"]] = entry
    if dist.get_rank() == 0:
        print(c["name"], json.dumps({k: v for k, v in entry.items() if k != "losses"}), flush=True)
if dist.get_rank() == 0:
    with open(out_path, "w") as f:
        json.dump({"cases": results, "seconds": round(time.time() - t0, 1)}, f, indent=1)
