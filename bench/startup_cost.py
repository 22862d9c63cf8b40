"""The fixed cost of a run (#37, step 1: measured; nothing cut yet).

Each figure is one fresh ``python -m pipeline run`` process, started with no Ray running
(the pipeline starts its own local cluster and stops it):

- the demo (``configs/tiny.yaml`` on freshly built assets): its first run, an unchanged
  rerun and a ``train.beta`` rerun; ``python -c 'import torch'`` beside them;
- the same pipeline on the 19M model at two sizes of generated pairs (prompts 10-80 words,
  completions 5-150: a length mix like HH-RLHF's), and the fixed cost fitted from the two:
  fixed = (t1·n2 - t2·n1) / (n2 - n1), per pair = (t2 - t1) / (n2 - n1).

Each stage's seconds are its manifest's (``seconds``: from its start to its commit);
"outside the stages" is the process's wall time less their sum: imports, Ray's start and
stop, the checks, fingerprints and pins, the report.

    .venv/bin/python bench/startup_cost.py [--sizes 200,400] [--out runs/bench-startup]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)}: exit {out.returncode}\n{out.stderr[-3000:]}")
    return time.perf_counter() - start


def run(config: str, run_dir: Path, *overrides: str) -> tuple[float, dict[str, float]]:
    before = {p: p.stat().st_mtime for p in run_dir.glob("*/*/_MANIFEST.json")}
    wall = timed([sys.executable, "-m", "pipeline", "run", config, f"run_dir={run_dir}", *overrides])
    ran = {p for p in run_dir.glob("*/*/_MANIFEST.json") if before.get(p) != p.stat().st_mtime}
    seconds = {json.loads(p.read_text()).get("stage", p.parent.parent.name): float(json.loads(p.read_text())["seconds"])
               for p in ran}
    return wall, seconds


def line(name: str, wall: float, seconds: dict[str, float]) -> str:
    stages = ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) or "none ran"
    return f"| {name} | {wall:.1f} | {stages} | {wall - sum(seconds.values()):.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="200,400", help="pairs of the two 19M-model runs")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-startup"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from bench.vs_trl import build_assets
    from pipeline.demo import make_assets

    demo = make_assets(out / f"demo-{time.time_ns()}")
    demo_args = [f"model.path={demo['model']}", f"data.train_files=[{demo['data']}]"]
    torch_import = statistics.median(timed([sys.executable, "-c", "import torch"]) for _ in range(3))
    rows = [f"| `python -c 'import torch'` (median of 3) | {torch_import:.1f} | | |"]
    demo_dir = out / f"demo-run-{time.time_ns()}"
    rows.append(line("demo, first run", *run("configs/tiny.yaml", demo_dir, *demo_args)))
    rows.append(line("demo, unchanged rerun", *run("configs/tiny.yaml", demo_dir, *demo_args)))
    rows.append(line("demo, train.beta=0.2 rerun", *run("configs/tiny.yaml", demo_dir, *demo_args, "train.beta=0.2")))
    sizes = [int(n) for n in a.sizes.split(",")]
    walls = []
    for n in sizes:
        assets = build_assets(out / f"small-{n}", "small", argparse.Namespace(dtype="float32", pairs=n,
                                                                              pair_words="10-80,5-150", max_length=512))
        wall, seconds = run("configs/tiny.yaml", out / f"small-run-{n}-{time.time_ns()}", f"model.path={assets['model']}",
                            f"data.train_files=[{assets['data']}]", "tokenize.max_length=512",
                            "tokenize.max_tokens_per_row=2048", "data.eval_fraction=0.05")
        walls.append(wall)
        rows.append(line(f"19M model, {n} pairs", wall, seconds))
    (n1, n2), (t1, t2) = sizes, walls
    per_pair, fixed = (t2 - t1) / (n2 - n1), (t1 * n2 - t2 * n1) / (n2 - n1)
    print(f"# the fixed cost of a run, {time.strftime('%Y-%m-%d')}, one process each, no Ray running before")
    print("| run | wall s | each stage's manifest seconds | outside the stages s |")
    print("|---|---:|---|---:|")
    print("\n".join(rows))
    print(f"\nfitted from the two 19M runs: fixed {fixed:.1f} s, {per_pair:.3f} s a pair")


if __name__ == "__main__":
    main()
