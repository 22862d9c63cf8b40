"""Input rate of the tokenize stage on big single files: a JSON array, a CSV and a Parquet
file written as one row group.

Each format runs in a fresh subprocess with its own local Ray (2 CPUs, 2 tokenize actors,
the default ``rows_per_task``). A sampler thread on the driver reads, every 0.2 s, the RSS
of the driver and of every Ray worker process; the figures are the driver's peak, the
largest worker's peak, the read plan's seconds on the driver (``plan_chunks``) and the
stage's pairs per second. The peer in the same run is the same pairs as JSON Lines, which
was always cut into units by byte offsets.

    .venv/bin/python bench/tokenize_inputs.py [--pairs 200000] [--formats jsonl,json,csv,parquet]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_rows(n: int, seed: int = 0) -> dict[str, list[str]]:
    """Plain-text pairs of demo words: prompts 20-60 words, completions 10-40."""
    from pipeline.demo import make_pairs

    words = sorted({w for p in make_pairs(200, seed) for m in p["prompt"] + p["chosen"] for w in m["content"].split()})
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(lo, hi)))

    cols = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        cols["prompt"].append(f"Question {i}: " + text(20, 60))  # unique prompts: no duplicates dropped
        cols["chosen"].append(text(10, 40))
        cols["rejected"].append(text(10, 40))
    return cols


def write_inputs(work: Path, n: int, fmt: str) -> Path:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    cols = make_rows(n)
    table = pa.table(cols)
    path = work / f"pairs.{fmt}"
    if fmt == "jsonl":
        with path.open("w") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(table.to_pylist(), indent=1))
    elif fmt == "csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path, row_group_size=n)  # one row group
    return path


class Sampler(threading.Thread):
    """Peak RSS of this process and of the Ray worker processes, sampled."""

    def __init__(self):
        super().__init__(daemon=True)
        self.driver = self.worker = 0
        self.stop = threading.Event()

    def run(self):
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if cmd.startswith("ray::") and p.info["memory_info"] is not None:
                    self.worker = max(self.worker, p.info["memory_info"].rss)
            time.sleep(0.2)


def measure(n: int, fmt: str, work: Path) -> dict:
    import ray

    from pipeline.core import sources
    from pipeline.core.config import config_from_dict
    from pipeline.demo import make_assets
    from pipeline.core.storage import Loc
    from pipeline.tokenizing import tokenize
    from pipeline.core.tokenizer import load_tokenizer

    assets = make_assets(work / "assets")
    data = write_inputs(work, n, fmt)
    cfg = config_from_dict({"run_dir": str(work / "run"), "model": {"path": str(assets["model"])},
                            "data": {"train_files": [str(data)], "eval_fraction": 0.01},
                            "tokenize": {"max_length": 512, "max_tokens_per_row": 2048, "actors": 2}})
    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False)
    load_tokenizer(cfg)
    out = Loc(work / "out")
    start = time.perf_counter()
    units = len(sources.plan_chunks(tokenize.resolve_sources(cfg), cfg.tokenize.rows_per_task, cfg.data.split,
                                    staging=out / "_plan"))
    plan_s = time.perf_counter() - start
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    _, stats = tokenize.run_on_ray(cfg, out)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    ray.shutdown()
    good = stats["train"]["pairs"] + stats["eval"]["pairs"]
    return {"format": fmt, "pairs": n, "good": good, "mib": data.stat().st_size / 2**20, "units": units,
            "plan_s": plan_s, "seconds": seconds, "driver_mib": sampler.driver / 2**20,
            "worker_mib": sampler.worker / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=200000)
    ap.add_argument("--formats", default="jsonl,json,csv,parquet")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(measure(a.pairs, a.one, Path(work))))
        return
    rows = []
    for fmt in a.formats.split(","):
        out = subprocess.run([sys.executable, __file__, "--pairs", str(a.pairs), "--one", fmt],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{fmt}: {out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import pyarrow
    import ray

    print(f"# tokenize input rate: {platform.machine()} CPU, 2 Ray CPUs, 2 tokenize actors, rows_per_task 20000, "
          f"ray {ray.__version__}, pyarrow {pyarrow.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| input | pairs | MiB | read units | plan s (driver) | stage s | pairs/s | vs JSONL | driver peak MiB | "
          "largest worker peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = next((r for r in rows if r["format"] == "jsonl"), None)
    for r in rows:
        rate = r["pairs"] / r["seconds"]
        ratio = f"{rate / (base['pairs'] / base['seconds']):.2f}" if base else "-"
        print(f"| {r['format']} | {r['pairs']} | {r['mib']:.0f} | {r['units']} | {r['plan_s']:.1f} | "
              f"{r['seconds']:.1f} | {rate:.0f} | {ratio} | {r['driver_mib']:.0f} | {r['worker_mib']:.0f} |")


if __name__ == "__main__":
    main()
