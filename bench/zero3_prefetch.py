"""ZeRO-3 step time with and without parameter prefetch, measured in the same run.

DeepSpeed starts each step of ZeRO-3's parameter coordinator in a pre-forward hook of the
top-level module, which runs because the log-prob pass is that module's forward, called as
``engine(row)`` (pipeline/training/forward.py); without it DeepSpeed never completes its trace
and never prefetches. This runs the same train stage twice on 2 ranks (torchrun, gloo on
CPU or NCCL on GPUs): "prefetch" as shipped, "no-prefetch" with that hook removed, and
prints the mean step time of each (first two steps excluded) and their ratio.

    python bench/zero3_prefetch.py [--steps 8] [--hidden 512] [--layers 8] [--out /tmp/zero3-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def config(a, mode: str):
    from pipeline.core.config import config_from_dict

    return config_from_dict({
        "run_dir": str(Path(a.out) / mode),
        "model": {"path": str(Path(a.out) / "model")},
        "data": {"train_files": [str(Path(a.out) / "assets" / "pairs.jsonl")], "eval_fraction": 0.02},
        "tokenize": {"max_length": 256, "max_tokens_per_row": 1024, "rows_per_shard": 64},
        "train": {"max_steps": a.steps, "eval_steps": 10**6, "num_workers": 2, "zero_stage": 3,
                  "gradient_accumulation_steps": 2, "cpus_per_worker": 1, "learning_rate": 1e-4,
                  "use_gpu": a.gpu},
    })


def rank_main(a) -> None:
    """One rank (under torchrun): the train stage on the scored rows."""
    import pipeline.training.loop as loop
    from pipeline import runner
    from stages import train

    if a.mode == "no-prefetch":  # DeepSpeed's step-start hook removed: no trace, no prefetch
        build = loop.build_engine

        def build_engine(*args, **kwargs):
            engine = build(*args, **kwargs)
            engine.optimizer.parameter_offload.fwd_pre_hook.remove()
            return engine

        loop.build_engine = build_engine
    cfg = config(a, a.mode)
    plans = runner.plan_stages(cfg)
    info = {"fingerprints": {s: p.fingerprint for s, p in plans.items()}, "config": {},
            "tokenized_dir": str(plans["tokenize"].dir)}
    plans["train"].dir.mkdir()
    train.run_in_process(cfg, plans["score"].dir, plans["train"].dir, info)


def step_seconds(a, mode: str) -> list[float]:
    from pipeline import runner

    out = Path(runner.plan_stages(config(a, mode))["train"].dir)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens"] / r["tokens_per_second"] for r in records if "loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default="/tmp/zero3-bench")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--rank-mode", dest="mode")
    a = ap.parse_args()
    if a.mode:
        return rank_main(a)

    import shutil

    from pipeline import runner
    from pipeline.demo import build_model, make_assets

    shutil.rmtree(a.out, ignore_errors=True)
    assets = make_assets(Path(a.out) / "assets")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["model"])
    model = build_model(len(tok), seed=0, hidden_size=a.hidden, layers=a.layers)
    model.save_pretrained(Path(a.out) / "model", safe_serialization=True)
    tok.save_pretrained(Path(a.out) / "model")
    params = sum(p.numel() for p in model.parameters())
    results = {}
    for mode in ("prefetch", "no-prefetch"):
        runner.run_pipeline(config(a, mode), stages=["tokenize", "score"], use_ray=False, log=lambda _: None)
        from pipeline.training.engine import free_port

        start = time.time()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), __file__, "--steps", str(a.steps), "--hidden", str(a.hidden), "--layers",
               str(a.layers), "--out", a.out, "--rank-mode", mode] + (["--gpu"] if a.gpu else [])
        subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       stdout=subprocess.DEVNULL)
        steps = step_seconds(a, mode)[2:]
        results[mode] = {"mean_step_s": sum(steps) / len(steps), "steps": len(steps),
                         "wall_s": round(time.time() - start, 1)}
    ratio = results["no-prefetch"]["mean_step_s"] / results["prefetch"]["mean_step_s"]
    print(json.dumps({"params": params, "ranks": 2, "gpu": a.gpu, **results,
                      "speedup_prefetch_vs_none": round(ratio, 3)}, indent=1))


if __name__ == "__main__":
    main()
