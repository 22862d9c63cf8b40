"""TR-DPO (train.sync_ref_model) over one epoch: what 3 reference refreshes cost against the
plain offline run on the same rows, and against TRL 1.16's DPOTrainer with
``sync_ref_model=True`` (a live reference model, synced every τ steps).

    .venv/bin/python bench/tr_dpo.py [--model small] [--pairs 400] [--row-tokens 1024]

One epoch on one rank (1 packed row a step); τ = steps // 4 + 1, so the reference is
refreshed 3 times (after steps τ, 2τ and 3τ), with TRL's α 0.6. Each variant runs in a
fresh process, in a run directory of its own, on the same pairs, model and settings as
``bench/vs_trl.py`` (the same helpers: random-init model, fp32 on CPU, AdamW, the same
batches for TRL as our steps):

* ``ours-plain``: tokenize, score and train (the stages' seconds from their manifests);
* ``ours-tr-dpo``: the same with TR-DPO: the refreshes' own seconds (mix + rescoring, from
  ``metrics.jsonl``) are its overhead;
* ``trl-tr-dpo``: TRL's DPOTrainer with a live reference and ``sync_ref_model``, from
  building the trainer (it tokenises there) to the end of ``train``.

Ratios printed: TR-DPO over plain (goal: at most 1.25x), TRL over ours with TR-DPO (goal:
at least 1.5x), and the refreshes' share of the TR-DPO run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ALPHA = 0.6


def settings(a) -> argparse.Namespace:
    """The namespace ``vs_trl``'s helpers read."""
    return argparse.Namespace(dtype="float32", device="cpu", pairs=a.pairs, pair_words=a.pair_words,
                              max_length=a.row_tokens // 2, row_tokens=a.row_tokens, steps=a.steps,
                              grad_ckpt=False, zero_stage=3, profile=False)


def config(a, out: Path, assets: dict, name: str, sync: bool):
    import vs_trl

    from pipeline.core.config import config_from_dict, to_dict

    raw = to_dict(vs_trl.our_config(out, assets, settings(a)))
    raw["run_dir"] = str(out / name)
    if sync:
        raw["train"].update(sync_ref_model=True, ref_model_mixup_alpha=ALPHA, ref_model_sync_steps=a.tau)
    return config_from_dict(raw)


def variant_prepare(a, out: Path, assets: dict) -> dict:
    """The epoch's steps: the tokenize stage's train rows (1 rank, 1 row a step), tokenized
    where ``vs_trl.variant_trl`` reads our steps' pairs to give TRL the same batches."""
    from pipeline import runner

    cfg = config(a, out, assets, "run", sync=False)
    results = runner.run_pipeline(cfg, stages=["tokenize"], use_ray=False, log=lambda _: None)
    return {"steps": results["tokenize"]["stats"]["train"]["rows"]}


def variant_ours(a, out: Path, assets: dict, sync: bool) -> dict:
    from pipeline import runner
    from pipeline.training.metrics import read_metrics

    import shutil

    name = "tr-dpo" if sync else "plain"
    shutil.rmtree(out / name, ignore_errors=True)
    cfg = config(a, out, assets, name, sync)
    start = time.perf_counter()
    results = runner.run_pipeline(cfg, use_ray=False, log=lambda _: None)
    wall = time.perf_counter() - start
    refreshes = [r for r in read_metrics(runner.plan_stages(cfg)["train"].dir) if "reference_refresh" in r]
    steps = [r for r in read_metrics(runner.plan_stages(cfg)["train"].dir) if "loss" in r]
    return {"wall_s": wall, "stages_s": {k: r["seconds"] for k, r in results.items()},
            "step_s": sum(r["tokens"] / r["tokens_per_second"] for r in steps),
            "refreshes": len(refreshes), "refresh_s": sum(r["refresh_seconds"] for r in refreshes),
            "rescored_rows": sum(r["rescored_rows"] for r in refreshes), "steps": results["train"]["stats"]["steps"]}


def variant_trl(a, out: Path, assets: dict) -> dict:
    import vs_trl

    result = vs_trl.variant_trl(out, assets, settings(a), precompute=False,
                                extra={"sync_ref_model": True, "ref_model_mixup_alpha": ALPHA,
                                       "ref_model_sync_steps": a.tau}, same_tokens=False)
    return {"wall_s": result["wall_s"], "steps": len(result["losses"]), "differing": result["micro_batches_differing"]}


VARIANTS = {"prepare": variant_prepare, "ours-plain": lambda a, o, s: variant_ours(a, o, s, sync=False),
            "ours-tr-dpo": lambda a, o, s: variant_ours(a, o, s, sync=True), "trl-tr-dpo": variant_trl}


def run(name: str, a) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--model", a.model, "--pairs", str(a.pairs),
           "--row-tokens", str(a.row_tokens), "--pair-words", a.pair_words, "--steps", str(a.steps),
           "--tau", str(a.tau), "--out", a.out]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    print(f"  {name}: rc {proc.returncode}, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--row-tokens", type=int, default=1024)
    ap.add_argument("--pair-words", default="10-80,5-150")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--tau", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-tr-dpo"))
    ap.add_argument("--one")
    a = ap.parse_args()
    if a.one:
        import vs_trl

        out = Path(a.out) / a.model
        assets = vs_trl.build_assets(out, a.model, settings(a))
        print(json.dumps(VARIANTS[a.one](a, out, assets)))
        return
    a.steps = run("prepare", a)["steps"]
    a.tau = a.steps // 4 + 1  # refreshes after steps tau, 2 tau, 3 tau: 3 in the epoch
    r = {name: run(name, a) for name in ("ours-plain", "ours-tr-dpo", "trl-tr-dpo")}
    plain, sync, trl = r["ours-plain"], r["ours-tr-dpo"], r["trl-tr-dpo"]
    assert sync["refreshes"] == 3 and plain["steps"] == sync["steps"] == trl["steps"] == a.steps, r
    pipeline = {k: sum(v["stages_s"].values()) for k, v in (("plain", plain), ("sync", sync))}
    print(f"\nTR-DPO, {a.model} model, {a.pairs} pairs, one epoch of {a.steps} steps (1 rank, rows of "
          f"{a.row_tokens} tokens), tau {a.tau}, alpha {ALPHA}, CPU fp32\n")
    print("| run | tokenize s | score s | train s | pipeline s | refreshes s |")
    print("|---|---|---|---|---|---|")
    for label, v in (("ours, plain", plain), ("ours, TR-DPO", sync)):
        s = v["stages_s"]
        print(f"| {label} | {s['tokenize']:.1f} | {s['score']:.1f} | {s['train']:.1f} | {sum(s.values()):.1f} | "
              f"{v['refresh_s']:.1f} |")
    print(f"| TRL 1.16, sync_ref_model | | | | {trl['wall_s']:.1f} | |")
    print(f"\nTR-DPO over plain: {pipeline['sync'] / pipeline['plain']:.2f}x the pipeline's seconds "
          f"(goal <= 1.25x); train stage alone {sync['stages_s']['train'] / plain['stages_s']['train']:.2f}x")
    print(f"TRL over ours with TR-DPO: {trl['wall_s'] / pipeline['sync']:.2f}x (goal >= 1.5x)")
    print(f"refreshes: {sync['refresh_s']:.1f} s, {100 * sync['refresh_s'] / pipeline['sync']:.1f}% of the TR-DPO "
          f"run ({sync['rescored_rows']} rows rescored)")
    # The same steps train the same rows in both runs: their seconds differ only by the
    # machine's drift between the runs (measured: +-10% on this 2-core VM), which the ratio
    # above includes and this one does not.
    drift = sync["step_s"] / plain["step_s"]
    # drift-free: the plain run with TR-DPO's score stage (the first segment's rows) and its refreshes
    est = pipeline["plain"] - plain["stages_s"]["score"] + sync["stages_s"]["score"] + sync["refresh_s"]
    print(f"optimizer steps: {plain['step_s']:.1f} s plain, {sync['step_s']:.1f} s TR-DPO ({drift:.2f}x: the "
          f"machine's drift); the plain run with TR-DPO's score and refreshes: {est / pipeline['plain']:.2f}x")
    if trl["differing"]:
        print(f"(TRL tokenised {trl['differing']} of {a.steps} micro-batches to another token count than ours)")


if __name__ == "__main__":
    main()
