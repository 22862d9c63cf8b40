"""The fixed cost of a run (#37), and where its seconds go.

Each figure is one fresh ``python -m pipeline run`` process, started with no Ray running
(the pipeline starts its own local cluster and stops it), repeated ``--repeat`` times; the
table gives the median of each column:

- the demo (``configs/tiny.yaml`` on freshly built assets): its first run (a new run
  directory each time), an unchanged rerun and a ``train.beta`` rerun (a new beta each
  time, so train runs again); ``python -c 'import torch'`` beside them;
- the same pipeline on the 19M model at two sizes of generated pairs (prompts 10-80 words,
  completions 5-150: a length mix like HH-RLHF's), and the fixed cost fitted from the two
  sizes of each repetition: fixed = (t1·n2 - t2·n1) / (n2 - n1), per pair = (t2 - t1) / (n2 - n1).
  Small sizes by default (40 and 120 pairs): the fit is 1.5·t1 - 0.5·t2, so a run's noise
  (this machine's speed moves by 10 to 15% between minutes) moves it by that share of t1,
  which grows with the sizes (at 100 and 300 pairs three fits spread over 21 s).

Each stage's seconds and phases (start-up, work, shutdown) are its manifest's; "outside
the stages" is the process's wall time less their sum: imports, Ray's start and stop, the
checks, fingerprints and pins, the report. After each run, no process of the cluster it
started may be left (checked by the GCS port in command lines).

    .venv/bin/python bench/startup_cost.py [--sizes 40,120] [--repeat 3] [--parts demo,small] [--out runs/bench-startup]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("tokenize", "score", "train")


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:  # the whole stderr: Ray's log lines can bury the error in its tail
        log = Path(f"/tmp/startup-cost-failed-{time.time_ns()}.log")
        log.write_text(out.stdout + "\n----- stderr\n" + out.stderr)
        sys.exit(f"{' '.join(cmd)}: exit {out.returncode} (its output: {log})\n{out.stderr[-3000:]}")
    return time.perf_counter() - start, out.stdout


def left_behind(stdout: str) -> list[str]:
    """Processes of the local cluster the run started that outlived it."""
    import psutil

    started = re.search(r"^\[ray\] started a local cluster at \S+:(\d+)$", stdout, re.M)
    if not started:
        return []
    port = f":{started.group(1)}"
    return [" ".join(p.info["cmdline"])[:80] for p in psutil.process_iter(["cmdline"])
            if any(port in part for part in (p.info["cmdline"] or []))]


def run(config: str, run_dir: Path, *overrides: str) -> dict:
    """One process: its wall time, each stage that ran with its seconds and phases."""
    before = {p: p.stat().st_mtime for p in run_dir.glob("*/*/_MANIFEST.json")}
    wall, stdout = timed([sys.executable, "-m", "pipeline", "run", config, f"run_dir={run_dir}", *overrides])
    if left := left_behind(stdout):
        sys.exit(f"processes outlived the run: {left}")
    out = {"wall": wall}
    for path in run_dir.glob("*/*/_MANIFEST.json"):
        if before.get(path) != path.stat().st_mtime:
            m = json.loads(path.read_text())
            out[m["stage"]] = {"seconds": m["seconds"], **m.get("phases", {})}
    out["outside"] = wall - sum(v["seconds"] for k, v in out.items() if k in STAGES)
    said = re.search(r"^\[run\] (.*)$", stdout, re.M)  # the run's own split of what is outside the stages
    out["run_line"] = said.group(1) if said else None
    print(f"# {run_dir.name} {' '.join(overrides)[-60:]}: {json.dumps(out)}", file=sys.stderr, flush=True)  # kept if cut short
    return out


def median_row(name: str, runs: list[dict]) -> str:
    def med(get) -> str:
        values = [v for v in (get(r) for r in runs) if v is not None]
        return f"{statistics.median(values):.1f}" if values else ""

    cells = [med(lambda r: r["wall"]), med(lambda r: r["outside"])]
    for stage in STAGES:
        if not any(stage in r for r in runs):
            cells.append("")
            continue
        parts = [med(lambda r, k=k, s=stage: r.get(s, {}).get(k)) for k in ("seconds", "startup", "work", "shutdown")]
        cells.append(f"{parts[0]} ({' / '.join(p or '-' for p in parts[1:])})")
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="40,120", help="pairs of the two 19M-model runs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--parts", default="demo,small", help="demo (the demo's runs), small (the 19M model's fit)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-startup"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from bench.vs_trl import build_assets
    from pipeline.demo import make_assets

    demo = make_assets(out / f"demo-{time.time_ns()}")
    demo_args = [f"model.path={demo['model']}", f"data.train_files=[{demo['data']}]"]
    torch_import = statistics.median(timed([sys.executable, "-c", "import torch"])[0] for _ in range(3))
    first, unchanged, beta = [], [], []
    for k in range(a.repeat if "demo" in a.parts else 0):
        demo_dir = out / f"demo-run-{time.time_ns()}"
        first.append(run("configs/tiny.yaml", demo_dir, *demo_args))
        unchanged.append(run("configs/tiny.yaml", demo_dir, *demo_args))
        beta.append(run("configs/tiny.yaml", demo_dir, *demo_args, f"train.beta={0.2 + 0.1 * k:.1f}"))
    sizes = [int(n) for n in a.sizes.split(",")] if "small" in a.parts else []
    assets = {n: build_assets(out / f"small-{n}", "small", argparse.Namespace(
        dtype="float32", pairs=n, pair_words="10-80,5-150", max_length=512)) for n in sizes}
    small = {n: [] for n in sizes}
    fits = []
    for _ in range(a.repeat if sizes else 0):
        for n in sizes:
            small[n].append(run("configs/tiny.yaml", out / f"small-run-{n}-{time.time_ns()}",
                                f"model.path={assets[n]['model']}", f"data.train_files=[{assets[n]['data']}]",
                                "tokenize.max_length=512", "tokenize.max_tokens_per_row=2048",
                                "data.eval_fraction=0.05"))
        (n1, n2), (t1, t2) = sizes, (small[sizes[0]][-1]["wall"], small[sizes[1]][-1]["wall"])
        fits.append(((t1 * n2 - t2 * n1) / (n2 - n1), (t2 - t1) / (n2 - n1)))
    print(f"# the fixed cost of a run, {time.strftime('%Y-%m-%d')}: median of {a.repeat} processes each, "
          "no Ray running before any")
    print("| run | wall s | outside the stages s | " + " | ".join(
        f"{s} s (start-up / work / shutdown)" for s in STAGES) + " |")
    print("|---|---:|---:|" + "---:|" * len(STAGES))
    print(f"| `python -c 'import torch'` | {torch_import:.1f} | | | | |")
    if first:
        print(median_row("demo, first run", first))
        print(median_row("demo, unchanged rerun", unchanged))
        print(median_row("demo, train.beta rerun", beta))
    for n in sizes:
        print(median_row(f"19M model, {n} pairs", small[n]))
    if fits:
        print("\nfixed cost fitted from the two sizes, each repetition: "
              + ", ".join(f"{f:.1f} s + {p:.3f} s a pair" for f, p in fits)
              + f"; median {statistics.median(f for f, _ in fits):.1f} s (goal 20)")
    if first:
        print(f"goals: first run {statistics.median(r['wall'] for r in first):.1f} s (35), unchanged rerun "
              f"{statistics.median(r['wall'] for r in unchanged):.1f} s ({torch_import + 1.5:.1f}: import torch + 1.5), "
              f"beta rerun {statistics.median(r['wall'] for r in beta):.1f} s (25)")


if __name__ == "__main__":
    main()
