"""Driver memory of the tokenize stage under Ray: does it grow with the dataset's tokens?

The tokenize workers write each read unit's token lists to files and send the driver only
the per-pair columns; shards are written by Ray tasks that each hold at most
``tokenize.pack_buffer_tokens`` tokens. The peer in the same run is the size of the token
lists themselves (4 bytes a token), what a driver that gathers the tokenized pairs holds.

Each dataset size runs in a fresh subprocess with its own local Ray (2 CPUs): the figure
is the growth of the driver's peak RSS over the stage, with Ray, the config and the
tokenizer already loaded.

    .venv/bin/python bench/tokenize_memory.py [--pairs 2000,8000] [--buffer TOKENS]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    """Chat pairs of random demo words: prompts 50-800 words, completions 20-1000."""
    from pipeline.demo import make_pairs

    words = sorted({w for p in make_pairs(200, seed) for m in p["prompt"] + p["chosen"] for w in m["content"].split()})
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(lo, hi)))

    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": [{"role": "user", "content": text(50, 800)}],
                                "chosen": [{"role": "assistant", "content": text(20, 1000)}],
                                "rejected": [{"role": "assistant", "content": text(20, 1000)}]}) + "\n")


def measure(pairs: int, buffer: int | None, work: Path) -> dict:
    import ray

    from pipeline.core.config import config_from_dict
    from pipeline.demo import make_assets
    from pipeline.tokenizing import tokenize
    from pipeline.core.tokenizer import load_tokenizer

    assets = make_assets(work / "assets")
    data = work / f"pairs-{pairs}.jsonl"
    write_pairs(data, pairs)
    tok = {"max_length": 4096, "max_tokens_per_row": 8192, "rows_per_task": 1000, "rows_per_shard": 64, "actors": 2}
    if buffer is not None:
        tok["pack_buffer_tokens"] = buffer
    cfg = config_from_dict({"run_dir": str(work / "run"), "model": {"path": str(assets["model"])},
                            "data": {"train_files": [str(data)], "eval_fraction": 0.05}, "tokenize": tok})
    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False)
    load_tokenizer(cfg)  # what the driver loads anyway: not part of the figure
    out = work / f"out-{pairs}"
    out.mkdir()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    _, stats = tokenize.run_on_ray(cfg, out)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    ray.shutdown()
    held = stats["tokens"] + stats["train"]["shared_prompt_tokens"] + stats["eval"]["shared_prompt_tokens"]
    return {"pairs": pairs, "tokens": held, "token_list_mib": 4 * held / 2**20, "driver_growth_mib": peak / 2**20,
            "write_groups": stats.get("write_groups"), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default="2000,8000")
    ap.add_argument("--buffer", type=int, help="tokenize.pack_buffer_tokens (default: the config's)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(measure(a.one, a.buffer, Path(work))))
        return
    rows = []
    for n in (int(x) for x in a.pairs.split(",")):
        cmd = [sys.executable, __file__, "--one", str(n)] + (["--buffer", str(a.buffer)] if a.buffer else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import pyarrow
    import ray

    print(f"# tokenize driver memory under Ray: {platform.machine()} CPU, 2 Ray CPUs, 2 tokenize actors, "
          f"ray {ray.__version__}, pyarrow {pyarrow.__version__}, buffer {a.buffer or 'default'}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| pairs | tokens held | token lists MiB | driver peak RSS growth MiB | growth / lists | write groups | s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['pairs']} | {r['tokens']} | {r['token_list_mib']:.1f} | {r['driver_growth_mib']:.1f} | "
              f"{r['driver_growth_mib'] / r['token_list_mib']:.3f} | {r['write_groups']} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
