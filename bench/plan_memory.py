"""`pipeline plan`'s per-rank memory against the measured peak RSS of real train ranks.

Each configuration runs in fresh processes (``torchrun``, gloo, CPU) through
``bench/zero3_memory.py``'s worker: every rank builds the train stage's engine (the policy
loaded under ``zero.Init`` for ZeRO-3, AdamW, the schedule) and runs ``--steps``
optimizer steps of the log-prob pass through ``engine(row)`` over one packed row of
``--tokens`` tokens. A rank's fixed overhead is the peak RSS of the same configuration on
the demo's 140k-parameter model with a 64-token row (torch, transformers, DeepSpeed and
gloo loaded, the engine built, two steps: everything but the model's own memory); both
sides of the comparison leave it out:

    predicted = plan's peak (pipeline/planning/memory.py, no constant fitted)
    measured  = peak RSS (getrusage) - the overhead

A configuration counts toward the ±15% goal where the predicted part is at least the
overhead.

The allocator: glibc's malloc keeps freed blocks under its dynamic mmap threshold (which
rises to the largest block freed, up to 32 MiB) in its heap, and ZeRO-3's long-lived
buffers between them keep the heap from shrinking: RSS then grows over steps above what
the tensors hold. ``--allocator release`` (the default here) runs the ranks with
MALLOC_MMAP_THRESHOLD_=131072, a fixed threshold under which freed activations go back to
the system, so RSS follows the live tensors; ``--allocator default`` measures glibc as
it comes (docs/plan.md gives both and the step-time cost).

    .venv/bin/python bench/plan_memory.py [--configs small:0x1,small:3x2:gc,qwen0.5b:3x2 ...] [--tokens 4096]

A configuration is MODEL:ZxW[:gc][:offload=optimizer|param|optimizer+param][:tokens=T].
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MiB = 2**20

DEFAULT = ("small:0x1,small:0x2,small:2x2,small:3x1,small:3x2,small:0x1:gc,small:3x2:gc,small:2x2:offload=optimizer,"
           "qwen0.5b:0x1:tokens=1024,qwen0.5b:3x1:tokens=1024,qwen0.5b:2x2:tokens=1024,qwen0.5b:3x2:tokens=1024")


def parse(spec: str, tokens: int) -> dict:
    model, zw, *opts = spec.split(":")
    z, w = (int(x) for x in zw.split("x"))
    out = {"spec": spec, "model": model, "stage": z, "world": w, "gc": False, "offload": None, "tokens": tokens}
    for o in opts:
        if o == "gc":
            out["gc"] = True
        elif o.startswith("offload="):
            out["offload"] = o.split("=", 1)[1]
        elif o.startswith("tokens="):
            out["tokens"] = int(o.split("=", 1)[1])
        else:
            raise SystemExit(f"{spec}: unknown option {o}")
    return out


def predict(model_dir: str, c: dict):
    """The plan of this configuration, through the same path as `pipeline plan` (a config,
    ``plan.train_shape``, ``memory.train_rank``): fp32, segment_sdpa, the default chunk."""
    from transformers import AutoConfig

    from pipeline.core.config import config_from_dict
    from pipeline.planning.memory import train_rank
    from pipeline.planning.model import model_facts
    from pipeline.planning.plan import train_shape

    offload = {f"offload_{w}": {"device": "cpu"} for w in (c["offload"] or "").split("+") if w}
    cfg = config_from_dict({
        "model": {"path": model_dir, "dtype": "float32", "attn_implementation": "segment_sdpa"},
        "data": {"train_files": ["unused.jsonl"]},
        "tokenize": {"max_tokens_per_row": c["tokens"], "max_length": min(1024, c["tokens"] // 2)},
        "train": {"zero_stage": c["stage"], "num_workers": c["world"], "gradient_checkpointing": c["gc"],
                  "report_to": [], "deepspeed": {"zero_optimization": offload} if offload else None}})
    facts = model_facts(AutoConfig.from_pretrained(model_dir))
    return facts, train_rank(facts, train_shape(cfg, cfg.train, facts))


def main() -> None:
    import bench.zero3_memory as zm
    from bench.vs_trl import build_assets

    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=DEFAULT)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-plan-memory"))
    ap.add_argument("--allocator", choices=("release", "default"), default="release")
    ap.add_argument("--predict-again", action="store_true",
                    help="no run: the measured figures of --out's results.json against this code's predictions")
    a = ap.parse_args()
    if a.predict_again:
        results = json.loads((Path(a.out) / "plan-results.json").read_text())
        for r in results:
            c = parse(r["spec"], a.tokens)
            assets = build_assets(Path(a.out), c["model"], argparse.Namespace(dtype="float32", pairs=8,
                                                                               pair_words="10-20,5-10", max_length=64))
            _, plan = predict(assets["model"], c)
            r["predicted"], r["phase"] = plan.peak(place=None)
        report(results, a)
        return
    if a.allocator == "release":  # inherited by torchrun's ranks
        import os

        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    results = []
    for spec in a.configs.split(","):
        c = parse(spec, a.tokens)
        assets = build_assets(Path(a.out), c["model"], argparse.Namespace(dtype="float32", pairs=8,
                                                                           pair_words="10-20,5-10", max_length=64))
        run = argparse.Namespace(tokens=c["tokens"], steps=a.steps, zero=None, gc=c["gc"], offload=c["offload"])
        start = time.perf_counter()
        tiny = build_assets(Path(a.out), "tiny", argparse.Namespace(dtype="float32", pairs=8, pair_words="10-20,5-10",
                                                                      max_length=64))
        base = zm.run_config(tiny["model"], c["stage"], c["world"], argparse.Namespace(**dict(vars(run), tokens=64)))
        ranks = zm.run_config(assets["model"], c["stage"], c["world"], run)
        facts, plan = predict(assets["model"], c)
        predicted, phase = plan.peak(place=None)  # a CPU rank: host and device are one memory
        for r, b in zip(ranks, base):
            overhead = b["phases"][-1][2]
            measured = r["phases"][-1][2] - overhead
            results.append({"spec": spec, "rank": r["rank"], "params": facts.params, "overhead": overhead,
                            "measured": measured, "predicted": predicted, "phase": phase,
                            "lines": [(x.name, x.bytes, x.phases) for x in plan.lines]})
        print(f"# {spec}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "plan-results.json").write_text(json.dumps(results, indent=1))
    report(results, a)


def report(results: list[dict], a) -> None:
    import deepspeed
    import torch

    print(f"# plan against measured peak RSS, allocator {a.allocator}, fp32, CPU, gloo, {a.steps} steps, torch {torch.__version__}, "
          f"deepspeed {deepspeed.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| config | rank | parameters | overhead MiB | predicted MiB (phase) | measured MiB | predicted / measured | counts |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        counts = "yes" if r["predicted"] >= r["overhead"] else "no (under the overhead)"
        print(f"| {r['spec']} | {r['rank']} | {r['params'] / 1e6:.1f}M | {r['overhead'] / MiB:.0f} | "
              f"{r['predicted'] / MiB:.0f} ({r['phase']}) | {r['measured'] / MiB:.0f} | "
              f"{r['predicted'] / max(r['measured'], 1):.3f} | {counts} |")


if __name__ == "__main__":
    main()
